#!/usr/bin/env bash
# Where the instructions of one case of benches/costs.rs go, function by function: callgrind
# counts inside the loop of calls alone (setup excluded), and callgrind_annotate lists the
# functions by their own (exclusive) instructions, with their share of the loop's total
# and the instructions per call, then by inclusive cost. Exact, whatever the load.
#
#   bash scripts/profile_calls.sh [case ...]      (default: first-0/layer first-1k/layer)
#   TOP=25 CALLS=2000 bash scripts/profile_calls.sh replay-1k/layer
#
# Functions inlined into others are counted in the function they were inlined into.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-bench}"
bin=$(nice -n 10 cargo bench --bench costs --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="costs" and m.get("executable"):
        print(m["executable"])')
CALLS=${CALLS:-2000}
TOP=${TOP:-20}
cases=("$@")
[[ ${#cases[@]} -gt 0 ]] || cases=(first-0/layer first-1k/layer)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for c in "${cases[@]}"; do
  valgrind --tool=callgrind --toggle-collect='costs::measured*' \
    --callgrind-out-file="$tmp/out" "$bin" "$c" "$CALLS" >/dev/null 2>"$tmp/log"
  total=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$tmp/log")
  echo "## $c: $((total / CALLS)) instructions per call ($CALLS calls)"
  echo
  for mode in no yes; do
    if [[ $mode == no ]]; then
      echo "Exclusive (the function's own instructions):"
    else
      echo "Inclusive (the function and what it calls):"
    fi
    echo
    echo "| share | per call | function |"
    echo "|---:|---:|---|"
    callgrind_annotate --inclusive=$mode --threshold=100 "$tmp/out" 2>/dev/null |
      sed -n 's/^ *\([0-9,]*\) ([ 0-9.]*%) *\(.*\)$/\1\t\2/p' |
      python3 -c '
import sys, re
total, calls, top = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
shown = 0
for line in sys.stdin:
    n, name = line.rstrip("\n").split("\t", 1)
    n = int(n.replace(",", ""))
    if "PROGRAM TOTALS" in name:
        continue
    # Strip the file part and the hash suffix of Rust symbols.
    name = re.sub(r"^[^:]*:", "", name, count=1) if name.startswith(("/", "???")) else name
    name = re.sub(r"::h[0-9a-f]{16}", "", name)
    name = re.sub(r" \[[^\]]*\]$", "", name)
    print(f"| {100*n/total:.1f}% | {n/calls:,.0f} | `{name[:150]}` |")
    shown += 1
    if shown >= top:
        break
' "$total" "$CALLS" "$TOP"
    echo
  done
done
