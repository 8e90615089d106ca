#!/usr/bin/env bash
# Makes sure PostgreSQL answers on 127.0.0.1:5432 with a database `test` the `postgres` role can use without a
# password (the beat database tests). Uses a running server, else starts an installed cluster, else installs
# Debian's package (as root) with trust authentication for local connections; otherwise says what is missing.
set -euo pipefail
URL="${CELERIAC_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}"

ready() {
  command -v psql >/dev/null && psql "$URL" -Atqc 'select 1' >/dev/null 2>&1
}

if ready; then
  exit 0
fi
if ! command -v pg_ctlcluster >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "PostgreSQL not installed; installing it with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "missing: PostgreSQL on 127.0.0.1:5432 with database 'test' (apt-get install postgresql, or set CELERIAC_TEST_POSTGRES)" >&2
    exit 1
  fi
fi
version=$(ls /etc/postgresql | sort -V | tail -1)
hba="/etc/postgresql/$version/main/pg_hba.conf"
if [[ -w "$hba" ]] && ! grep -q "celeriac-tests" "$hba"; then
  # Local test connections without a password (this machine only).
  sed -i '1i host all all 127.0.0.1/32 trust # celeriac-tests\nhost all all ::1/128 trust # celeriac-tests\nlocal all all trust # celeriac-tests' "$hba"
fi
echo "starting PostgreSQL $version"
pg_ctlcluster --skip-systemctl-redirect "$version" main restart || pg_ctlcluster "$version" main start
for _ in $(seq 50); do
  if psql -h 127.0.0.1 -U postgres -Atqc 'select 1' postgres >/dev/null 2>&1; then
    psql -h 127.0.0.1 -U postgres -Atqc "select 1 from pg_database where datname = 'test'" postgres | grep -q 1 \
      || psql -h 127.0.0.1 -U postgres -qc 'create database test' postgres
    ready && exit 0
  fi
  sleep 0.2
done
echo "PostgreSQL did not become ready on 127.0.0.1:5432 (see /var/log/postgresql)" >&2
exit 1
