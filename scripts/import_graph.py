#!/usr/bin/env python3
"""The crate's module import graph, from its `crate::` and `super::` paths (comments, doc
links and `#[cfg(test)] mod tests` left out), and its circles.

    python3 scripts/import_graph.py          # the circles, if any; exit 1 if there is one
    python3 scripts/import_graph.py --edges  # every module and what it imports

A module may use what is below it; nothing below may use it back (ARCHITECTURE.md). CI runs
this and fails on a circle.
"""

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_of(path):
    rel = os.path.relpath(path, os.path.join(ROOT, "src"))[:-3]
    if rel.endswith("/mod"):
        rel = rel[:-4]
    return rel.replace("/", "::")


def graph():
    files = sorted(glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True))
    names = {module_of(f) for f in files}
    edges = {}
    for path in files:
        module = module_of(path)
        text = open(path, encoding="utf-8").read()
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
        text = "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))
        deps = set()
        for first, second in re.findall(r"crate::([a-z_]+)(?:::([a-z_]+))?", text):
            dep = f"{first}::{second}" if second and f"{first}::{second}" in names else first
            if dep in names and dep != module:
                deps.add(dep)
        if "::" in module:
            parent = module.rsplit("::", 1)[0]
            for name in re.findall(r"super::([a-z_]+)", text):
                dep = f"{parent}::{name}" if f"{parent}::{name}" in names else parent
                if dep != module:
                    deps.add(dep)
        edges[module] = deps
    return edges


def circles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def main():
    edges = graph()
    if "--edges" in sys.argv:
        for module in sorted(edges):
            print(f"{module} -> {', '.join(sorted(edges[module])) or '(nothing)'}")
    found = circles(edges)
    for component in found:
        print("import circle:", " <-> ".join(component))
    print(f"{len(edges)} modules, {sum(len(d) for d in edges.values())} imports, "
          f"{len(found)} circles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
