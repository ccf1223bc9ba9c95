#!/usr/bin/env python3
"""Time to the whole answer, per store, with the layer on and off: sequential POSTs with
unique keys on one keep-alive connection against the orders demo, then one replay of each.

With read-your-writes, the last bytes of a first answer leave only once the record is
stored, so "first, layer on" minus "layer off" is what the layer costs a client, the
`complete` round trip included.

    cargo build --release --example axum --all-features
    python3 scripts/latency.py [--requests 500]
"""

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the demo did not start")


def timed_posts(port, keys):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for key in keys:
        body = json.dumps({"item": key, "amount": 1})
        started = time.perf_counter()
        conn.request("POST", "/orders", body=body, headers={
            "Content-Type": "application/json", "Idempotency-Key": key})
        res = conn.getresponse()
        res.read()
        times.append((time.perf_counter() - started) * 1e6)
        assert res.status == 201, res.status
    conn.close()
    return times


def summary(times):
    times = sorted(times)
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def run(binary, store, layer, n):
    port = free_port()
    env = dict(os.environ, LISTEN_ADDR=f"127.0.0.1:{port}", IDEMPOTENCY_STORE=store,
               IDEMPOTENCY_LAYER=layer, RUST_LOG="error")
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        warm = [f"warm-{uuid.uuid4()}" for _ in range(50)]
        timed_posts(port, warm)
        keys = [f"lat-{uuid.uuid4()}" for _ in range(n)]
        first = timed_posts(port, keys)
        replay = timed_posts(port, keys) if layer == "on" else None
        return first, replay
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "examples", "axum"))
    args = parser.parse_args()
    if not os.path.exists(args.binary):
        sys.exit("build first: cargo build --release --example axum --all-features")
    stores = {
        "memory": "memory",
        "redis": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
        "postgres": os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
    }
    print("| store | layer off, median / p99 (µs) | first request, median / p99 | replay, median / p99 | first − off (median) |")
    print("|---|---:|---:|---:|---:|")
    off, _ = run(args.binary, "memory", "off", args.requests)
    off_med, off_p99 = summary(off)
    for name, url in stores.items():
        first, replay = run(args.binary, url, "on", args.requests)
        f_med, f_p99 = summary(first)
        r_med, r_p99 = summary(replay)
        print(f"| {name} | {off_med:.0f} / {off_p99:.0f} | {f_med:.0f} / {f_p99:.0f} | "
              f"{r_med:.0f} / {r_p99:.0f} | +{f_med - off_med:.0f} |", flush=True)


if __name__ == "__main__":
    main()
