#!/usr/bin/env python3
"""Count acm_module's import cycles and the size of its subpackages, from the source alone.

Every import statement counts, the lazy ones inside functions and under TYPE_CHECKING too: a
cycle that only bites at call time is still a cycle. Run from a checkout:

    python scripts/import_graph.py            # the report
    python scripts/import_graph.py --check    # exit 1 while any cycle remains
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "acm_module"


def modules(root: Path) -> dict[str, Path]:
    """Return every module of the package by dotted name (packages by their own name)."""
    out: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """Return the longest known module a dotted name starts with (a name imported from it)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Return the package's modules one module imports, anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here[: len(here) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                hit = _resolve(t, known)
                if hit and hit != name:
                    out.add(hit)
    return out


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        n = stack.pop()
                        on.discard(n)
                        comp.append(n)
                        if n == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def subpackage(module: str) -> str:
    """Return the first-level room of a module (a top-level module is its own room)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(package)"


def _edges_within(graph: dict[str, set[str]], comp: Iterable[str]) -> list[str]:
    members = set(comp)
    return [f"{a} -> {b}" for a in sorted(members) for b in sorted(graph[a] & members)]


def main(argv: list[str] | None = None) -> int:
    """Print the cycles and the room sizes; with --check, exit 1 while a cycle remains."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout (default: this one)")
    ap.add_argument("--check", action="store_true", help="exit 1 if any cycle remains")
    ap.add_argument("--edges", action="store_true", help="list the imports inside each cycle")
    args = ap.parse_args(argv)
    known = modules(args.root)
    graph = {m: imports(m, p, known) for m, p in known.items()}
    rooms: dict[str, set[str]] = defaultdict(set)
    for m, targets in graph.items():
        for t in targets:
            if subpackage(m) != subpackage(t):
                rooms[subpackage(m)].add(subpackage(t))
    for m in graph:
        rooms.setdefault(subpackage(m), set())
    mod_cycles = sccs(graph)
    room_cycles = sccs(rooms)
    print(f"module cycles: {len(mod_cycles)}")
    for comp in mod_cycles:
        print("  " + " <-> ".join(c.removeprefix(PACKAGE + ".") for c in comp))
        if args.edges:
            for e in _edges_within(graph, comp):
                print("      " + e)
    print(f"subpackage cycles: {len(room_cycles)}")
    for comp in room_cycles:
        print("  " + " <-> ".join(comp))
        if args.edges:
            for e in _edges_within(rooms, comp):
                print("      " + e)
    lines: dict[str, int] = defaultdict(int)
    for m, p in known.items():
        lines[subpackage(m)] += len(p.read_text().splitlines())
    total = sum(lines.values())
    print(f"lines (.py): {total}")
    for room, n in sorted(lines.items(), key=lambda kv: -kv[1]):
        print(f"  {room:12} {n:6} {100 * n / total:5.1f}%")
    # Each package (a directory with __init__.py) counted by its own modules, nested packages
    # apart: decide/engine/ is not decide/'s lines here.
    own: dict[str, int] = defaultdict(int)
    for m, p in known.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        own[pkg.removeprefix(PACKAGE + ".") or "(package)"] += len(p.read_text().splitlines())
    print("lines by package, own modules only:")
    for pkg, n in sorted(own.items(), key=lambda kv: -kv[1]):
        print(f"  {pkg:20} {n:6} {100 * n / total:5.1f}%")
    return 1 if args.check and (mod_cycles or room_cycles) else 0


if __name__ == "__main__":
    sys.exit(main())
