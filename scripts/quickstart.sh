#!/usr/bin/env bash
# Quickstart: a throwaway PostgreSQL, dbmazz streaming from it, a stream of changes, and
# each change printed as it arrives. Ctrl-C (or QUICKSTART_SECONDS, default 60) stops and
# removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${QUICKSTART_SECONDS:-60}"
PG_BIN=/usr/lib/postgresql/15/bin

# 1. What the build and the demo need (idempotent).
need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
[ -x "$PG_BIN/initdb" ] || need+=(postgresql-15)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client-15)
command -v jq >/dev/null 2>&1 || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "==> building dbmazz (the first build compiles RocksDB: several minutes)"
cargo build --release -p dbmazz

# 2. A throwaway PostgreSQL with wal_level = logical.
WORK=$(mktemp -d /tmp/dbmazz-quickstart-XXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$WORK"
cleanup() {
    trap - EXIT INT TERM
    echo; echo "==> stopping"
    [ -n "${DBMAZZ_PID:-}" ] && kill "$DBMAZZ_PID" 2>/dev/null && wait "$DBMAZZ_PID" 2>/dev/null || true
    [ -n "${TAIL_PID:-}" ] && kill "$TAIL_PID" 2>/dev/null || true
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
as_pg "$PG_BIN/initdb" -U postgres --auth=trust -D "$WORK/pg" >/dev/null
cat >> "$WORK/pg/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
CONF
as_pg "$PG_BIN/pg_ctl" -w -D "$WORK/pg" -l "$WORK/pg.log" start >/dev/null
PSQL=(psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
"${PSQL[@]}" <<'SQL'
CREATE SCHEMA shop;
CREATE TABLE shop.customers (id serial PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE shop.orders (id serial PRIMARY KEY, customer_id int REFERENCES shop.customers,
    amount numeric(10,2), status text, notes text, created_at timestamptz DEFAULT now());
ALTER TABLE shop.orders ALTER COLUMN notes SET STORAGE EXTERNAL;
SQL
echo "==> PostgreSQL 15 on 127.0.0.1:$PORT (data in $WORK/pg)"

# 3. dbmazz, with the built-in JSONL sink.
cat > "$WORK/dbmazz.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"
tables = ["shop.customers", "shop.orders"]
replica_identity_full = true

[pipeline]
flush_interval_ms = 50

[sink]
kind = "jsonl"
path = "$WORK/changes.jsonl"

[state]
dir = "$WORK/state"
TOML
touch "$WORK/changes.jsonl"
target/release/dbmazz run --config "$WORK/dbmazz.toml" 2> "$WORK/dbmazz.log" &
DBMAZZ_PID=$!
for _ in $(seq 100); do grep -q streaming "$WORK/dbmazz.log" && break; sleep 0.1; done
grep -q streaming "$WORK/dbmazz.log" || { cat "$WORK/dbmazz.log"; exit 1; }
echo "==> dbmazz is streaming; config: $WORK/dbmazz.toml (copy it to start your own)"
echo "==> changes as they arrive (batch, op, table, row):"
tail -n +1 -f "$WORK/changes.jsonl" | jq -c --unbuffered '{batch, op, table, row: (.new // .old)} | del(.row.notes)' &
TAIL_PID=$!

# 4. A stream of inserts, updates (one leaves a TOASTed column unchanged) and deletes.
end=$(( $(date +%s) + SECONDS_TO_RUN ))
i=0
while [ "$(date +%s)" -lt "$end" ]; do
    i=$((i + 1))
    "${PSQL[@]}" -c "
        INSERT INTO shop.customers (name, email) VALUES ('customer $i', 'c$i@example.com');
        INSERT INTO shop.orders (customer_id, amount, status, notes)
            VALUES (currval('shop.customers_id_seq'), $i * 1.5, 'new', repeat(md5('$i'), 100));
        UPDATE shop.orders SET status = 'paid' WHERE id = currval('shop.orders_id_seq');
        DELETE FROM shop.orders WHERE id = currval('shop.orders_id_seq') - 3;" >/dev/null
    sleep 1
done
