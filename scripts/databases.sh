#!/usr/bin/env bash
# Start the local PostgreSQL and MariaDB servers if they are down, then create the test databases
# (idempotent). Database names come from TEST_POSTGRES_URL / TEST_MARIADB_URL when set.
set -euo pipefail

pg_db=$(basename "${TEST_POSTGRES_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/test}")
my_db=$(basename "${TEST_MARIADB_URL:-mysql+asyncmy://root@127.0.0.1:3306/test}")

wait_for() {  # wait_for NAME COMMAND...: up to 30 s
  local name=$1; shift
  for _ in $(seq 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "databases.sh: $name did not come up" >&2
  return 1
}

if command -v pg_isready >/dev/null; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "databases.sh: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
    wait_for PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432
  fi
  psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$pg_db'" \
    | grep -q 1 || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE \"$pg_db\""
else
  echo "databases.sh: no PostgreSQL client here; PostgreSQL tests will be skipped (or fail in CI)"
fi

if command -v mariadb-admin >/dev/null || command -v mysqladmin >/dev/null; then
  admin=$(command -v mariadb-admin || command -v mysqladmin)
  client=$(command -v mariadb || command -v mysql)
  if ! "$admin" -h 127.0.0.1 -uroot status >/dev/null 2>&1; then
    echo "databases.sh: starting MariaDB"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
    wait_for MariaDB "$admin" -h 127.0.0.1 -uroot status
  fi
  "$client" -h 127.0.0.1 -uroot -e "CREATE DATABASE IF NOT EXISTS \`$my_db\`"
else
  echo "databases.sh: no MariaDB client here; MariaDB tests will be skipped (or fail in CI)"
fi
