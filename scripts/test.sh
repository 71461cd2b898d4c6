#!/usr/bin/env bash
# The one test command: readies Postgres and ZooKeeper (installing and starting them when
# absent), then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-postgres.sh
scripts/ensure-zookeeper.sh --fresh
# The mail tests talk to a real SMTP server (scripts/smtp-sink.py, on aiosmtpd).
python3 -c 'import aiosmtpd' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check aiosmtpd

# The console's test drives Debian's Chromium with playwright-core (web/).
scripts/ensure-browser.sh

# Databases left behind by earlier runs (each test creates its own).
psql -h 127.0.0.1 -U postgres -d postgres -Atc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'cloudtask\_test\_%'" |
  while read -r db; do
    psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\"" || true
  done

cargo test --workspace --all-targets "$@"
