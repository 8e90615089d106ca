#!/usr/bin/env bash
# Makes sure Prometheus is installed for `make up` (the stack runs it when it is): installs Debian's package
# with apt-get when running as root, else says how. Never fatal: the stack runs without Prometheus.
set -uo pipefail

if command -v prometheus >/dev/null; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "prometheus not installed; installing Debian's package with apt-get (the stack scrapes every worker)"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
    # Debian starts its own service on :9090; the stack runs its own instance there instead.
    (systemctl stop prometheus 2>/dev/null || service prometheus stop 2>/dev/null || pkill -x prometheus) >/dev/null 2>&1 || true
    exit 0
  fi
  echo "could not install prometheus; the stack runs without it" >&2
else
  echo "prometheus is not installed (apt-get install prometheus); the stack runs without it" >&2
fi
exit 0
