#!/usr/bin/env python3
"""Draws the layer's overhead from criterion's results, and prints the result tables.

Reads $CARGO_TARGET_DIR/criterion/<group>/<id>/new/estimates.json (the median's point
estimate, in ns) as written by `cargo bench --bench layer` (and `--bench backends`), then:

- saves docs/overhead.png: overhead (layer minus bare, in µs) against the request body
  size, for the first request and the replay;
- prints Markdown tables of every group: median, 95% confidence interval, and the
  layer/bare ratio where a group has a bare benchmark of the same size.

Usage: CARGO_TARGET_DIR=/work/target-bench python3 scripts/chart.py [--out docs/overhead.png]
Needs matplotlib (pip install matplotlib) for the chart; the tables print without it.
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def criterion_dir() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR") or str(ROOT / "target")
    return Path(target) / "criterion"


def load(base: Path):
    """{group: {id: (median_ns, lo_ns, hi_ns)}} for every benchmark with results."""
    results = {}
    for est in sorted(base.glob("**/new/estimates.json")):
        rel = est.relative_to(base).parts[:-2]  # group, id parts...
        if not rel or rel[0] == "report":
            continue
        # The benchmark.json names the group and id exactly (directory names are sanitised).
        meta_path = est.parent / "benchmark.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            group = meta["group_id"]
            bench = "/".join(
                p for p in (meta.get("function_id"), meta.get("value_str")) if p
            )
        else:
            group, bench = rel[0], "/".join(rel[1:])
        median = json.loads(est.read_text())["median"]
        ci = median["confidence_interval"]
        results.setdefault(group, {})[bench] = (
            median["point_estimate"],
            ci["lower_bound"],
            ci["upper_bound"],
        )
    return results


def fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def tables(results) -> str:
    out = []
    for group in sorted(results):
        benches = results[group]
        out.append(f"\n#### `{group}`\n")
        out.append("| benchmark | median | 95% CI of the median | vs bare |")
        out.append("|---|---:|---:|---:|")

        def key(b):
            parts = b.split("/")
            size = int(parts[-1]) if parts[-1].isdigit() else -1
            return (size, parts[0] != "bare", b)

        for bench in sorted(benches, key=key):
            med, lo, hi = benches[bench]
            parts = bench.split("/")
            size = parts[1] if len(parts) > 1 else None
            bare_id = f"bare/{size}" if size is not None else "bare"
            ratio = ""
            if group.startswith("store_"):
                ratio = f"{1e3 / med:.2f} M ops/s"
            elif not bench.startswith("bare") and bare_id in benches:
                b = benches[bare_id][0]
                ratio = f"×{med / b:.2f} ({(med - b) / 1e3:+.2f} µs)"
            out.append(
                f"| `{bench}` | {fmt_ns(med)} | {fmt_ns(lo)} – {fmt_ns(hi)} | {ratio} |"
            )
    return "\n".join(out)


def chart(results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for group, style in (("first_request", "o-"), ("replay", "s-")):
        benches = results.get(group, {})
        points = []
        for bench, (med, lo, hi) in benches.items():
            kind, _, size = bench.partition("/")
            if kind != "layer" or f"bare/{size}" not in benches:
                continue
            bmed, blo, bhi = benches[f"bare/{size}"]
            # Overhead and a rough band: the CI bounds of both medians combined.
            points.append(
                (int(size), (med - bmed) / 1e3, (lo - bhi) / 1e3, (hi - blo) / 1e3)
            )
        if not points:
            continue
        points.sort()
        xs = [p[0] / 1024 for p in points]
        ys = [p[1] for p in points]
        ax.plot(xs, ys, style, label=group.replace("_", " "))
        ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points], alpha=0.15)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f} µs", (x, y), textcoords="offset points", xytext=(4, 6),
                        fontsize=8)
    fr = results.get("first_request", {})
    if "layer_uncapped/1024" in fr and "bare/1024" in fr:
        y = (fr["layer_uncapped/1024"][0] - fr["bare/1024"][0]) / 1e3
        ax.plot([1], [y], "D", color="tab:green", label="first request, store under its cap")
        ax.annotate(f"{y:.1f} µs", (1, y), textcoords="offset points", xytext=(6, -12),
                    fontsize=8, color="tab:green")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks([0, 1, 64])
    ax.set_xticklabels(["0 B", "1 KiB", "64 KiB"])
    ax.set_xlabel("request body size")
    ax.set_ylabel("overhead: layer − bare (µs, median)")
    ax.set_title("IdempotencyLayer + MemoryStore overhead over a trivial handler\n"
                 "(band: combined 95% CIs; first request includes eviction at the 64 MiB cap)",
                 fontsize=10)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"chart saved to {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "overhead.png"))
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args()
    base = criterion_dir()
    results = load(base)
    if not results:
        sys.exit(f"no criterion results under {base}: run `cargo bench` first")
    print(tables(results))
    if not args.no_chart:
        chart(results, Path(args.out))


if __name__ == "__main__":
    main()
