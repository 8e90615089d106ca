#!/usr/bin/env bash
# Makes sure a Redis server answers on 127.0.0.1:6379: uses a running one, else starts the installed
# redis-server (installing it with apt-get when running as root on Debian/Ubuntu), else says what is missing.
set -euo pipefail

ping() {
  if command -v redis-cli >/dev/null; then
    redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG
  else
    # No client: speak RESP over bash's /dev/tcp.
    exec 3<>/dev/tcp/127.0.0.1/6379 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    local reply
    read -r -t 2 reply <&3 || true
    exec 3>&-
    [[ "$reply" == +PONG* ]]
  fi
}

if ping; then
  exit 0
fi
if ! command -v redis-server >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "redis-server not installed; installing it with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "missing: Redis on 127.0.0.1:6379 and no redis-server to start (apt-get install redis-server, or run one)" >&2
    exit 1
  fi
fi
echo "starting a local redis-server on 127.0.0.1:6379"
mkdir -p "${TMPDIR:-/tmp}/celeriac-redis"
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --dir "${TMPDIR:-/tmp}/celeriac-redis" --logfile "${TMPDIR:-/tmp}/celeriac-redis/redis.log"
for _ in $(seq 50); do
  ping && exit 0
  sleep 0.1
done
echo "redis-server did not answer on 127.0.0.1:6379; see ${TMPDIR:-/tmp}/celeriac-redis/redis.log" >&2
exit 1
