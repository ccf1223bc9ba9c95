#!/usr/bin/env bash
# Instructions per call of each case of benches/costs.rs, counted by callgrind inside the
# loop of calls alone (setup excluded). Exact, and independent of the machine's load.
#
#   bash scripts/instructions.sh [case-prefix]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-bench}"
bin=$(cargo bench --bench costs --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="costs" and m.get("executable"):
        print(m["executable"])')
CALLS=${CALLS:-500}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cases=$(sed -n 's/^ *name: "\([^"]*\)",/\1/p' benches/costs.rs | grep "^${1:-}" || true)
printf '| case | instructions per call | × bare |\n|---|---:|---:|\n'
declare -A per
for c in $cases; do
  total=$(valgrind --tool=callgrind --toggle-collect='costs::measured*' \
    --callgrind-out-file="$tmp/out" "$bin" "$c" "$CALLS" 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p')
  n=$((total / CALLS))
  per[$c]=$n
  bare=${per[${c%/*}/bare]:-}
  ratio=""
  if [[ -n "$bare" && "$c" != */bare ]]; then
    ratio=$(python3 -c "print(f'{$n/$bare:.2f}')")
  fi
  printf '| %s | %d | %s |\n' "$c" "$n" "$ratio"
done
# The reference of the 64 KiB target: one pass of the fingerprint's hash over the body.
if [[ -z "${1:-}" || "hash-64k" == "${1:-}"* ]]; then
  total=$(valgrind --tool=callgrind --toggle-collect='costs::measured*' \
    --callgrind-out-file="$tmp/out" "$bin" hash-64k "$CALLS" 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p')
  hash=$((total / CALLS))
  printf '| hash-64k (XXH3-128, one pass) | %d | |\n' "$hash"
  for c in first-64k replay-64k; do
    if [[ -n "${per[$c/layer]:-}" && -n "${per[$c/bare]:-}" ]]; then
      python3 -c "print(f'| $c/layer ÷ (bare + hash) | | {${per[$c/layer]}/(${per[$c/bare]}+$hash):.2f} |')"
    fi
  done
fi
