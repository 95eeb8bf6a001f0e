#!/usr/bin/env bash
# Quickstart: a throwaway PostgreSQL, dbmazz streaming from it through two WebAssembly
# plugins (transform-filter, then sink-webhook), and a local webhook receiver that prints
# each CloudEvent as it arrives. Ctrl-C (or QUICKSTART_SECONDS, default 60) stops and
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
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
echo "==> building dbmazz and its plugins (the first build compiles RocksDB and wasmtime: ~15 minutes on 2 cores)"
cargo build --release -p dbmazz
cargo build --release --target wasm32-wasip2 -p transform-filter -p sink-webhook
PLUGINS="$PWD/target/wasm32-wasip2/release"

# 2. A throwaway PostgreSQL with wal_level = logical.
WORK=$(mktemp -d /tmp/dbmazz-quickstart-XXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
HOOK_PORT=$(free_port)
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$WORK"
cleanup() {
    trap - EXIT INT TERM
    echo; echo "==> stopping"
    [ -n "${DBMAZZ_PID:-}" ] && kill "$DBMAZZ_PID" 2>/dev/null && wait "$DBMAZZ_PID" 2>/dev/null || true
    [ -n "${RECEIVER_PID:-}" ] && kill "$RECEIVER_PID" 2>/dev/null || true
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
CREATE TABLE shop.audit_log (id serial PRIMARY KEY, what text);
SQL
echo "==> PostgreSQL 15 on 127.0.0.1:$PORT (data in $WORK/pg)"

# 3. A webhook receiver that prints what it gets (one line per CloudEvent).
cat > "$WORK/receiver.py" <<'PY'
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        for e in json.loads(body):
            d = e["data"]
            row = d["after"] if d["after"] is not None else d["before"]
            row = {k: v for k, v in (row or {}).items() if k != "notes"}
            print(f'{e["id"]:>8}  {e["type"].rsplit(".", 1)[1]:<6}  {e["subject"]:<15} {json.dumps(row)}', flush=True)
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 -u "$WORK/receiver.py" "$HOOK_PORT" &
RECEIVER_PID=$!

# 4. dbmazz: filter (drops shop.audit_log, masks e-mail addresses) then the webhook sink.
cat > "$WORK/dbmazz.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"
tables = ["shop.customers", "shop.orders", "shop.audit_log"]
replica_identity_full = true

[pipeline]
flush_interval_ms = 50

[[transforms]]
plugin = "$PLUGINS/transform_filter.wasm"
config = { exclude_tables = ["shop.audit_*"], mask_columns = ["email"], mask = "sha256" }

[sink]
plugin = "$PLUGINS/sink_webhook.wasm"
config = { url = "http://127.0.0.1:$HOOK_PORT/events" }
capabilities = { http = ["127.0.0.1:$HOOK_PORT"] }
limits = { memory_mb = 64, call_timeout_ms = 5000 }

[state]
dir = "$WORK/state"
TOML
target/release/dbmazz run --config "$WORK/dbmazz.toml" 2> "$WORK/dbmazz.log" &
DBMAZZ_PID=$!
for _ in $(seq 300); do grep -q streaming "$WORK/dbmazz.log" && break; sleep 0.1; done
grep -q streaming "$WORK/dbmazz.log" || { cat "$WORK/dbmazz.log"; exit 1; }
echo "==> dbmazz is streaming through transform-filter and sink-webhook; config: $WORK/dbmazz.toml"
echo "==> CloudEvents as the receiver gets them (id = batch:index, type, table, row; e-mails masked):"

# 5. A stream of inserts, updates (one leaves a TOASTed column unchanged) and deletes.
end=$(( $(date +%s) + SECONDS_TO_RUN ))
i=0
while [ "$(date +%s)" -lt "$end" ]; do
    i=$((i + 1))
    "${PSQL[@]}" -c "
        INSERT INTO shop.customers (name, email) VALUES ('customer $i', 'c$i@example.com');
        INSERT INTO shop.orders (customer_id, amount, status, notes)
            VALUES (currval('shop.customers_id_seq'), $i * 1.5, 'new', repeat(md5('$i'), 100));
        UPDATE shop.orders SET status = 'paid' WHERE id = currval('shop.orders_id_seq');
        DELETE FROM shop.orders WHERE id = currval('shop.orders_id_seq') - 3;
        INSERT INTO shop.audit_log (what) VALUES ('filtered out by transform-filter');" >/dev/null
    sleep 1
done
