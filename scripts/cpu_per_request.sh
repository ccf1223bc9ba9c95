#!/usr/bin/env bash
# CPU time per request of each process a load run keeps busy: the server (benches/serve.rs,
# the orders demo's handler without its commit point), wrk, and Redis when the run uses it.
# Each is its user + system time from /proc/PID/stat over the run, divided by the requests
# served. On a machine whose cores the three share, this tells what a target over HTTP can
# be at most: a ratio to layer off is bounded by the CPU a request costs in each.
#
#   CARGO_TARGET_DIR=/work/target-bench bash scripts/cpu_per_request.sh
#   REDIS_URL=redis://127.0.0.1:6379 RUNS="off redis" CARGO_TARGET_DIR=/work/target-bench \
#     bash scripts/cpu_per_request.sh
#
# Runs (RUNS, space separated, default "off memory", and "redis" with REDIS_URL): off (layer
# off), memory (the memory store), redis (the Redis store at REDIS_URL; the Redis server's
# CPU is read from the process listening on that URL's port, on this machine). A new key per
# request. Settings: DURATION (seconds, 2..60, default 8), REPS (1..10, default 2),
# CONNECTIONS (default 32), PORT (default 3958). Only 127.0.0.1 is used; the Redis keys a run
# made (they carry the run's own prefix) are deleted after it.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-8}"
REPS="${REPS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
PORT="${PORT:-3958}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
(( DURATION >= 2 && DURATION <= 60 )) || { echo "DURATION must be 2..60" >&2; exit 2; }
(( REPS >= 1 && REPS <= 10 )) || { echo "REPS must be 1..10" >&2; exit 2; }
(( CONNECTIONS >= 2 && CONNECTIONS <= 256 )) || { echo "CONNECTIONS must be 2..256" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }

FEATURES=()
DEFAULT_RUNS="off memory"
if [[ -n "${REDIS_URL:-}" ]]; then
    FEATURES=(--features redis)
    DEFAULT_RUNS="off memory redis"
fi
RUNS="${RUNS:-$DEFAULT_RUNS}"
for run in $RUNS; do
    [[ "$run" =~ ^(off|memory|redis)$ ]] || { echo "unknown run $run (off, memory, redis)" >&2; exit 2; }
done
REDIS_PID=""
if grep -qw redis <<<"$RUNS"; then
    [[ -n "${REDIS_URL:-}" ]] || { echo "the redis run needs REDIS_URL" >&2; exit 2; }
    redis_port=$(sed -E 's#^redis://([^@/]*@)?[^:/]+:?([0-9]*).*#\2#' <<<"$REDIS_URL")
    redis_port=${redis_port:-6379}
    REDIS_PID=$(ss -ltnpH "sport = :$redis_port" | sed -nE 's/.*pid=([0-9]+).*/\1/p' | head -1)
    [[ -n "$REDIS_PID" ]] || { echo "no process of this machine listens on port $redis_port" >&2; exit 2; }
fi

SERVE=$(nice -n 10 cargo bench --bench serve "${FEATURES[@]}" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="serve" and m.get("executable"):
        print(m["executable"])')
[[ -x "$SERVE" ]] || { echo "cannot build benches/serve.rs" >&2; exit 1; }

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

cat >"$WORK/new_keys.lua" <<'LUA'
local threads = 0
local run_id = os.getenv("RUN_ID")
function setup(thread)
    threads = threads + 1
    thread:set("prefix", "cpureq-" .. run_id .. "-t" .. threads .. "-")
end
local counter = 0
function request()
    counter = counter + 1
    return wrk.format("POST", "/orders", {
        ["Content-Type"] = "application/json",
        ["Idempotency-Key"] = prefix .. counter,
    }, '{"item":"book","amount":12}')
end
LUA

ticks() { # user + system clock ticks of a process
    awk '{print $14 + $15}' "/proc/$1/stat"
}
HZ=$(getconf CLK_TCK)

echo "# cpu_per_request: wrk -t2 -c$CONNECTIONS -d${DURATION}s, $REPS repetitions, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| rep | run | req/s | server µs/req | Redis µs/req | wrk µs/req |"
echo "|---:|---|---:|---:|---:|---:|"
for rep in $(seq 1 "$REPS"); do
    for run in $RUNS; do
        case "$run" in
            off) layer=off store=memory ;;
            memory) layer=on store=memory ;;
            redis) layer=on store="$REDIS_URL" ;;
            *) echo "unknown run $run" >&2; exit 2 ;;
        esac
        id="$(date +%s%N)"
        LISTEN_ADDR="127.0.0.1:$PORT" IDEMPOTENCY_LAYER="$layer" IDEMPOTENCY_STORE="$store" \
            IDEMPOTENCY_MEMORY_MAX_MB=8192 RUST_LOG=warn "$SERVE" --serve >"$WORK/server.log" 2>&1 &
        SERVER_PID=$!
        for _ in $(seq 1 100); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
            kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
            sleep 0.1
        done
        s0=$(ticks "$SERVER_PID")
        r0=0
        [[ -n "$REDIS_PID" ]] && r0=$(ticks "$REDIS_PID")
        RUN_ID="$id" timeout $((DURATION + 30)) wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" \
            -s "$WORK/new_keys.lua" "http://127.0.0.1:$PORT/orders" >"$WORK/wrk.out" &
        timeout_pid=$!
        # wrk's own time (the child of `timeout`), read just before it ends: a process that
        # ended has no /proc entry.
        sleep "$(python3 -c "print($DURATION - 0.3)")"
        wrk_pid=$(pgrep -P "$timeout_pid" -x wrk || true)
        [[ -n "$wrk_pid" ]] || { echo "wrk is not running in run $run" >&2; exit 1; }
        w=$(ticks "$wrk_pid")
        wait "$timeout_pid"
        s1=$(ticks "$SERVER_PID")
        r1=0
        [[ -n "$REDIS_PID" ]] && r1=$(ticks "$REDIS_PID")
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
        if [[ "$run" == redis ]]; then
            redis-cli -u "$REDIS_URL" --scan --pattern "*cpureq-$id-*" |
                xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null
        fi
        n=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
        [[ -n "$n" && "$n" -gt 0 ]] || { echo "wrk served nothing in run $run" >&2; cat "$WORK/wrk.out" >&2; exit 1; }
        python3 - "$rep" "$run" "$n" "$DURATION" "$HZ" "$((s1 - s0))" "$((r1 - r0))" "$w" "${REDIS_PID:+1}" <<'PY'
import sys
rep, run, n, duration, hz, server, redis, wrk, has_redis = sys.argv[1:10]
n, duration, hz = int(n), float(duration), int(hz)
per = lambda ticks, share=1.0: float(ticks) / hz * 1e6 / (n * share)
# wrk's ticks were read 0.3 s before its end: per request of that share of the run.
wrk_share = (duration - 0.3) / duration
redis_cell = f"{per(redis):.1f}" if run == "redis" else "—"
print(f"| {rep} | {run} | {n / duration:,.0f} | {per(server):.1f} | {redis_cell} | {per(wrk, wrk_share):.1f} |")
PY
    done
done
