# Sourced by .ci/run (and usable by hand): start a private PostgreSQL server on
# 127.0.0.1 with its own data folder and port, for the distributed-search tests.
# Exports EVOMERGE_TEST_POSTGRES; `stop_postgres` stops it and removes the folder.

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
PG_BIN=$(pg_bin)
if [ -z "$PG_BIN" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  PG_BIN=$(pg_bin)
fi
if [ -z "$PG_BIN" ]; then
  echo "postgres.sh: no PostgreSQL server binaries found" >&2
  return 1 2>/dev/null || exit 1
fi

PG_DIR=$(mktemp -d /tmp/evomerge-pg.XXXXXX)
PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  chown postgres "$PG_DIR"
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi
as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U postgres >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
  -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >/dev/null
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres evomerge_test
export EVOMERGE_TEST_POSTGRES="postgresql://postgres@127.0.0.1:$PG_PORT/evomerge_test"   # the README's URL form
echo "postgres.sh: PostgreSQL on 127.0.0.1:$PG_PORT (data in $PG_DIR)"

stop_postgres() {
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
}
