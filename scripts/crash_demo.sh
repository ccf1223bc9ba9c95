#!/usr/bin/env bash
# Kills the orders demo (SIGKILL) between its commit point and its answer, starts it again,
# and retries with the same key after the lease: the same order comes back, replayed, and
# the database holds one row for it.
#
#   cargo build --example axum --features postgres,mysql
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test bash scripts/crash_demo.sh
#   CRASH_DEMO_STORE=mysql://root@127.0.0.1:3306/test bash scripts/crash_demo.sh   # MySQL
#
# Bounded: about 10 seconds. Exit 1 if the retry ran the order again or did not replay it.
set -euo pipefail
cd "$(dirname "$0")/.."

db="${CRASH_DEMO_STORE:-${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}}"
addr="127.0.0.1:${CRASH_DEMO_PORT:-3911}"
demo="${CARGO_TARGET_DIR:-target}/debug/examples/axum"
[ -x "$demo" ] || { echo "build it first: cargo build --example axum --features postgres,mysql" >&2; exit 1; }
key="crash-demo-$(date +%s%N)"
body='{"item":"book","amount":12}'
export IDEMPOTENCY_STORE="$db" LISTEN_ADDR="$addr" IDEMPOTENCY_LEASE_MS=1000

up() { for _ in $(seq 1 100); do curl -s -o /dev/null "http://$addr/orders" && return 0; sleep 0.1; done; return 1; }
post() { curl -s -m 30 -D - -X POST "http://$addr/orders" -H "Idempotency-Key: $key" \
           -H 'Content-Type: application/json' -d "$body"; }

ORDER_AFTER_COMMIT_MS=20000 "$demo" >/tmp/crash_demo_1.log 2>&1 &
first=$!
trap 'kill -9 $first 2>/dev/null || true; kill ${second:-0} 2>/dev/null || true' EXIT
up || { echo "the demo did not start" >&2; exit 1; }
post >/dev/null 2>&1 &
for _ in $(seq 1 100); do grep -q "order committed" /tmp/crash_demo_1.log && break; sleep 0.05; done
grep -q "order committed" /tmp/crash_demo_1.log || { echo "the order never committed" >&2; exit 1; }
kill -9 "$first"
wait "$first" 2>/dev/null || true
echo "killed the demo after its commit point, before its answer"

"$demo" >/tmp/crash_demo_2.log 2>&1 &
second=$!
up || { echo "the demo did not restart" >&2; exit 1; }
sleep 1.2   # past the dead instance's lease
answer=$(post)
echo "$answer" | sed -n '1p;/idempotent-replayed/p;$p'
case "$db" in
    mysql://*)
        # mysql://user[:password]@host:port/database
        rest="${db#mysql://}"; creds="${rest%%@*}"; hostpart="${rest#*@}"
        hostport="${hostpart%%/*}"; database="${hostpart#*/}"
        user="${creds%%:*}"; pass=""; [ "$creds" != "$user" ] && pass="${creds#*:}"
        rows=$(MYSQL_PWD="$pass" mysql --protocol=tcp -h"${hostport%%:*}" -P"${hostport##*:}" \
            -u"$user" -N -e "SELECT COUNT(*) FROM demo_orders WHERE idem_key = '$key'" "$database")
        ;;
    *) rows=$(psql "$db" -tAc "SELECT count(*) FROM demo_orders WHERE idem_key = '$key'") ;;
esac
echo "rows for the key: $rows"
echo "$answer" | grep -qi '^idempotent-replayed: true' || { echo "FAIL: not replayed" >&2; exit 1; }
[ "$rows" = 1 ] || { echo "FAIL: $rows orders for one key" >&2; exit 1; }
echo "OK: one order, recovered and replayed"
