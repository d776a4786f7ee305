"""Import cycles between ntk_bench's modules: none allowed (import-linter's contracts check the layers; a cycle
inside one layer, or one hidden by a function-level import, they do not see). Reads the package as installed, in a
temporary folder of links (as ``scripts/typecheck.py`` does), with grimp, import-linter's graph library.

    python scripts/import_cycles.py        (make lint runs it; so does tests/integration/test_style.py)

Prints each cycle (its modules and the import lines that close it) and exits 1 if there is one.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("implementations", "bench", "reference")


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module in ntk_bench's import graph (function-level
    imports included)."""
    import grimp

    with tempfile.TemporaryDirectory() as d:
        package = Path(d) / "ntk_bench"
        package.mkdir()
        for f in sorted((ROOT / "ntk_bench").iterdir()):
            if f.suffix in (".py", ".typed"):
                (package / f.name).symlink_to(f)
        for folder in FOLDERS:
            (package / folder).symlink_to(ROOT / folder, target_is_directory=True)
        sys.path.insert(0, d)
        try:
            graph = grimp.build_graph("ntk_bench", include_external_packages=False, cache_dir=None)
        finally:
            sys.path.remove(d)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    return [sorted(c) for c in _components(edges) if len(c) > 1]


def _components(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (the graph is deep enough to matter for recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges.get(w, ()))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                out.append(component)
    return out


def main() -> int:
    """Print the cycles; 1 if there is any."""
    found = cycles()
    for c in found:
        print("import cycle: " + " -> ".join(c))
    if not found:
        print("no import cycle")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
