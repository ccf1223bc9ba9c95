#!/usr/bin/env bash
# Where the instructions of one case of benches/costs.rs go, function by function: callgrind
# counts inside the loop of calls alone (setup excluded). For each case, three tables:
#   1. what the layer adds: each function's own (exclusive) instructions per call in the
#      case minus in its bare counterpart (`first-0/layer` against `first-0/bare`), with
#      its share of the difference;
#   2. the case's functions by their own instructions, with their share of the total;
#   3. the layer's functions (and the map, header, extension, hashing and task code they
#      call) by inclusive instructions: the function and everything it calls.
# Exact, whatever the load of the machine.
#
#   bash scripts/profile_calls.sh [case ...]      (default: first-0/layer first-1k/layer)
#   TOP=25 CALLS=2000 bash scripts/profile_calls.sh replay-1k/layer
#
# Functions inlined into others are counted in the function they were inlined into.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-bench}"
bin=${COSTS_BIN:-$(nice -n 10 cargo bench --bench costs --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="costs" and m.get("executable"):
        print(m["executable"])')}
CALLS=${CALLS:-2000}
TOP=${TOP:-20}
cases=("$@")
[[ ${#cases[@]} -gt 0 ]] || cases=(first-0/layer first-1k/layer)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Profiles case $1 into $tmp/<slug>.{excl,incl} ("instructions<TAB>function" lines) and
# prints its instructions per call.
profile() {
  local slug=${1//\//_}
  valgrind --tool=callgrind --toggle-collect='costs::measured*' \
    --callgrind-out-file="$tmp/$slug.out" "$bin" "$1" "$CALLS" >/dev/null 2>"$tmp/$slug.log"
  for mode in no yes; do
    callgrind_annotate --inclusive=$mode --threshold=100 "$tmp/$slug.out" 2>/dev/null |
      sed -n 's/^ *\([0-9,]*\) ([ 0-9.]*%) *\(.*\)$/\1\t\2/p' |
      grep -v 'PROGRAM TOTALS' >"$tmp/$slug.$mode" || true
  done
  sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$tmp/$slug.log"
}

for c in "${cases[@]}"; do
  slug=${c//\//_}
  total=$(profile "$c")
  bare="${c%/*}/bare"
  bare_total=""
  if [[ "$c" != "$bare" ]]; then bare_total=$(profile "$bare"); fi
  echo "## $c: $((total / CALLS)) instructions per call${bare_total:+ (bare: $((bare_total / CALLS)))}, $CALLS calls"
  echo
  python3 - "$tmp" "$slug" "${bare//\//_}" "$total" "${bare_total:-0}" "$CALLS" "$TOP" <<'PY'
import re, sys
tmp, slug, bare_slug, total, bare_total, calls, top = sys.argv[1:]
total, bare_total, calls, top = int(total), int(bare_total), int(calls), int(top)

def clean(name):
    if name.startswith(("./", "/", "???")):
        name = name.split(":", 1)[-1]
    name = re.sub(r"::h[0-9a-f]{16}", "", name)
    name = re.sub(r" \[[^\]]*\]$", "", name)
    return name[:140]

def load(path):
    out = {}
    try:
        for line in open(path):
            n, name = line.rstrip("\n").split("\t", 1)
            name = clean(name)
            out[name] = out.get(name, 0) + int(n.replace(",", ""))
    except FileNotFoundError:
        pass
    return out

excl = load(f"{tmp}/{slug}.no")
incl = load(f"{tmp}/{slug}.yes")
if bare_total:
    bare = load(f"{tmp}/{bare_slug}.no")
    diff = {k: excl.get(k, 0) - bare.get(k, 0) for k in set(excl) | set(bare)}
    added = total - bare_total
    print(f"What the layer adds: {added / calls:,.0f} instructions per call; by function, own instructions in the case minus in bare:")
    print()
    print("| share of what the layer adds | per call | function |")
    print("|---:|---:|---|")
    for name, n in sorted(diff.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {100 * n / added:.1f}% | {n / calls:,.0f} | `{name}` |")
    print()
print("Own (exclusive) instructions:")
print()
print("| share | per call | function |")
print("|---:|---:|---|")
for name, n in sorted(excl.items(), key=lambda kv: -kv[1])[:top]:
    print(f"| {100 * n / total:.1f}% | {n / calls:,.0f} | `{name}` |")
print()
print("Inclusive (the function and what it calls), the layer's functions and the library code they call:")
print()
print("| share | per call | function |")
print("|---:|---:|---|")
keep = re.compile(r"tower_idempotency|dashmap|Extensions|spawn|xxh|uuid|getrandom|HeaderMap<T>::(clone|insert|get)|Bytes|Recorder")
shown = 0
for name, n in sorted(incl.items(), key=lambda kv: -kv[1]):
    if not keep.search(name) or n > 0.98 * total:
        continue
    print(f"| {100 * n / total:.1f}% | {n / calls:,.0f} | `{name}` |")
    shown += 1
    if shown >= top:
        break
print()
PY
done
