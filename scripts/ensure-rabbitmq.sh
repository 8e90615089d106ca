#!/usr/bin/env bash
# Makes sure RabbitMQ answers on 127.0.0.1:5672 with guest/guest: uses a running one, else starts the installed
# rabbitmq-server (installing it with apt-get when running as root on Debian/Ubuntu), else says what is missing.
set -euo pipefail

port_open() {
  (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null
}

ready() {
  port_open && { ! command -v rabbitmqctl >/dev/null || rabbitmqctl -q await_startup >/dev/null 2>&1; }
}

if ready; then
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "rabbitmq-server not installed; installing it with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  else
    echo "missing: RabbitMQ on 127.0.0.1:5672 and no rabbitmq-server to start (apt-get install rabbitmq-server, or run one with user guest/guest)" >&2
    exit 1
  fi
fi
if command -v rabbitmqctl >/dev/null && rabbitmqctl -q ping >/dev/null 2>&1; then
  # A node left with its app stopped (an interrupted broker-restart test does that): start the app.
  echo "the local RabbitMQ node runs with its application stopped; starting it"
  rabbitmqctl -q start_app >/dev/null 2>&1 || true
else
  echo "starting a local rabbitmq-server on 127.0.0.1:5672"
  rabbitmq-server -detached >/dev/null 2>&1 || true
fi
for _ in $(seq 120); do
  ready && exit 0
  sleep 0.5
done
echo "rabbitmq-server did not answer on 127.0.0.1:5672 within 60 s; see /var/log/rabbitmq/" >&2
exit 1
