#!/usr/bin/env bash
# Makes sure a standalone ZooKeeper answers on 127.0.0.1:${CLOUDTASK_ZK_PORT:-2181}: installs
# Debian's package when it is missing and starts a server with our own config (java
# directly; zkServer.sh assumes the /etc and /var/log layout).
#
# `--fresh` (the test command uses it): a server this script started earlier is stopped
# and started again on an empty data folder, so the chroots of earlier runs (tests
# leave theirs behind) never pile up. A server someone else runs is used as it is.
set -euo pipefail

port=${CLOUDTASK_ZK_PORT:-2181}
dir=${CLOUDTASK_ZK_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudtask-zookeeper}
fresh=${1:-}

ruok() {
  # bash's /dev/tcp: no netcat needed.
  local answer
  answer=$( (exec 3<>"/dev/tcp/127.0.0.1/$port" && printf ruok >&3 && timeout 2 cat <&3) 2>/dev/null || true)
  [ "$answer" = imok ]
}

ours() {
  [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null
}

if [ "$fresh" = --fresh ] && ours; then
  kill "$(cat "$dir/pid")" 2>/dev/null || true
  for _ in $(seq 1 50); do
    ours || break
    sleep 0.2
  done
  rm -rf "$dir/data"
elif ruok; then
  exit 0
elif [ "$fresh" = --fresh ]; then
  rm -rf "$dir/data"
fi

if [ ! -f /usr/share/java/zookeeper.jar ]; then
  echo "ensure-zookeeper: installing ZooKeeper" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq zookeeper >/dev/null
fi

mkdir -p "$dir/data"
cat > "$dir/zoo.cfg" <<CFG
tickTime=2000
dataDir=$dir/data
clientPort=$port
clientPortAddress=127.0.0.1
maxSessionTimeout=120000
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,stat,mntr
CFG

classpath=/usr/share/java/zookeeper.jar
for jar in /usr/share/java/slf4j-simple.jar /usr/share/java/slf4j-api.jar; do
  [ -f "$jar" ] && classpath="$classpath:$jar"
done

echo "ensure-zookeeper: starting ZooKeeper on 127.0.0.1:$port (data in $dir)" >&2
setsid nohup java -Xmx1g -cp "$classpath" org.apache.zookeeper.server.ZooKeeperServerMain \
  "$dir/zoo.cfg" >"$dir/zk.log" 2>&1 < /dev/null &
echo $! > "$dir/pid"
for _ in $(seq 1 100); do
  ruok && exit 0
  sleep 0.3
done
echo "ensure-zookeeper: ZooKeeper did not answer ruok; log follows" >&2
tail -n 50 "$dir/zk.log" >&2
exit 1
