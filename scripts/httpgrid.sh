#!/usr/bin/env bash
# Throughput over HTTP of the orders demo (examples/axum.rs, release) with wrk: the layer
# against the same demo with the layer off, repeated and interleaved.
#
#   REDIS_URL=redis://127.0.0.1:6379 CARGO_TARGET_DIR=/work/target-bench bash scripts/httpgrid.sh
#
# Each repetition runs, in this order, each on a demo started for it:
#   off          IDEMPOTENCY_LAYER=off, a new key per request (the baseline);
#   memory-new   the memory store, a new key per request (every request is a first one);
#   memory-replay the memory store, one key for every request (all but the first replay);
#   redis-new    with REDIS_URL: Redis, a new key per request;
#   redis-replay with REDIS_URL: Redis, one key for every request;
#   redis-replay-cached  the same with `cache_replays` on (IDEMPOTENCY_REPLAY_CACHE_MB=64):
#                the demo answers retries from its own copy, not from Redis.
# `POST /orders` declares a commit point (one more store call per first request); the demo
# has no covered route without one. So three more runs use benches/serve.rs, the demo's
# handler less its commit point (`plain` below), against its own layer-off baseline:
#   plain-off, plain-memory-new, plain-redis-new (the last with REDIS_URL).
# Prints one line per run and a summary: the median req/s of each run over the repetitions,
# as a share of `off` from the same repetition, with p50 and p99, and the CPU a request
# cost the server, wrk and (runs on Redis) the Redis server: each process's user + system
# time over the run (the server's and Redis's from /proc/PID/stat, wrk's from the shell's
# reaped children), divided by the requests served. On a machine whose cores the three
# share, that bounds what a ratio to layer off can be. Redis's CPU is read from the process
# listening on REDIS_URL's port, on this machine.
#
# Settings: DURATION (seconds per run, default 10, 1..60), REPS (default 3, 1..10),
# THREADS (wrk threads, 2), CONNECTIONS (32), PORT (3957), RUNS (the runs to make, space
# separated, default all). Only 127.0.0.1 is used. The Redis keys a run made (its keys
# carry the run's own prefix) are deleted after it; no other key is touched.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"
REPS="${REPS:-3}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
PORT="${PORT:-3957}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
(( DURATION >= 1 && DURATION <= 60 )) || { echo "DURATION must be 1..60" >&2; exit 2; }
(( REPS >= 1 && REPS <= 10 )) || { echo "REPS must be 1..10" >&2; exit 2; }
(( THREADS >= 1 && THREADS <= 8 )) || { echo "THREADS must be 1..8" >&2; exit 2; }
(( CONNECTIONS >= THREADS && CONNECTIONS <= 256 )) || { echo "CONNECTIONS must be THREADS..256" >&2; exit 2; }
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }

RUNS="${RUNS:-off memory-new memory-replay redis-new redis-replay redis-replay-cached plain-off plain-memory-new plain-redis-new}"
FEATURES=()
if [[ -n "${REDIS_URL:-}" ]]; then
    FEATURES=(--features redis)
else
    RUNS="$(tr ' ' '\n' <<<"$RUNS" | grep -v redis | tr '\n' ' ')"
fi
nice -n 10 cargo build --release --example axum "${FEATURES[@]}" >&2
DEMO="$CARGO_TARGET_DIR/release/examples/axum"
SERVE=""
if grep -q plain <<<"$RUNS"; then
    SERVE=$(nice -n 10 cargo bench --bench serve "${FEATURES[@]}" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="serve" and m.get("executable"):
        print(m["executable"])')
    [[ -x "$SERVE" ]] || { echo "cannot build benches/serve.rs" >&2; exit 1; }
fi
# Room for every key of a run (the default 64 MiB cap is full within a second), and no
# log lines per request: the runs measure the layer.
export IDEMPOTENCY_MEMORY_MAX_MB="${IDEMPOTENCY_MEMORY_MAX_MB:-8192}"
export RUST_LOG="${RUST_LOG:-warn}"

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

cat >"$WORK/orders.lua" <<'LUA'
local threads = 0
local run_id = os.getenv("RUN_ID")
local body = '{"item":"book","amount":12}'
local same = os.getenv("KEY_MODE") == "same"

function setup(thread)
    threads = threads + 1
    thread:set("prefix", "httpgrid-" .. run_id .. "-t" .. threads .. "-")
    thread:set("same_key", "httpgrid-" .. run_id .. "-replay")
end

local counter = 0
function request()
    local key
    if same then
        key = same_key
    else
        counter = counter + 1
        key = prefix .. counter
    end
    return wrk.format("POST", "/orders", {
        ["Content-Type"] = "application/json",
        ["Idempotency-Key"] = key,
    }, body)
end

function done(summary, latency, requests)
    local secs = summary.duration / 1e6
    io.write(string.format(
        "RESULT rps=%.0f requests=%d p50_us=%d p99_us=%d non2xx=%d errors=%d\n",
        summary.requests / secs, summary.requests,
        latency:percentile(50), latency:percentile(99), summary.errors.status,
        summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA

start_server() { # binary layer store [args]
    LISTEN_ADDR="127.0.0.1:$PORT" IDEMPOTENCY_LAYER="$2" IDEMPOTENCY_STORE="$3" \
        "$1" "${@:4}" >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "the demo did not start on port $PORT" >&2
    exit 1
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

# Deletes the Redis keys of run $1 (they all contain "httpgrid-$1-").
forget_redis_keys() {
    redis-cli -u "$REDIS_URL" --scan --pattern "*httpgrid-$1-*" |
        xargs -r -n 1000 redis-cli -u "$REDIS_URL" unlink >/dev/null
}

# User + system clock ticks of process $1.
ticks() {
    awk '{print $14 + $15}' "/proc/$1/stat"
}
# User + system seconds of this shell's reaped children so far, into CHILDREN (`times` run
# in this shell, not in a command substitution's subshell, which has children of its own).
children_seconds() {
    times >"$WORK/times"
    CHILDREN=$(sed -n 2p "$WORK/times" | python3 -c 'import re,sys
print(sum(int(m)*60+float(s) for m,s in re.findall(r"(\d+)m([\d.]+)s", sys.stdin.read())))')
}
HZ=$(getconf CLK_TCK)
REDIS_PID=""
if grep -q redis <<<"$RUNS"; then
    redis_port=$(sed -E 's#^redis://([^@/]*@)?[^:/]+:?([0-9]*).*#\2#' <<<"$REDIS_URL")
    REDIS_PID=$(ss -ltnpH "sport = :${redis_port:-6379}" | sed -nE 's/.*pid=([0-9]+).*/\1/p' | head -1)
    [[ -n "$REDIS_PID" ]] || echo "no process of this machine listens on Redis's port: its CPU is not read" >&2
fi

echo "# httpgrid: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $REPS repetitions, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for rep in $(seq 1 "$REPS"); do
    for run in $RUNS; do
        case "$run" in
            off) layer=off store=memory mode=unique ;;
            memory-new) layer=on store=memory mode=unique ;;
            memory-replay) layer=on store=memory mode=same ;;
            redis-new) layer=on store="$REDIS_URL" mode=unique ;;
            redis-replay) layer=on store="$REDIS_URL" mode=same ;;
            redis-replay-cached) layer=on store="$REDIS_URL" mode=same ;;
            plain-off) layer=off store=memory mode=unique ;;
            plain-memory-new) layer=on store=memory mode=unique ;;
            plain-redis-new) layer=on store="$REDIS_URL" mode=unique ;;
            *) echo "unknown run $run" >&2; exit 2 ;;
        esac
        id="$(date +%s%N)"
        cache=""
        [[ "$run" == *-cached ]] && cache=64
        export IDEMPOTENCY_REPLAY_CACHE_MB="$cache"
        if [[ "$run" == plain-* ]]; then
            start_server "$SERVE" "$layer" "$store" --serve
        else
            start_server "$DEMO" "$layer" "$store"
        fi
        s0=$(ticks "$SERVER_PID")
        r0=0
        [[ -n "$REDIS_PID" ]] && r0=$(ticks "$REDIS_PID")
        children_seconds
        c0=$CHILDREN
        line=$(RUN_ID="$id" KEY_MODE="$mode" timeout $((DURATION + 30)) \
            wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/orders.lua" \
            "http://127.0.0.1:$PORT/orders" | grep '^RESULT' | sed 's/^RESULT //')
        children_seconds
        c1=$CHILDREN
        s1=$(ticks "$SERVER_PID")
        r1=0
        [[ -n "$REDIS_PID" ]] && r1=$(ticks "$REDIS_PID")
        [[ "$store" == redis* && -n "$REDIS_PID" ]] || r1=$r0
        line="$line server_s=$(python3 -c "print(($s1 - $s0) / $HZ)") redis_s=$(python3 -c "print(($r1 - $r0) / $HZ)") wrk_s=$(python3 -c "print($c1 - $c0)")"
        stop_server
        [[ "$store" == redis* ]] && forget_redis_keys "$id"
        echo "rep=$rep run=$run $line" | tee -a "$WORK/results"
    done
done

echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$WORK/results" "$RUNS" <<'PY'
import statistics, sys
rows = [dict(kv.split("=", 1) for kv in line.split()) for line in open(sys.argv[1])]
runs = sys.argv[2].split()
print()
print("| run | req/s (median of %d) | × its layer off (median of the per-repetition ratios) | p50 µs | p99 µs (median; range) | non-2xx | CPU µs per request: server / Redis / wrk (median) |" % len({r["rep"] for r in rows}))
print("|---|---:|---:|---:|---:|---:|---:|")
def cpu(rs, key):
    return statistics.median(float(r[key]) * 1e6 / int(r["requests"]) for r in rs)
base = {name: {r["rep"]: float(r["rps"]) for r in rows if r["run"] == name} for name in ("off", "plain-off")}
for run in runs:
    rs = [r for r in rows if r["run"] == run]
    if not rs:
        continue
    off = base["plain-off" if run.startswith("plain") else "off"]
    rps = statistics.median(float(r["rps"]) for r in rs)
    ratio = statistics.median(float(r["rps"]) / off[r["rep"]] for r in rs) if off else float("nan")
    p50 = statistics.median(int(r["p50_us"]) for r in rs)
    p99s = sorted(int(r["p99_us"]) for r in rs)
    non2xx = sum(int(r["non2xx"]) for r in rs)
    redis = f"{cpu(rs, 'redis_s'):.1f}" if "redis" in run else "—"
    print(f"| {run} | {rps:,.0f} | {ratio:.2f} | {p50:,.0f} | {statistics.median(p99s):,.0f} ({p99s[0]:,}–{p99s[-1]:,}) | {non2xx} | {cpu(rs, 'server_s'):.1f} / {redis} / {cpu(rs, 'wrk_s'):.1f} |")
PY
