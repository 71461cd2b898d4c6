#!/usr/bin/env bash
# Runs CloudTask's API on this machine: readies Postgres, creates and migrates the
# `cloudtask` database, creates admin@localhost on first start (password printed once),
# and serves on http://127.0.0.1:8080 (GraphiQL at /graphql).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-postgres.sh
export CLOUDTASK_DATABASE_URL="${CLOUDTASK_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/cloudtask}"
state_dir="${CLOUDTASK_DATA_DIR:-./cloudtask-data}"
mkdir -p "$state_dir"
if [ -z "${CLOUDTASK_JWT_SECRET:-}" ]; then
  [ -f "$state_dir/jwt-secret" ] || head -c 48 /dev/urandom | base64 | tr -d '\n/+=' > "$state_dir/jwt-secret"
  CLOUDTASK_JWT_SECRET="$(cat "$state_dir/jwt-secret")"
  export CLOUDTASK_JWT_SECRET
fi

psql -h 127.0.0.1 -U postgres -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'cloudtask'" | grep -q 1 ||
  psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE cloudtask"

cargo build --release -q
bin="${CARGO_TARGET_DIR:-target}/release/cloudtask"
"$bin" migrate
if [ ! -f "$state_dir/admin-created" ]; then
  password="$(head -c 18 /dev/urandom | base64 | tr -d '\n/+=')"
  printf '%s' "$password" | "$bin" admin create-user --email admin@localhost --password-stdin --platform-admin >/dev/null
  touch "$state_dir/admin-created"
  echo "Platform admin: admin@localhost / $password   (shown once)"
fi
echo "API: http://127.0.0.1:8080/graphql"
exec "$bin" api
