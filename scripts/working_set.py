#!/usr/bin/env python3
"""Distinct cache lines a request touches, read from valgrind's lackey trace.

Runs the peers harness's profile mode (benches/peers, PEERS_PROFILE) under
`valgrind --tool=lackey --trace-mem=yes`, cuts the trace into windows, one per call of
the wrapper's service (`--entry`), and counts the 64-byte lines each window reads or
writes: in all, on the stack, and elsewhere (heap and static data). A request whose
lines do not fit the level-1 data cache (32 KiB, 512 lines here) evicts its own lines
before the next request reuses them; this is what callgrind's cache model showed as
misses (BENCHMARKS.md, 2026-12-07, fifth session).

    python3 scripts/working_set.py /work/target-peers/release/tower-idempotency-peers \
        [--case "first 0"] [--wrapper ours] [--calls 100] [--stack-bands]

With --stack-bands it also prints, per 512 bytes of stack below the deepest frame the
window starts in, how many lines were touched and which functions touched them most.
Bounded: 100 calls over a 200-record store take about half a minute.
"""

import argparse
import bisect
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

# Where valgrind maps a position-independent executable.
PIE_BASE = 0x108000
# Addresses above this are the stack (valgrind's main thread stack sits near the top).
STACK_FLOOR = 0x1000000000
ENTRIES = {
    "ours": r"Idempotency<S> as tower_service::Service<http::request::Request<ReqBody>>>::call$",
    "cratestack-axum": r"IdempotencyService<S> as tower_service::Service<http::request::Request<axum_core::body::Body>>>::call$",
}


def symbols(binary):
    out = subprocess.run(
        ["nm", "-C", "--defined-only", binary], capture_output=True, text=True, check=True
    ).stdout
    syms = []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            try:
                syms.append((int(parts[0], 16) + PIE_BASE, parts[2]))
            except ValueError:
                pass
    syms.sort()
    return syms


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("binary")
    ap.add_argument("--case", default="first 0")
    ap.add_argument("--wrapper", default="ours", choices=sorted(ENTRIES))
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--stack-bands", action="store_true")
    args = ap.parse_args()
    if args.calls < 10:
        sys.exit("--calls: at least 10 (the first and last windows are dropped)")

    if not os.path.isfile(args.binary):
        sys.exit(f"{args.binary}: no such file (build benches/peers with --release first)")
    if shutil.which("valgrind") is None or shutil.which("nm") is None:
        sys.exit("valgrind and nm must be installed (apt-get install valgrind binutils)")
    syms = symbols(args.binary)
    addrs = [a for a, _ in syms]
    entry = re.compile(ENTRIES[args.wrapper])
    starts = {a for a, name in syms if entry.search(name)}
    if not starts:
        sys.exit(f"no symbol of {args.binary} matches {ENTRIES[args.wrapper]!r}")

    def function(addr):
        i = bisect.bisect_right(addrs, addr) - 1
        return syms[i][1] if i >= 0 else "?"

    env = dict(
        os.environ,
        PEERS_PROFILE=str(args.calls),
        PEERS_PROFILE_WRAPPERS=args.wrapper,
        PEERS_RECORDS="200",
        PEERS_HEADERS="off",
        PEERS_RUNTIMES="current",
        PEERS_BODIES="0,1024",
    )
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "lackey.log")
        run = subprocess.run(
            ["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={trace}",
             args.binary, args.case],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        if run.returncode != 0:
            sys.exit(f"the harness exited with {run.returncode} (is {args.case!r} one of its "
                     f"cases?): {run.stderr.strip()[-500:]}")
        windows, current, last_own = [], None, 0
        with open(trace) as f:
            for line in f:
                if line.startswith("I  "):
                    addr = int(line[3:].split(",")[0], 16)
                    if addr in starts:
                        if current is not None:
                            windows.append(current)
                        current = {}
                    if addr < 0x4000000:  # the binary's own code, not a library's
                        last_own = addr
                    continue
                if current is None or len(line) < 4 or line[0] != " " or line[1] not in "LSM":
                    continue
                addr, size = line[3:].strip().split(",")
                first, size = int(addr, 16), int(size)
                for l in range(first >> 6, ((first + size - 1) >> 6) + 1):
                    current.setdefault(l, collections.Counter())[last_own] += 1
    # Steady state: the last windows, without the very last (the profile's end).
    steady = windows[-(args.calls // 3):-1]
    if not steady:
        sys.exit("no windows: the entry symbol never ran (wrong --wrapper for this case?)")
    totals = sorted(len(w) for w in steady)
    stacks = sorted(sum(1 for l in w if (l << 6) >= STACK_FLOOR) for w in steady)
    mid = len(totals) // 2
    print(f"{args.wrapper} / {args.case}: {len(steady)} requests, distinct 64-byte lines "
          f"per request: median {totals[mid]} (min {totals[0]}, max {totals[-1]}); "
          f"stack {stacks[mid]}, heap and static {totals[mid] - stacks[mid]}")
    if args.stack_bands:
        window = steady[mid]
        lines = sorted(l for l in window if (l << 6) >= STACK_FLOOR)
        top = lines[-1]
        bands = collections.defaultdict(list)
        for l in lines:
            bands[(top - l) * 64 // 512].append(l)
        for band in sorted(bands):
            who = collections.Counter()
            for l in bands[band]:
                for addr, n in window[l].items():
                    who[function(addr)] += n
            names = "; ".join(name[:70] for name, _ in who.most_common(2))
            print(f"{band * 512:6d}-{band * 512 + 511:6d} bytes: {len(bands[band]):2d} lines  {names}")


if __name__ == "__main__":
    main()
