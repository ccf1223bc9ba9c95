#!/usr/bin/env python3
"""Fault run: two instances of the orders demo on one shared store, a load of distinct keys
with concurrent duplicates across the instances, and the store killed, paused, dropped or
blackholed for less and for more than the lease; then every key is retried.

Counts, per scenario: double runs (a key with more than one order across both instances),
lost results (a key whose final answer is not the one order it created) and keys that still
answer 409 once the store is back. Exit status 1 if any is not zero.

    python3 scripts/faultrun.py                  # every scenario, Redis, PostgreSQL and MySQL
    python3 scripts/faultrun.py --only redis     # one store
    python3 scripts/faultrun.py --keys 100 --lease-ms 3000

Needs: redis-server on PATH (a private one is started, with appendfsync always, so that a
kill loses nothing it acknowledged), PostgreSQL at DATABASE_URL (default
postgres://postgres@127.0.0.1:5432/test) and MySQL or MariaDB at MYSQL_URL (default
mysql://root@127.0.0.1:3306/test), each only reached through a proxy this script runs and never
stopped, and the demo built with `cargo build --example axum --all-features`. Bounded: each
scenario stops after its outage plus 30 seconds, whatever happens.

On PostgreSQL and MySQL the two demos keep their orders in one table and both list all of
them, so orders are told apart by their id.
"""

import argparse
import asyncio
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Proxy:
    """A TCP proxy that passes, blackholes (holds every byte, keeps connections) or drops
    (closes every connection and every new one)."""

    def __init__(self, upstream_port):
        self.upstream = upstream_port
        self.port = free_port()
        self.mode = "pass"
        self.loop = asyncio.new_event_loop()
        self.changed = None
        self.conns = set()
        threading.Thread(target=self._run, daemon=True).start()
        wait_port(self.port)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.changed = asyncio.Event()
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self.loop.run_forever()
        server.close()

    def set(self, mode):
        def apply():
            self.mode = mode
            self.changed.set()
            self.changed = asyncio.Event()
            if mode == "drop":
                for w in list(self.conns):
                    w.close()
        self.loop.call_soon_threadsafe(apply)

    async def _handle(self, reader, writer):
        if self.mode == "drop":
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        self.conns.update([writer, up_writer])

        async def pump(src, dst):
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    while self.mode == "blackhole":
                        await self.changed.wait()
                    if self.mode == "drop":
                        break
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.conns.discard(writer)
        self.conns.discard(up_writer)


class PrivateRedis:
    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="faultrun-redis-")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        try:
            self.resume()
        except ProcessLookupError:
            pass
        self.proc.kill()
        self.proc.wait()


class Demo:
    def __init__(self, binary, store_url, lease_ms, log):
        self.port = free_port()
        env = dict(os.environ,
                   LISTEN_ADDR=f"127.0.0.1:{self.port}",
                   IDEMPOTENCY_STORE=store_url,
                   IDEMPOTENCY_LEASE_MS=str(lease_ms),
                   ORDER_LATENCY_MS="200",
                   RUST_LOG="warn")
        self.proc = subprocess.Popen([binary], env=env, stdout=log, stderr=log)
        wait_port(self.port)

    def orders(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/orders")
        return json.loads(conn.getresponse().read())

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def post(port, key, timeout=3.0):
    """One attempt: (status, replayed, body) or (None, …) on a transport error/timeout."""
    body = json.dumps({"item": key, "amount": 1})
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", "/orders", body=body, headers={
            "Content-Type": "application/json", "Idempotency-Key": key})
        res = conn.getresponse()
        data = res.read()
        conn.close()
        return res.status, res.getheader("Idempotent-Replayed") == "true", data, res.getheader("Retry-After")
    except (OSError, http.client.HTTPException):
        return None, False, b"", None


def run_load(demos, keys, spread, stop_at, stats):
    """Sends every key until it gets its 201, with duplicates on the other instance; first
    attempts are spread evenly over `spread` seconds, so that operations are in flight
    before, during and after the fault."""
    now = time.time()
    pending = [(now + spread * i / len(keys), key) for i, key in enumerate(keys)]
    lock = threading.Lock()
    results = {}

    def worker():
        while time.time() < stop_at:
            with lock:
                if not pending:
                    return
                ready = [i for i, (at, _) in enumerate(pending[:64]) if at <= time.time()]
                if not ready:
                    item = None
                else:
                    item = pending.pop(ready[0])
            if item is None:
                time.sleep(0.01)
                continue
            key = item[1]
            a, b = random.sample(demos, 2)
            dup = None
            if random.random() < 0.3:
                dup = threading.Thread(target=lambda: stats_add(stats, lock, post(b.port, key)))
                dup.start()
            status, replayed, data, after = post(a.port, key)
            stats_add(stats, lock, (status, replayed, data, after))
            if dup:
                dup.join()
            if status == 201:
                with lock:
                    results[key] = json.loads(data)["id"]
            else:
                # Obey Retry-After (capped at 1 s), jittered.
                delay = min(float(after or 0.2), 1.0) * random.uniform(0.5, 1.0)
                with lock:
                    pending.insert(0, (time.time() + delay, key))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, pending


def stats_add(stats, lock, answer):
    status = answer[0]
    with lock:
        stats[status] = stats.get(status, 0) + 1


FILTER = None


def scenario(binary, name, store_url, fault, restore, outage, lease_ms, nkeys):
    if FILTER and FILTER not in name:
        return 0
    log = tempfile.NamedTemporaryFile(prefix=f"faultrun-{name}-", suffix=".log", delete=False)
    demos = [Demo(binary, store_url, lease_ms, log), Demo(binary, store_url, lease_ms, log)]
    keys = [f"{name}-{uuid.uuid4()}" for _ in range(nkeys)]
    stats = {}
    started = time.time()
    stop_at = started + outage + 30

    def inject():
        time.sleep(1.0)
        fault()
        time.sleep(outage)
        restore()

    injector = threading.Thread(target=inject)
    injector.start()
    results, unfinished = run_load(demos, keys, outage + 3.0, stop_at, stats)
    injector.join()
    # The store is back: every key once more, after a moment for retried completions.
    time.sleep(2.5)
    in_use = 0
    lost = 0
    final_ids = {}
    for key in keys:
        status, replayed, data, _ = post(random.choice(demos).port, key, timeout=10)
        if status == 409:
            in_use += 1
        if status == 201:
            final_ids[key] = json.loads(data)["id"]
    orders = {}
    for demo in demos:
        for order in demo.orders():
            orders.setdefault(order["item"], set()).add(order["id"])
    orders = {item: sorted(ids) for item, ids in orders.items()}
    double = sum(1 for k in keys if len(orders.get(k, [])) > 1)
    for key in keys:
        made = orders.get(key, [])
        if len(made) == 1 and final_ids.get(key) == made[0] and results.get(key, made[0]) == made[0]:
            continue
        if len(made) <= 1:
            lost += 1
    for demo in demos:
        demo.stop()
    took = time.time() - started
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(stats.items(), key=lambda kv: str(kv[0])))
    print(f"{name:<28} outage {outage:>4.1f}s  keys {nkeys}  runs {sum(len(orders.get(k, [])) for k in keys):>4}  "
          f"double {double}  lost {lost}  409-after {in_use}  unfinished-during-load {len(unfinished)}  "
          f"({took:.0f}s; answers {answers}; log {log.name})", flush=True)
    return double + lost + in_use


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["redis", "postgres", "mysql"])
    parser.add_argument("--keys", type=int, default=300)
    parser.add_argument("--lease-ms", type=int, default=3000)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target", "debug", "examples", "axum"))
    parser.add_argument("--scenario", help="run only the scenarios whose name contains this")
    args = parser.parse_args()
    global FILTER
    FILTER = args.scenario
    if not os.path.exists(args.binary):
        sys.exit(f"build the demo first: cargo build --example axum --all-features ({args.binary})")
    lease = args.lease_ms / 1000
    short, long = lease * 0.6, lease * 2
    failures = 0
    print(f"lease {lease}s; outages of {short:.1f}s (shorter than the lease) and {long:.1f}s (longer)")
    if args.only in (None, "redis"):
        redis = PrivateRedis()
        proxy = Proxy(redis.port)
        url = f"redis://127.0.0.1:{proxy.port}"

        def kill():
            redis.kill()

        def restart():
            redis.start()

        try:
            for outage in (short, long):
                failures += scenario(args.binary, "redis-paused", url, redis.pause, redis.resume, outage, args.lease_ms, args.keys)
                failures += scenario(args.binary, "redis-killed", url, kill, restart, outage, args.lease_ms, args.keys)
                failures += scenario(args.binary, "redis-blackholed", url, lambda: proxy.set("blackhole"), lambda: proxy.set("pass"), outage, args.lease_ms, args.keys)
        finally:
            redis.stop()
    for name, var, default, default_port in (
        ("postgres", "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test", 5432),
        ("mysql", "MYSQL_URL", "mysql://root@127.0.0.1:3306/test", 3306),
    ):
        if args.only not in (None, name):
            continue
        db = os.environ.get(var, default)
        scheme, rest = db.split("://", 1)
        creds, hostpart = rest.rsplit("@", 1)
        hostport, dbname = hostpart.split("/", 1)
        port = int(hostport.split(":")[1]) if ":" in hostport else default_port
        proxy = Proxy(port)
        url = f"{scheme}://{creds}@127.0.0.1:{proxy.port}/{dbname}"
        for outage in (short, long):
            failures += scenario(args.binary, f"{name}-dropped", url, lambda p=proxy: p.set("drop"), lambda p=proxy: p.set("pass"), outage, args.lease_ms, args.keys)
            failures += scenario(args.binary, f"{name}-blackholed", url, lambda p=proxy: p.set("blackhole"), lambda p=proxy: p.set("pass"), outage, args.lease_ms, args.keys)
    print("FAIL" if failures else "OK: 0 double runs, 0 lost results, 0 keys at 409 after recovery")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
