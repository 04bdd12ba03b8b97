#!/usr/bin/env bash
# The servers the read-replica tests need, created and started idempotently (about 2 s from
# nothing; a second run only checks they are up):
#
#   a PostgreSQL primary   127.0.0.1:5433  (database test)
#   two streaming replicas 127.0.0.1:5434 and 5435  (pg_basebackup -R -X stream)
#   PgBouncer              127.0.0.1:6432  (transaction pooling; its database "test" is
#                                           test_bouncer on the suite's 127.0.0.1:5432)
#
# Everything lives under $REPLICAS_DIR and runs as the postgres OS user (PostgreSQL's tools and
# PgBouncer refuse root). Commands:
#
#   scripts/replicas.sh [up]                 create or start whatever is missing (the default)
#   scripts/replicas.sh stop-replica         stop the replica (the tests' "replica down")
#   scripts/replicas.sh start-replica        start it again
#   scripts/replicas.sh scratch PORT         a throwaway replica on PORT (the promotion test)
#   scripts/replicas.sh drop-scratch PORT    stop and remove it
#   scripts/replicas.sh down                 stop everything this script started
set -euo pipefail

REPLICAS_DIR=${REPLICAS_DIR:-/var/lib/postgresql/fastapi-async-sqlalchemy}
PRIMARY_PORT=${PRIMARY_PORT:-5433}
REPLICA_PORT=${REPLICA_PORT:-5434}
SECOND_PORT=${SECOND_PORT:-5435}
BOUNCER_PORT=${BOUNCER_PORT:-6432}
BOUNCED_PORT=${BOUNCED_PORT:-5432}  # the server PgBouncer pools (the suite's PostgreSQL)

say() { echo "replicas.sh: $*" >&2; }

pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$dir" ] || [ ! -x "$dir/initdb" ]; then
    say "no PostgreSQL server binaries (initdb) here"
    return 1
  fi
  echo "$dir"
}

as_postgres() {  # run a command as the postgres OS user, from a directory it can read
  if [ "$(id -un)" = postgres ]; then
    (cd / && "$@")
  else
    (cd / && runuser -u postgres -- "$@")
  fi
}

ready() { as_postgres "$BIN/pg_isready" -q -h 127.0.0.1 -p "$1"; }

wait_ready() {  # wait_ready PORT: up to 30 s
  for _ in $(seq 150); do ready "$1" && return 0; sleep 0.2; done
  say "the server on port $1 did not come up; its log: $REPLICAS_DIR/$2.log"
  tail -n 20 "$REPLICAS_DIR/$2.log" >&2 || true
  return 1
}

start_cluster() {  # start_cluster NAME PORT
  local name=$1 port=$2
  ready "$port" && return 0
  as_postgres "$BIN/pg_ctl" -D "$REPLICAS_DIR/$name" -l "$REPLICAS_DIR/$name.log" -w -t 30 \
    -o "-p $port -k /tmp -c listen_addresses=127.0.0.1" start >/dev/null
  wait_ready "$port" "$name"
}

stop_cluster() {  # stop_cluster NAME
  local name=$1
  if [ -f "$REPLICAS_DIR/$name/postmaster.pid" ]; then
    as_postgres "$BIN/pg_ctl" -D "$REPLICAS_DIR/$name" -m fast -w -t 30 stop >/dev/null || true
  fi
}

psql_on() {  # psql_on PORT SQL
  as_postgres "$BIN/psql" -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -tAc "$2"
}

primary_up() {
  if [ ! -f "$REPLICAS_DIR/primary/PG_VERSION" ]; then
    say "creating the primary in $REPLICAS_DIR/primary"
    rm -rf "$REPLICAS_DIR/primary"
    as_postgres "$BIN/initdb" -D "$REPLICAS_DIR/primary" -U postgres -A trust --no-sync \
      >/dev/null
    # Test servers: replication on, durability off (a crash loses nothing the tests need).
    # Commits stay synchronous: WAL goes to the replicas as soon as it is committed.
    printf '%s\n' "wal_level = replica" "max_wal_senders = 10" "hot_standby_feedback = on" \
      "fsync = off" "full_page_writes = off" \
      | as_postgres tee -a "$REPLICAS_DIR/primary/postgresql.conf" >/dev/null
  fi
  start_cluster primary "$PRIMARY_PORT"
  if [ "$(psql_on "$PRIMARY_PORT" "SHOW synchronous_commit")" != on ]; then
    psql_on "$PRIMARY_PORT" "ALTER SYSTEM SET synchronous_commit = on" >/dev/null
    psql_on "$PRIMARY_PORT" "SELECT pg_reload_conf()" >/dev/null
  fi
  [ "$(psql_on "$PRIMARY_PORT" "SELECT count(*) FROM pg_database WHERE datname = 'test'")" = 1 ] \
    || psql_on "$PRIMARY_PORT" "CREATE DATABASE test"
}

slot_of() { echo "${1//-/_}"; }

drop_slot() {  # drop_slot NAME: the primary keeps WAL for a replica's slot until it is dropped
  psql_on "$PRIMARY_PORT" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
    WHERE slot_name = '$(slot_of "$1")'" >/dev/null
}

make_replica() {  # make_replica NAME PORT: a fresh streaming replica of the primary
  local name=$1 port=$2
  stop_cluster "$name"
  rm -rf "${REPLICAS_DIR:?}/$name"
  drop_slot "$name"
  # A replication slot: the primary keeps the WAL a stopped replica still needs.
  as_postgres "$BIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
    -D "$REPLICAS_DIR/$name" -R -X stream -C -S "$(slot_of "$name")" -c fast --no-sync
  start_cluster "$name" "$port"
}

streaming() {  # streaming PORT: the replica on PORT receives WAL from the primary (up to 5 s)
  for _ in $(seq 50); do
    [ "$(psql_on "$1" "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")" \
      = 1 ] && return 0
    sleep 0.1
  done
  return 1
}

replica_up() {  # replica_up NAME PORT
  local name=$1 port=$2
  if [ ! -f "$REPLICAS_DIR/$name/standby.signal" ]; then
    # Never made, or promoted by someone: a replica is made anew from the primary.
    say "creating a replica in $REPLICAS_DIR/$name"
    make_replica "$name" "$port"
  else
    start_cluster "$name" "$port"
  fi
  local slot
  slot=$(psql_on "$PRIMARY_PORT" "SELECT count(*) FROM pg_replication_slots
    WHERE slot_name = '$(slot_of "$name")'")
  if [ "$slot" != 1 ] || [ "$(psql_on "$port" "SELECT pg_is_in_recovery()")" != t ] \
    || ! streaming "$port"; then
    say "the server on port $port is no streaming replica: making it anew"
    make_replica "$name" "$port"
  fi
  # A test that paused replay and died leaves it paused: resume.
  psql_on "$port" "SELECT pg_wal_replay_resume()" >/dev/null
}

bouncer_up() {
  local bouncer dir=$REPLICAS_DIR/pgbouncer config
  bouncer=$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)
  if [ -z "$bouncer" ]; then
    say "installing PgBouncer (Debian's pgbouncer package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null
    bouncer=/usr/sbin/pgbouncer
  fi
  # Its own database on the suite's server, so that its pooled server connections never count
  # among the sessions other tests look at.
  psql_on "$BOUNCED_PORT" "SELECT 1 FROM pg_database WHERE datname = 'test_bouncer'" | grep -q 1 \
    || psql_on "$BOUNCED_PORT" "CREATE DATABASE test_bouncer"
  mkdir -p "$dir"
  config=$(cat <<EOF
[databases]
test = host=127.0.0.1 port=$BOUNCED_PORT dbname=test_bouncer

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = 10
max_client_conn = 500
server_idle_timeout = 10
ignore_startup_parameters = extra_float_digits,options
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
EOF
)
  if [ "$config" != "$(cat "$dir/pgbouncer.ini" 2>/dev/null)" ]; then
    if [ -f "$dir/pgbouncer.pid" ]; then  # running with another configuration: restart it
      kill "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || true
      for _ in $(seq 50); do [ -f "$dir/pgbouncer.pid" ] || break; sleep 0.1; done
    fi
    printf '%s\n' "$config" >"$dir/pgbouncer.ini"
  fi
  if as_postgres "$BIN/pg_isready" -q -h 127.0.0.1 -p "$BOUNCER_PORT"; then
    return 0
  fi
  echo '"postgres" ""' >"$dir/userlist.txt"
  chown -R postgres: "$dir"
  as_postgres "$bouncer" -d -q "$dir/pgbouncer.ini"
  for _ in $(seq 100); do
    as_postgres "$BIN/pg_isready" -q -h 127.0.0.1 -p "$BOUNCER_PORT" && return 0
    sleep 0.1
  done
  say "PgBouncer did not come up; its log: $dir/pgbouncer.log"
  return 1
}

BIN=$(pg_bin)
mkdir -p "$REPLICAS_DIR"
chown postgres: "$REPLICAS_DIR"

case "${1:-up}" in
  up)
    primary_up
    replica_up replica "$REPLICA_PORT"
    replica_up replica2 "$SECOND_PORT"
    bouncer_up
    ;;
  stop-replica) stop_cluster replica ;;
  start-replica) start_cluster replica "$REPLICA_PORT" ;;
  scratch)
    primary_up
    make_replica "scratch-$2" "$2"
    ;;
  drop-scratch)
    stop_cluster "scratch-$2"
    rm -rf "${REPLICAS_DIR:?}/scratch-$2"
    drop_slot "scratch-$2"
    ;;
  down)
    if [ -f "$REPLICAS_DIR/pgbouncer/pgbouncer.pid" ]; then
      kill "$(cat "$REPLICAS_DIR/pgbouncer/pgbouncer.pid")" 2>/dev/null || true
    fi
    for cluster in "$REPLICAS_DIR"/scratch-* "$REPLICAS_DIR"/replica* "$REPLICAS_DIR/primary"; do
      [ -d "$cluster" ] && stop_cluster "$(basename "$cluster")"
    done
    ;;
  *)
    say "unknown command $1 (up, stop-replica, start-replica, scratch PORT, drop-scratch PORT, down)"
    exit 2
    ;;
esac
