#!/usr/bin/env bash
# The servers the read-replica tests need, created and started idempotently (about 2 s from
# nothing; a second run only checks they are up):
#
#   a PostgreSQL primary   127.0.0.1:5433  (database test)
#   two streaming replicas 127.0.0.1:5434 and 5435  (pg_basebackup -R -X stream)
#   PgBouncer              127.0.0.1:6432  (transaction pooling; its database "test" is
#                                           test_bouncer on the suite's 127.0.0.1:5432)
#   a MariaDB primary      127.0.0.1:3307  (binary log, GTIDs; database test)
#   its replica            127.0.0.1:3308  (MASTER_USE_GTID=slave_pos)
#
# PostgreSQL lives under $REPLICAS_DIR and runs as the postgres OS user (PostgreSQL's tools and
# PgBouncer refuse root); MariaDB under $MARIADB_DIR, as the mysql user. Commands:
#
#   scripts/replicas.sh [up]                 create or start whatever is missing (the default)
#   scripts/replicas.sh stop-replica         stop the replica (the tests' "replica down")
#   scripts/replicas.sh start-replica        start it again
#   scripts/replicas.sh scratch PORT         a throwaway replica on PORT (the promotion test)
#   scripts/replicas.sh drop-scratch PORT    stop and remove it
#   scripts/replicas.sh down                 stop everything this script started
set -euo pipefail

REPLICAS_DIR=${REPLICAS_DIR:-/var/lib/postgresql/fastapi-async-sqlalchemy}
MARIADB_DIR=${MARIADB_DIR:-/var/lib/mysql-fastapi-async-sqlalchemy}
MARIADB_PRIMARY_PORT=${MARIADB_PRIMARY_PORT:-3307}
MARIADB_REPLICA_PORT=${MARIADB_REPLICA_PORT:-3308}
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

# -- MariaDB -------------------------------------------------------------------------------------

my_sql() {  # my_sql NAME SQL: as root, through the server's socket
  mariadb --no-defaults -S "$MARIADB_DIR/$1.sock" -uroot -N -B -e "$2"
}

my_up() {  # my_up NAME PORT SERVER_ID: an instance of our own, made and started if need be
  local name=$1 port=$2 id=$3 dir=$MARIADB_DIR/$1
  if ! mariadb-admin --no-defaults -S "$dir.sock" -uroot status >/dev/null 2>&1; then
    if [ ! -d "$dir/mysql" ]; then
      say "creating the MariaDB $name in $dir"
      rm -rf "$dir"
      mkdir -p "$dir"
      chown mysql: "$dir"
      mariadb-install-db --no-defaults --user=mysql --datadir="$dir" --skip-test-db \
        --auth-root-authentication-method=normal >/dev/null
    fi
    # A daemon of its own session, holding none of this script's outputs (make would wait).
    (cd / && exec setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$dir" \
      --port="$port" --bind-address=127.0.0.1 --socket="$dir.sock" --pid-file="$dir.pid" \
      --log-error="$dir.err" --server-id="$id" --log-bin="$name-bin" --gtid-strict-mode=1 \
      --skip-name-resolve --innodb-buffer-pool-size=32M --innodb-flush-log-at-trx-commit=2 \
      </dev/null >/dev/null 2>&1) &
    for _ in $(seq 150); do
      mariadb-admin --no-defaults -S "$dir.sock" -uroot status >/dev/null 2>&1 && break
      sleep 0.2
    done
    mariadb-admin --no-defaults -S "$dir.sock" -uroot status >/dev/null 2>&1 || {
      say "the MariaDB $name did not come up; its log: $dir.err"
      tail -n 20 "$dir.err" >&2 || true
      return 1
    }
  fi
  # Root over TCP from 127.0.0.1, as the suite connects (not written to the binary log).
  my_sql "$name" "SET sql_log_bin = 0; CREATE USER IF NOT EXISTS root@'127.0.0.1';
    GRANT ALL ON *.* TO root@'127.0.0.1' WITH GRANT OPTION"
}

mariadb_up() {
  mkdir -p "$MARIADB_DIR"
  chown mysql: "$MARIADB_DIR"
  my_up primary "$MARIADB_PRIMARY_PORT" 1
  my_sql primary "CREATE DATABASE IF NOT EXISTS test"
  my_up replica "$MARIADB_REPLICA_PORT" 2
  local host io sql delay
  read -r host io sql delay < <(mariadb --no-defaults -S "$MARIADB_DIR/replica.sock" -uroot \
    -e "SHOW REPLICA STATUS\G" | awk '/ Master_Host:/ {h=$2} / Slave_IO_Running:/ {io=$2}
      / Slave_SQL_Running:/ {sql=$2} / SQL_Delay:/ {d=$2} END {print h" "io" "sql" "d}')
  if [ "$host" != 127.0.0.1 ]; then
    my_sql replica "STOP SLAVE; CHANGE MASTER TO MASTER_HOST='127.0.0.1',
      MASTER_PORT=$MARIADB_PRIMARY_PORT, MASTER_USER='root', MASTER_PASSWORD='',
      MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1; START SLAVE"
  elif [ "$sql" = No ] || [ "$io" = No ] || [ "${delay:-0}" != 0 ]; then
    # A test that stopped or delayed replication and died leaves it so: undo.
    my_sql replica "STOP SLAVE; CHANGE MASTER TO MASTER_DELAY=0; START SLAVE"
  fi
  for _ in $(seq 100); do
    [ "$(my_sql replica "SELECT count(*) FROM information_schema.SCHEMATA
      WHERE SCHEMA_NAME = 'test'")" = 1 ] && return 0
    sleep 0.1
  done
  say "the MariaDB replica does not replicate; its log: $MARIADB_DIR/replica.err"
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
    mariadb_up
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
    for name in replica primary; do
      mariadb-admin --no-defaults -S "$MARIADB_DIR/$name.sock" -uroot shutdown 2>/dev/null || true
    done
    ;;
  *)
    say "unknown command $1 (up, stop-replica, start-replica, scratch PORT, drop-scratch PORT, down)"
    exit 2
    ;;
esac
