#!/usr/bin/env bash
# Load test of the orders demo (examples/axum.rs) with and without the idempotency layer.
#
# Builds the demo in release, then for each run starts it on 127.0.0.1, drives it with wrk
# for DURATION seconds, prints requests/s and latency percentiles, and stops it:
#   1. layer on,  a unique Idempotency-Key per request (every request is a first request);
#   2. layer off (IDEMPOTENCY_LAYER=off), the same requests;
#   3. layer on,  one key for every request (the first runs, all others are replays);
#   4. with REDIS_URL set, 1 and 3 again on Redis.
#
# Settings (environment): DURATION (seconds, default 10, at most 60), THREADS (wrk threads,
# default 2, at most 8), CONNECTIONS (default 32, at most 256), PORT (default 3917; the
# runs use PORT to PORT+4), CARGO_TARGET_DIR (default target).
# Only 127.0.0.1 is used. wrk is installed with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-32}"
PORT="${PORT:-3917}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"

# Keep every run bounded.
(( DURATION >= 1 && DURATION <= 60 )) || { echo "DURATION must be 1..60" >&2; exit 2; }
(( THREADS >= 1 && THREADS <= 8 )) || { echo "THREADS must be 1..8" >&2; exit 2; }
(( CONNECTIONS >= THREADS && CONNECTIONS <= 256 )) || { echo "CONNECTIONS must be THREADS..256" >&2; exit 2; }

if ! command -v wrk >/dev/null 2>&1; then
    echo "==> installing wrk"
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi

# With REDIS_URL set, the layer also runs on Redis (the demo built with `--features redis`).
FEATURES=()
if [[ -n "${REDIS_URL:-}" ]]; then FEATURES=(--features redis); fi
echo "==> cargo build --release --example axum ${FEATURES[*]}"
cargo build --release --example axum "${FEATURES[@]}"
BIN="$CARGO_TARGET_DIR/release/examples/axum"
# Room for every new key of a run in the memory store (its default 64 MiB cap would be full
# within a second, and later requests measured as `503 store-full`).
export IDEMPOTENCY_MEMORY_MAX_MB="${IDEMPOTENCY_MEMORY_MAX_MB:-8192}"
# The demo logs at `info` by default: a span per covered request and a line per replay,
# written to a file here. The runs measure the layer, not the log: `warn` unless set.
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

# Every request: POST /orders with a JSON body. KEY_MODE=unique gives every request its own
# key (a per-run prefix, the wrk thread's number, a counter); KEY_MODE=same one key for all.
cat > "$WORK/orders.lua" <<'LUA'
local threads = 0
local run_id = tostring(os.time()) .. "-" .. tostring(os.clock()):gsub("%.", "")
local body = '{"item":"book","amount":12}'
local same = os.getenv("KEY_MODE") == "same"

function setup(thread)
    threads = threads + 1
    thread:set("prefix", "load-" .. run_id .. "-t" .. threads .. "-")
    thread:set("same_key", "replay-" .. run_id)
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
        "RESULT %s requests=%d rps=%.0f p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d non2xx=%d errors=%d\n",
        os.getenv("RUN_NAME") or "run", summary.requests, summary.requests / secs,
        latency:percentile(50), latency:percentile(90), latency:percentile(99),
        latency:percentile(99.9), latency.max, summary.errors.status,
        summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA

start_server() { # port layer [store]
    LISTEN_ADDR="127.0.0.1:$1" IDEMPOTENCY_LAYER="$2" IDEMPOTENCY_STORE="${3:-memory}" \
        "$BIN" >"$WORK/server-$1.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server-$1.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "the demo did not start on port $1" >&2
    exit 1
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

run() { # name port layer key_mode [store]
    local name="$1" port="$2" layer="$3" mode="$4" store="${5:-memory}"
    echo
    echo "==> $name: layer=$layer store=$store keys=$mode, wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s"
    start_server "$port" "$layer" "$store"
    RUN_NAME="$name" KEY_MODE="$mode" timeout $((DURATION + 30)) \
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$WORK/orders.lua" \
        "http://127.0.0.1:$port/orders" | tee "$WORK/$name.out"
    stop_server
}

echo "==> machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
run layer_unique_keys "$PORT" on unique
run bare_unique_keys "$((PORT + 1))" off unique
run layer_replays "$((PORT + 2))" on same
if [[ -n "${REDIS_URL:-}" ]]; then
    run redis_unique_keys "$((PORT + 3))" on unique "$REDIS_URL"
    run redis_replays "$((PORT + 4))" on same "$REDIS_URL"
fi

echo
echo "==> summary (latencies in µs)"
grep -h '^RESULT' "$WORK"/*.out | sed 's/^RESULT //' | column -t
