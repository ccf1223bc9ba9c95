#!/usr/bin/env python3
"""Fault run of the surfaces: the commit point, the lost COMMIT reply, the gateway and the
operator's settle, each under its fault; counts double runs, lost answers and stuck keys.

A sibling of `scripts/faultrun.py` (which breaks the store under a load of keys): here each
scenario breaks one surface the library promises something about, then retries every key
and checks what it ends with.

1. `redis-pause-5s`, `redis-pause-10s`: two orders demos on a private Redis, their handlers
   slowed (`ORDER_LATENCY_MS`) so that many keys reach `claim.commit()` while Redis is
   paused (SIGSTOP) for longer than the store timeout (2 s) and the lease (2 s); then
   SIGCONT. A commit that timed out must be withdrawn (fenced `revoke`) when it lands late:
   every key ends 201 with exactly one order.
2. `postgres-lost-commit`, `mysql-lost-commit`: two orders demos whose order transaction
   carries the commit point (`commit_in`), reached through a proxy that forwards a fraction
   of the clients' `COMMIT`s, lets the database answer, and cuts the connection before the
   answer reaches the client: the order is committed, the handler answers 503. Retries must
   get the recovery hook's 201 with that order, never a second order nor a replayed 503.
3. `gateway`: the gateway (memory store, shared scope, `UPSTREAM_TIMEOUT_MS=500`) in front
   of an upstream in this script that counts runs per key and, on a key's first run, drops
   the connection after reading the request (`drop`: 502 upstream-failed, stored), hangs
   past the timeout (`hang`: 504 upstream-timeout, stored) or answers 201 (`ok`); a first
   phase sends keys while nothing listens (`down`: 502 upstream-unreachable, the key
   released), then the upstream comes up and they are retried (201, one run).
4. `settle`: a demo killed (SIGKILL) between its commit point and its answer on Redis (its
   orders live in its memory, so the other instance's recovery hook finds nothing:
   `500 outcome-unknown`); `keys settle --ttl 0` must be refused, `keys settle` with a
   201 must then be replayed to every retry (also for a key settled with `--ttl 1`, past
   that second: settling never shortens retention), and nothing runs again.

Counts per scenario: *double*, keys that ran more than once (orders per key across both
instances; upstream runs per key); *lost*, keys whose final answer is not the one their
single run gave (or should have given); *stuck*, keys still answering 409, `500
outcome-unknown` or a replayed 503 at the end. Exit status 1 if any is not zero.

    cargo build --example axum --example gateway --example keys --all-features
    python3 scripts/faultrun_surfaces.py                    # every scenario
    python3 scripts/faultrun_surfaces.py --only gateway     # one (redis-pause, lost-commit,
                                                            # gateway, settle)
    python3 scripts/faultrun_surfaces.py --keys 200 --cut-fraction 1.0

The binaries are copied from target/debug/examples (or `--bin-dir`) when the run starts, so
that another build in the shared target directory cannot swap them midway; a build without
the store features is refused.

Needs: redis-server on PATH (a private one is started and stopped; the shared one is never
touched), PostgreSQL at DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test) and
MySQL or MariaDB at MYSQL_URL (default mysql://root@127.0.0.1:3306/test), reached only
through this script's proxy and never stopped, and psql and mysql on PATH to create a fresh
database for the run (`faultrun_surfaces_<pid>`) and drop it afterwards (without them, or
without the right to create one, the given database is used and this run's rows are deleted
from it afterwards). Python 3.11 standard library only; only 127.0.0.1. Bounded: each
scenario gives up 60 s after it started, whatever happens.
"""

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the example binaries are run from: a copy, taken at the start, of those built in
# the target directory (another build there must not swap them in the middle of a run).
EXAMPLES = None
SCENARIO_LIMIT = 60.0  # seconds: every scenario stops by then
RUN = uuid.uuid4().hex[:8]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process for port {port} exited ({proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# ---------------------------------------------------------------------------------------
# HTTP client side


class Answer:
    """One attempt's answer; `status` None on a transport error or a timeout."""

    def __init__(self, status=None, replayed=False, body=b"", retry_after=None, error=None):
        self.status = status
        self.replayed = replayed
        self.body = body
        self.retry_after = retry_after
        self.error = error

    @property
    def kind(self):
        """The problem kind (`outcome-unknown`, `upstream-failed`, …), if the body is one."""
        try:
            doc = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(doc, dict) and isinstance(doc.get("type"), str):
            return doc["type"].rsplit("#", 1)[-1]
        return None

    def json(self):
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None

    def label(self):
        if self.status is None:
            return "no answer"
        out = str(self.status)
        if self.status >= 400 and self.kind:
            out += f" {self.kind}"
        if self.replayed:
            out += " (replayed)"
        return out


def request(port, method, path, key=None, body=None, timeout=20.0, headers=None):
    hdrs = dict(headers or {})
    if body is not None:
        hdrs.setdefault("Content-Type", "application/json")
    if key is not None:
        hdrs["Idempotency-Key"] = key
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request(method, path, body=body, headers=hdrs)
        res = conn.getresponse()
        data = res.read()
        conn.close()
        return Answer(res.status, res.getheader("Idempotent-Replayed") == "true", data,
                      res.getheader("Retry-After"))
    except (OSError, http.client.HTTPException) as e:
        return Answer(error=f"{type(e).__name__}: {e}")


def order_body(key):
    return json.dumps({"item": key, "amount": 1})


def post_order(port, key, timeout=20.0):
    return request(port, "POST", "/orders", key=key, body=order_body(key), timeout=timeout)


def pause_after(answer, cap=1.0):
    try:
        after = float(answer.retry_after) if answer.retry_after else 0.2
    except ValueError:
        after = 0.2
    return min(max(after, 0.05), cap) * random.uniform(0.5, 1.0)


def drive(keys, send, done, deadline, start_at=None, workers=16, dup=None):
    """Sends every key (its first attempt at `start_at[key]`, if given) and retries it, after
    `Retry-After` capped at 1 s, until `done(answer)` or `deadline`. `dup(key)`, if given,
    says whether a first attempt also goes, at the same time, to another instance (through
    `send(key, other=True)`). Returns every answer per key, in order."""
    now = time.time()
    queue = [((start_at or {}).get(key, now), key, True) for key in keys]
    queue.sort()
    lock = threading.Lock()
    answers = {key: [] for key in keys}

    def record(key, answer):
        with lock:
            answers[key].append(answer)

    def worker():
        while time.time() < deadline:
            with lock:
                item = None
                for i, (at, _, _) in enumerate(queue[:64]):
                    if at <= time.time():
                        item = queue.pop(i)
                        busy[0] += 1
                        break
                if item is None and not queue and busy[0] == 0:
                    return
            if item is None:
                time.sleep(0.01)
                continue
            _, key, first = item
            twin = None
            if first and dup is not None and dup(key):
                twin = threading.Thread(target=lambda k=key: record(k, send(k, True)), daemon=True)
                twin.start()
            answer = send(key, False)
            record(key, answer)
            if twin:
                twin.join(timeout=max(0.0, deadline - time.time()))
            with lock:
                busy[0] -= 1
                if not done(answer) and time.time() < deadline:
                    queue.append((time.time() + pause_after(answer), key, False))
                    queue.sort()

    busy = [0]
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.time()) + 25)
    return answers


def histogram(answers):
    counts = Counter(a.label() for per_key in answers.values() for a in per_key)
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


# ---------------------------------------------------------------------------------------
# Processes


class PrivateRedis:
    """A redis-server of this run's own, on a free port (never the shared one)."""

    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="faultrun-surfaces-redis-")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        self.url = f"redis://127.0.0.1:{self.port}"

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisMonitor:
    """`MONITOR` on the private Redis: which store scripts ran, and when (Redis's clock).
    Tells the late commits (delivered after the pause) and the revokes that withdrew them."""

    def __init__(self, port):
        self.lines = []
        self.names = {}
        try:
            with open(os.path.join(ROOT, "src", "store", "redis", "scripts.rs"), encoding="utf-8") as f:
                source = f.read()
            for name, code in re.findall(r'const (\w+)_LUA: &str = r#"(.*?)"#;', source, re.S):
                self.names[hashlib.sha1(code.encode()).hexdigest()] = name.lower()
        except OSError:
            pass
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                buf += data
                *lines, buf = buf.split(b"\r\n")
                for line in lines:
                    m = re.match(rb'\+(\d+\.\d+) \[\d+ [^\]]*\] "(?:EVALSHA|evalsha)" "([0-9a-f]{40})"', line)
                    if m:
                        self.lines.append((float(m.group(1)), self.names.get(m.group(2).decode(), "?")))
        except OSError:
            return

    def count(self, script, after, before=float("inf")):
        return sum(1 for at, name in self.lines if name == script and after <= at < before)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Service:
    """One of the example binaries, on a free port, logging to a file."""

    def __init__(self, binary, env, log_name, port_var="LISTEN_ADDR", port=None):
        self.port = port or free_port()
        self.log_path = tempfile.NamedTemporaryFile(
            prefix=f"faultrun-surfaces-{log_name}-", suffix=".log", delete=False).name
        self.log = open(self.log_path, "ab")
        env = dict(os.environ, **{port_var: f"127.0.0.1:{self.port}"}, **env)
        env.setdefault("RUST_LOG", "warn")
        self.proc = subprocess.Popen([os.path.join(EXAMPLES, binary)], env=env,
                                     stdout=self.log, stderr=self.log)
        try:
            wait_port(self.port, proc=self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"{binary} did not start; see {self.log_path}")

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def orders(self):
        answer = request(self.port, "GET", "/orders", timeout=15)
        if answer.status != 200:
            raise RuntimeError(f"GET /orders answered {answer.label()}: {answer.body[:200]!r}")
        return answer.json()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def demo(store, log_name, **env):
    return Service("axum", dict({"IDEMPOTENCY_STORE": store}, **{k: str(v) for k, v in env.items()}),
                   log_name)


def orders_by_key(demos, keys):
    """The ids of the orders made under each key, across the instances (orders carry their
    key as their item; on SQL both instances list the same orders, so ids are a set)."""
    wanted = set(keys)
    out = {key: set() for key in keys}
    for d in demos:
        for order in d.orders():
            if order["item"] in wanted:
                out[order["item"]].add(order["id"])
    return out


# ---------------------------------------------------------------------------------------
# Proxies


class Proxy:
    """A TCP proxy on its own event loop. `inspector`, if given, is a factory of one object
    per connection whose `feed(bytes)` returns (bytes to forward, cut): with `cut`, the
    bytes (ending with the client's COMMIT) are forwarded, the database's answer to them is
    read and thrown away, and both connections are closed: the transaction committed, its
    client never hears it."""

    def __init__(self, upstream_port, inspector=None):
        self.upstream = upstream_port
        self.inspector = inspector
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.cuts = 0
        self.commits = 0
        threading.Thread(target=self._run, daemon=True).start()
        wait_port(self.port)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        inspect = self.inspector(self) if self.inspector else None
        cut = asyncio.Event()

        async def client_to_server():
            try:
                while not cut.is_set():
                    data = await reader.read(65536)
                    if not data:
                        break
                    if inspect is not None:
                        data, cutting = inspect.feed(data)
                        if cutting:
                            cut.set()
                    up_writer.write(data)
                    await up_writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                if not cut.is_set():
                    up_writer.close()

        async def server_to_client():
            try:
                while True:
                    data = await up_reader.read(65536)
                    if not data:
                        break
                    if cut.is_set():
                        # The database's answer to the COMMIT: thrown away, and both
                        # connections closed before the client hears anything.
                        break
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.close()
                up_writer.close()

        await asyncio.gather(client_to_server(), server_to_client())


class PgCommitCutter:
    """Reads the PostgreSQL frontend stream: a simple query `COMMIT` ('Q'), or a Parse of
    `COMMIT` in the extended protocol (cut after the Sync that follows)."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.buf = b""
        self.startup = True
        self.pending = False

    def feed(self, data):
        self.buf += data
        out = b""
        while True:
            if self.startup:
                if len(self.buf) < 8:
                    break
                n = int.from_bytes(self.buf[:4], "big")
                if len(self.buf) < n:
                    break
                code = int.from_bytes(self.buf[4:8], "big")
                out += self.buf[:n]
                self.buf = self.buf[n:]
                if code not in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                    self.startup = False
                continue
            if len(self.buf) < 5:
                break
            n = 1 + int.from_bytes(self.buf[1:5], "big")
            if len(self.buf) < n:
                break
            msg, self.buf = self.buf[:n], self.buf[n:]
            out += msg
            kind, payload = msg[:1], msg[5:]
            sql = None
            if kind == b"Q":
                sql = payload.split(b"\0", 1)[0]
            elif kind == b"P":
                parts = payload.split(b"\0", 2)
                sql = parts[1] if len(parts) > 1 else None
            if sql is not None and sql.strip().rstrip(b";").strip().upper() == b"COMMIT":
                self.proxy.commits += 1
                if self.proxy.decide():
                    if kind == b"Q":
                        self.proxy.cuts += 1
                        return out, True
                    self.pending = True
            if kind == b"S" and self.pending:
                self.proxy.cuts += 1
                return out, True
        return out, False


class MySqlCommitCutter:
    """Reads the MySQL client stream: a COM_QUERY (0x03) of `COMMIT` (sequence id 0)."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.buf = b""

    def feed(self, data):
        self.buf += data
        out = b""
        while len(self.buf) >= 4:
            n = 4 + int.from_bytes(self.buf[:3], "little")
            if len(self.buf) < n:
                break
            packet, self.buf = self.buf[:n], self.buf[n:]
            out += packet
            seq, payload = packet[3], packet[4:]
            if seq == 0 and payload[:1] == b"\x03" and \
                    payload[1:].strip().rstrip(b";").strip().upper() == b"COMMIT":
                self.proxy.commits += 1
                if self.proxy.decide():
                    self.proxy.cuts += 1
                    return out, True
        return out, False


def cutting_proxy(port, cutter, fraction):
    proxy = Proxy(port, cutter)
    proxy.armed = False

    def decide():
        return proxy.armed and random.random() < fraction

    proxy.decide = decide
    return proxy


# ---------------------------------------------------------------------------------------
# Results


class Result:
    def __init__(self, name, keys):
        self.name = name
        self.keys = keys
        self.double = 0
        self.lost = 0
        self.stuck = 0
        self.notes = []
        self.failures = []
        self.started = time.time()
        self.took = 0.0

    def fail(self, what):
        self.failures.append(what)

    def line(self):
        ok = "ok" if not (self.double or self.lost or self.stuck or self.failures) else "FAIL"
        out = (f"{self.name:<22} keys {self.keys:>3}  double {self.double}  lost {self.lost}  "
               f"stuck {self.stuck}  ({self.took:.1f}s) {ok}")
        for note in self.notes:
            out += f"\n    {note}"
        for f in self.failures:
            out += f"\n    FAILED: {f}"
        return out

    def bad(self):
        return self.double + self.lost + self.stuck + len(self.failures)


def judge_orders(result, keys, answers, demos):
    """Double runs, lost answers and stuck keys of an orders scenario, from the answers of
    the retries, a final pass on every instance, and the orders both instances list."""
    final = {}
    for key in keys:
        final[key] = [post_order(d.port, key, timeout=15) for d in demos]
    made = orders_by_key(demos, keys)
    examples = []
    for key in keys:
        ids = made[key]
        ends = final[key]
        if len(ids) > 1:
            result.double += 1
            examples.append(f"{key}: {len(ids)} orders")
            continue
        if any(a.status in (409, 503) or a.status is None
               or (a.status == 500 and a.kind == "outcome-unknown") for a in ends):
            result.stuck += 1
            examples.append(f"{key}: ends {[a.label() for a in ends]}")
            continue
        got = {(a.json() or {}).get("id") for a in ends if a.status == 201}
        firsts = {(a.json() or {}).get("id") for a in answers[key] if a.status == 201}
        if len(ids) == 1 and all(a.status == 201 and a.replayed for a in ends) and got == ids \
                and firsts <= ids:
            continue
        result.lost += 1
        examples.append(f"{key}: orders {sorted(ids)}, ends {[a.label() for a in ends]}, "
                        f"201s seen {sorted(x for x in firsts if x)}")
    for e in examples[:5]:
        result.notes.append(e)
    return final


# ---------------------------------------------------------------------------------------
# 1. A long Redis pause at the commit point


def redis_pause(pause, nkeys):
    name = f"redis-pause-{pause:.0f}s"
    result = Result(name, nkeys)
    deadline = result.started + SCENARIO_LIMIT - 12  # leaves the final pass its time
    redis = PrivateRedis()
    demos = []
    try:
        env = dict(IDEMPOTENCY_LEASE_MS=2000, ORDER_LATENCY_MS=1000)
        demos = [demo(redis.url, f"{name}-a", **env), demo(redis.url, f"{name}-b", **env)]
        monitor = RedisMonitor(redis.port)
        keys = [f"{name}-{RUN}-{i}" for i in range(nkeys)]
        # First attempts over 1.2 s; Redis paused 0.9 s in: three quarters of the keys are
        # claimed before and sleep (1 s) into commit() during the pause, the rest are
        # claimed during it.
        t0 = time.time() + 0.2
        start_at = {key: t0 + 1.2 * i / nkeys for i, key in enumerate(keys)}
        ran_into = {"paused": None}

        def fault():
            time.sleep(max(0.0, t0 + 0.9 - time.time()))
            ran_into["paused"] = time.time()
            redis.pause()
            time.sleep(pause)
            redis.resume()
            ran_into["resumed"] = time.time()

        injector = threading.Thread(target=fault, daemon=True)
        injector.start()

        def send(key, other):
            a, b = demos if hash(key) % 2 else demos[::-1]
            return post_order((b if other else a).port, key,
                              timeout=min(pause + 15, max(1.0, deadline + 5 - time.time())))

        answers = drive(keys, send, lambda a: a.status == 201, deadline, start_at=start_at,
                        dup=lambda k: random.random() < 0.3, workers=nkeys + 4)
        injector.join()
        result.notes.append(f"answers: {histogram(answers)}")
        judge_orders(result, keys, answers, demos)
        text = "".join(d.log_text() for d in demos)
        unconfirmed = text.count("the commit point could not be confirmed")
        paused_at = ran_into["paused"]
        # What Redis ran in the burst after the resume is what was queued during the pause
        # (a new request's commit comes 1 s after its claim, at the earliest).
        burst = (ran_into["paused"], ran_into["resumed"] + 0.5)
        result.notes.append(
            f"commits not confirmed (store timeout): {unconfirmed}; queued during the pause "
            f"and run at the resume: commit {monitor.count('commit', *burst)}, claim "
            f"{monitor.count('claim', *burst)}, extend {monitor.count('extend', *burst)}; "
            f"revokes after the pause: {monitor.count('revoke', ran_into['paused'])}")
        monitor.close()
    finally:
        for d in demos:
            d.stop()
        redis.stop()
        result.took = time.time() - result.started
    return result


# ---------------------------------------------------------------------------------------
# 2. The reply to COMMIT lost, on PostgreSQL and MySQL


def sql_admin(scheme, url, sql):
    """Runs `sql` with psql or mysql on the server of `url`; None if it could not."""
    u = urlsplit(url)
    if scheme == "postgres":
        if not shutil.which("psql"):
            return None
        cmd = ["psql", url, "-v", "ON_ERROR_STOP=1", "-tAc", sql]
        env = dict(os.environ)
    else:
        if not shutil.which("mysql"):
            return None
        cmd = ["mysql", "--protocol=tcp", "-h", u.hostname or "127.0.0.1",
               "-P", str(u.port or 3306), "-u", u.username or "root", "-N", "-e", sql,
               u.path.lstrip("/") or "mysql"]
        env = dict(os.environ, MYSQL_PWD=u.password or "")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return None
    return done.stdout


def with_db(url, db):
    u = urlsplit(url)
    return u._replace(path=f"/{db}").geturl()


def with_port(url, port):
    u = urlsplit(url)
    creds = u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else ""
    return u._replace(netloc=f"{creds}127.0.0.1:{port}").geturl()


def lost_commit(kind, url, nkeys, fraction):
    name = f"{kind}-lost-commit"
    result = Result(name, nkeys)
    deadline = result.started + SCENARIO_LIMIT - 12
    fresh = f"faultrun_surfaces_{os.getpid()}"
    keys = [f"{name}-{RUN}-{i}" for i in range(nkeys)]
    if sql_admin(kind, url, f"CREATE DATABASE {fresh}") is not None:
        target = with_db(url, fresh)
        cleanup = lambda: sql_admin(kind, url, f"DROP DATABASE IF EXISTS {fresh}" +
                                    (" WITH (FORCE)" if kind == "postgres" else ""))
        result.notes.append(f"database {fresh}, created for the run and dropped after")
    else:
        target = url
        like = f"{name}-{RUN}-%"
        cleanup = lambda: sql_admin(kind, url, f"DELETE FROM demo_orders WHERE item LIKE '{like}'")
        result.notes.append(f"could not create a database: this run's rows in {url} are deleted after")
    u = urlsplit(target)
    port = u.port or (5432 if kind == "postgres" else 3306)
    cutter = PgCommitCutter if kind == "postgres" else MySqlCommitCutter
    proxy = cutting_proxy(port, cutter, fraction)
    store = with_port(target, proxy.port)
    # The proxy reads the protocol in the clear.
    store += ("&" if u.query else "?") + ("sslmode=disable" if kind == "postgres" else "ssl-mode=disabled")
    demos = []
    try:
        env = dict(IDEMPOTENCY_LEASE_MS=2000, ORDER_LATENCY_MS=50, RUST_LOG="info")
        demos = [demo(store, f"{name}-a", **env), demo(store, f"{name}-b", **env)]
        proxy.armed = True
        t0 = time.time()
        start_at = {key: t0 + 3.0 * i / nkeys for i, key in enumerate(keys)}

        def send(key, other):
            a, b = demos if hash(key) % 2 else demos[::-1]
            return post_order((b if other else a).port, key,
                              timeout=min(20, max(1.0, deadline + 5 - time.time())))

        # While COMMITs are being cut, only first attempts (and their duplicates): a key's
        # retries come after, when every COMMIT goes through.
        first = drive(keys, send, lambda a: True, t0 + 20, start_at=start_at,
                      dup=lambda k: random.random() < 0.3)
        proxy.armed = False
        cut_first = histogram(first)
        answers = drive(keys, send, lambda a: a.status == 201, deadline)
        for key in keys:
            answers[key] = first[key] + answers[key]
        result.notes.append(f"COMMITs seen by the proxy while armed and after: {proxy.commits}, "
                            f"cut: {proxy.cuts}")
        result.notes.append(f"answers while COMMITs were cut: {cut_first}")
        result.notes.append(f"answers: {histogram(answers)}")
        cut_answer = next((a for k in keys for a in first[k] if a.status == 503), None)
        if cut_answer is not None:
            result.notes.append(f"a cut order's first answer: {cut_answer.status} "
                                f"{cut_answer.body[:160].decode('utf-8', 'replace')!r}")
        if proxy.cuts == 0:
            result.fail("no COMMIT was cut: the scenario tested nothing")
        judge_orders(result, keys, answers, demos)
        recovered = sum(d.log_text().count("recovered the answer of a committed order") for d in demos)
        result.notes.append(f"answers rebuilt by the recovery hook: {recovered}")
    finally:
        for d in demos:
            d.stop()
        cleanup()
        result.took = time.time() - result.started
    return result


# ---------------------------------------------------------------------------------------
# 3. The gateway in front of a misbehaving upstream


class Upstream(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 upstream that counts runs per key (the request was read whole) and, on a
    key's first run, behaves as the key's mode says: `drop` closes the connection without a
    word, `hang` waits `hang` seconds (past the gateway's timeout) before answering, `ok`
    (and `down`) answers 201. Later runs of any key answer 201 (a run counted twice is a
    double run)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the default 5 drops connections under load: 502 unreachable

    def __init__(self, port, hang):
        self.runs = Counter()
        self.lock = threading.Lock()
        self.hang = hang
        super().__init__(("127.0.0.1", port), UpstreamHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class UpstreamHandler(socketserver.StreamRequestHandler):
    def handle(self):
        server = self.server
        while True:
            line = self.rfile.readline(65537)
            if not line:
                return
            if line in (b"\r\n", b"\n"):
                continue
            headers = {}
            while True:
                h = self.rfile.readline(65537)
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                body = self.rfile.read(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    body += self.rfile.read(size)
                    self.rfile.readline()
            else:
                body = b""
            key = headers.get("idempotency-key", "")
            mode = key.split("-")[1] if key.count("-") >= 2 else "ok"
            with server.lock:
                server.runs[key] += 1
                run = server.runs[key]
            if run == 1 and mode == "drop":
                self.request.shutdown(socket.SHUT_RDWR)
                return
            if run == 1 and mode == "hang":
                time.sleep(server.hang)
            out = json.dumps({"key": key, "run": run, "bytes": len(body)}).encode()
            try:
                self.wfile.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: " + str(len(out)).encode() + b"\r\n\r\n" + out)
                self.wfile.flush()
            except OSError:
                return
            if run == 1 and mode == "hang":
                return


def gateway(nkeys):
    name = "gateway"
    result = Result(name, 0)
    deadline = result.started + SCENARIO_LIMIT - 8
    timeout_ms = 500
    up_port = free_port()
    modes = ["ok", "drop", "hang", "down"]
    per = max(1, nkeys // len(modes))
    keys = {m: [f"gw-{m}-{RUN}-{i}" for i in range(per)] for m in modes}
    every = [k for m in modes for k in keys[m]]
    result.keys = len(every)
    gw = Service("gateway", dict(UPSTREAM_URL=f"http://127.0.0.1:{up_port}",
                                 IDEMPOTENCY_SHARED_SCOPE="1", IDEMPOTENCY_STORE="memory",
                                 IDEMPOTENCY_LEASE_MS="2000",
                                 UPSTREAM_TIMEOUT_MS=str(timeout_ms)), name)
    upstream = None
    try:
        def send(key, other=False):
            return request(gw.port, "POST", "/payments", key=key,
                           body=json.dumps({"key": key, "amount": 12}), timeout=10)

        # Phase 1: nothing listens upstream: refused, 502 upstream-unreachable, released.
        down_answers = {k: [send(k), send(k)] for k in keys["down"]}
        # Phase 2: the upstream comes up; every key is sent (three in ten twice at once) and
        # retried until it has an answer that is not 409 nor 502 upstream-unreachable (the
        # key was released: nothing reached the upstream).
        upstream = Upstream(up_port, hang=timeout_ms / 1000 * 4)
        unreachable = lambda a: a.status == 502 and a.kind == "upstream-unreachable"
        answers = drive(every, send, lambda a: a.status not in (409, None) and not unreachable(a),
                        deadline, dup=lambda k: random.random() < 0.3)
        # Then every key three times more: each must replay the answer it ended with.
        time.sleep(0.5)
        again = {k: [send(k) for _ in range(3)] for k in every}
        for k in keys["down"]:
            answers[k] = down_answers[k] + answers[k]
        expect = {"ok": (201, None), "down": (201, None), "drop": (502, "upstream-failed"),
                  "hang": (504, "upstream-timeout")}
        examples = []
        for m in modes:
            for k in keys[m]:
                runs = upstream.runs.get(k, 0)
                status, kind = expect[m]
                definitive = [a for a in answers[k]
                              if a.status not in (409, None) and not unreachable(a)]
                first = definitive[0] if definitive else None
                ends = again[k]
                if runs > 1:
                    result.double += 1
                    examples.append(f"{k}: {runs} upstream runs")
                    continue
                if any(a.status in (409, None) or (a.status == 503 and a.replayed) for a in ends):
                    result.stuck += 1
                    examples.append(f"{k}: ends {[a.label() for a in ends]}")
                    continue
                good = (first is not None and first.status == status and first.kind == kind
                        and runs == 1
                        and all(a.status == first.status and a.replayed and a.body == first.body
                                for a in ends))
                if not good:
                    result.lost += 1
                    examples.append(f"{k}: runs {runs}, first {first.label() if first else None}, "
                                    f"ends {[a.label() for a in ends]}")
        if any(a.status != 502 or a.kind != "upstream-unreachable" or a.replayed
               for k in keys["down"] for a in down_answers[k]):
            result.fail("a request with the upstream down was not answered 502 "
                        "upstream-unreachable (not replayed) each time: "
                        f"{[a.label() for k in keys['down'] for a in down_answers[k]]}")
        for m in modes:
            ended = Counter(again[k][-1].label() for k in keys[m])
            runs = Counter(upstream.runs.get(k, 0) for k in keys[m])
            result.notes.append(f"{m:<4} ({len(keys[m])} keys): ends {dict(ended)}; "
                                f"upstream runs per key {dict(sorted(runs.items()))}")
        result.notes.append(f"answers: {histogram(answers)}")
        for e in examples[:5]:
            result.notes.append(e)
    finally:
        gw.stop()
        if upstream is not None:
            upstream.shutdown()
            upstream.server_close()
        result.took = time.time() - result.started
    return result


# ---------------------------------------------------------------------------------------
# 4. An operator settles keys whose outcome is unknown


def keys_tool(*args):
    done = subprocess.run([os.path.join(EXAMPLES, "keys"), *args], capture_output=True,
                          text=True, timeout=30)
    return done.returncode, done.stdout + done.stderr


def settle(nkeys):
    name = "settle"
    result = Result(name, nkeys)
    redis = PrivateRedis()
    first = second = None
    try:
        keys = [f"settle-{RUN}-{i}" for i in range(nkeys)]
        # The first instance commits each order, then waits 30 s before answering; it is
        # killed in that wait. Its orders die with it (they live in its memory).
        first = demo(redis.url, "settle-a", IDEMPOTENCY_LEASE_MS=1000,
                     ORDER_AFTER_COMMIT_MS=30000, RUST_LOG="info")
        threads = [threading.Thread(target=post_order, args=(first.port, k, 40), daemon=True)
                   for k in keys]
        for t in threads:
            t.start()
        until = time.time() + 15
        while time.time() < until and first.log_text().count("order committed") < nkeys:
            time.sleep(0.05)
        committed = first.log_text().count("order committed")
        if committed < nkeys:
            result.fail(f"only {committed} of {nkeys} orders committed")
        first.kill()
        second = demo(redis.url, "settle-b", IDEMPOTENCY_LEASE_MS=1000)
        time.sleep(2.5)  # past the dead instance's lease and its contest
        before = {k: post_order(second.port, k, timeout=15) for k in keys}
        unknown = sum(1 for a in before.values() if a.status == 500 and a.kind == "outcome-unknown")
        result.notes.append(f"{committed} orders committed by the killed instance; retries "
                            f"then: {dict(Counter(a.label() for a in before.values()))}")
        if unknown != nkeys:
            result.fail(f"{nkeys - unknown} keys were not outcome-unknown after the crash")
        # --ttl 0 is refused and changes nothing.
        code, out = keys_tool(redis.url, "settle", keys[0], "--status", "201", "--ttl", "0",
                              "--body", "{}")
        code_i, inspected = keys_tool(redis.url, "inspect", keys[0])
        result.notes.append(f"settle --ttl 0: exit {code}, {out.strip()!r}")
        if code == 0 or "outcome unknown" not in inspected:
            result.fail(f"settle --ttl 0 was not refused, or changed the key: {out!r}, "
                        f"then {inspected!r}")
        settled = {}
        for i, k in enumerate(keys):
            body = json.dumps({"id": f"settled-{RUN}-{i}", "item": k, "amount": 1})
            ttl = ["--ttl", "1"] if i == 0 else []
            code, out = keys_tool(redis.url, "settle", k, "--status", "201", "--header",
                                  "content-type: application/json", "--body", body, *ttl)
            if code != 0:
                result.fail(f"settle {k}: exit {code}: {out.strip()}")
            settled[k] = body.encode()
        code, inspected = keys_tool(redis.url, "inspect", keys[0])
        state = next((l for l in inspected.splitlines() if l.startswith("state:")), inspected.strip())
        result.notes.append(f"settled with --ttl 1, then inspected: {state!r}")
        # A second settle of the same key is refused (it is no longer outcome-unknown).
        code, out = keys_tool(redis.url, "settle", keys[1 % nkeys], "--status", "200")
        if code == 0:
            result.fail(f"a settled key was settled again: {out!r}")
        time.sleep(2.0)  # past --ttl 1: the committed key is kept as long as it was to be
        after = {k: [post_order(second.port, k, timeout=15) for _ in range(3)] for k in keys}
        for k in keys:
            ends = after[k]
            if any(a.status in (409, None, 503) or (a.status == 500) for a in ends):
                result.stuck += 1
                result.notes.append(f"{k}: ends {[a.label() for a in ends]}")
            elif not all(a.status == 201 and a.replayed and a.body == settled[k] for a in ends):
                result.lost += 1
                result.notes.append(f"{k}: ends {[a.label() for a in ends]}")
        made = orders_by_key([second], keys)
        reran = sum(len(ids) for ids in made.values())
        result.double = sum(1 for ids in made.values() if ids)  # one run each already
        result.notes.append(f"orders made again by the surviving instance: {reran}; retries "
                            f"after settling: {dict(Counter(a.label() for v in after.values() for a in v))}")
    finally:
        if first is not None:
            first.kill()
        if second is not None:
            second.stop()
        redis.stop()
        result.took = time.time() - result.started
    return result


# ---------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["redis-pause", "lost-commit", "gateway", "settle"])
    parser.add_argument("--keys", type=int, default=60, help="keys per scenario (default 60)")
    parser.add_argument("--bin-dir", help="where the example binaries are (default: "
                        "$CARGO_TARGET_DIR or target/, then debug/examples)")
    parser.add_argument("--cut-fraction", type=float, default=0.4,
                        help="the fraction of COMMITs whose reply is lost (default 0.4)")
    args = parser.parse_args()
    # A SIGTERM runs the scenarios' cleanup (a paused Redis resumed and stopped, the demos
    # stopped, the fresh databases dropped) as Ctrl-C does.
    def terminated(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
        sys.exit(143)

    signal.signal(signal.SIGTERM, terminated)
    global EXAMPLES
    built = args.bin_dir or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "examples")
    for binary in ("axum", "gateway", "keys"):
        if not os.path.exists(os.path.join(built, binary)):
            sys.exit(f"build the examples first: cargo build --example axum --example gateway "
                     f"--example keys --all-features (no {binary} in {built})")
    EXAMPLES = tempfile.mkdtemp(prefix="faultrun-surfaces-bin-")
    for binary in ("axum", "gateway", "keys"):
        shutil.copy2(os.path.join(built, binary), os.path.join(EXAMPLES, binary))
    # A build without the store features starts, but cannot open the stores.
    for url in ("redis://127.0.0.1:1", "postgres://x@127.0.0.1:1/x?sslmode=probe",
                "mysql://x@127.0.0.1:1/x?ssl-mode=probe"):  # each fails at once, with the feature
        code, out = keys_tool(url, "inspect", "probe")
        if "this build has no" in out:
            shutil.rmtree(EXAMPLES, ignore_errors=True)
            sys.exit(f"the examples in {built} were built without a store feature ({out.strip()}): "
                     "cargo build --example axum --example gateway --example keys --all-features")
    started = time.time()
    results = []

    def run(label, fn, *a):
        try:
            r = fn(*a)
        except Exception as e:  # a scenario that could not run is a failure, not a pass
            r = Result(label, 0)
            r.fail(f"{type(e).__name__}: {e}")
        print(r.line(), flush=True)
        results.append(r)

    try:
        if args.only in (None, "redis-pause"):
            for pause in (5.0, 10.0):
                run(f"redis-pause-{pause:.0f}s", redis_pause, pause, args.keys)
        if args.only in (None, "lost-commit"):
            for kind, var, default in (
                ("postgres", "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
                ("mysql", "MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
            ):
                run(f"{kind}-lost-commit", lost_commit, kind, os.environ.get(var, default),
                    args.keys, args.cut_fraction)
        if args.only in (None, "gateway"):
            run("gateway", gateway, args.keys)
        if args.only in (None, "settle"):
            run("settle", settle, min(args.keys, 5))
    finally:
        shutil.rmtree(EXAMPLES, ignore_errors=True)
    bad = sum(r.bad() for r in results)
    print(f"{'FAIL' if bad else 'OK'}: {len(results)} scenarios in {time.time() - started:.0f}s; "
          f"double {sum(r.double for r in results)}, lost {sum(r.lost for r in results)}, "
          f"stuck {sum(r.stuck for r in results)}"
          + (f", {sum(len(r.failures) for r in results)} checks failed" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
