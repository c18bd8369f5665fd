#!/usr/bin/env python3
"""Prints the import cycles among greenopt's modules and exits 1 when there is one.

Counts top-level and unexplained function-level imports (an import inside a function is still a
dependency, only a later one); ``from pkg import sub`` depends on ``pkg`` too (its ``__init__``
runs and its namespace is read), so a submodule that imports its siblings that way cycles
through a package that re-exports it. A function-level import marked ``# lazy: <backend>`` runs
on first use, never at import: it counts for the floors, not for cycles. Imports under
``if TYPE_CHECKING:`` are not run and are left out. Also lists function-level imports of
greenopt modules without that comment: the layout allows them only to defer a heavy optional
backend.

Then checks the floors of the layout (README, "Where things are"): a module imports only
from its own floor or below, never up. TYPE_CHECKING imports count here too (an annotation
that names an upper floor is a seam in the wrong place).

Usage: python scripts/check_imports.py [--package DIR]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for n in ast.walk(sub):
                    if hasattr(n, "lineno"):
                        lines.add(n.lineno)
    return lines


def imports(path: Path, name: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported greenopt module, line, inside a function) for each import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _type_checking_lines(tree)
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and child.lineno not in skip:
                for target in _targets(child, name, is_pkg, modules):
                    out.append((target, child.lineno, in_func))
            visit(child, func)

    visit(tree, False)
    return out


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_pkg: bool, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        bases = [a.name for a in node.names]
        return [_known(b, modules) for b in bases if _known(b, modules)]
    base = node.module or ""
    if node.level:
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        hit = sub if sub in modules else _known(base, modules)
        if hit:
            found.append(hit)
        if hit == sub and base in modules and base != name:
            found.append(base)  # `from pkg import sub` reads pkg's namespace: pkg/__init__ runs first
    return found


def _known(name: str, modules: set[str]) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


#: The layout's floors, bottom to top; a module's floor is that of its longest listed prefix.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("greenopt._version", "greenopt.errors", "greenopt._io", "greenopt.env", "greenopt.offline"),
    ("greenopt.config",),
    ("greenopt.records",),
    ("greenopt.compress",),
    ("greenopt.models", "greenopt.measure", "greenopt.evaluate", "greenopt.runtimes", "greenopt.testing"),
    ("greenopt.label",),
    ("greenopt.report", "greenopt.assess", "greenopt.calibrate"),
    ("greenopt.search", "greenopt.testing.search"),
    ("greenopt.validate", "greenopt.ship"),
    ("greenopt.cli",),
    ("greenopt",),  # the package's own __init__ (lazy greenopt.load)
)


def floor(module: str) -> int:
    best, where = -1, -1
    for i, names in enumerate(FLOORS):
        for n in names:
            covers = module == n or (module.startswith(n + ".") and n != "greenopt")  # the root: __init__ only
            if covers and len(n) > best:
                best, where = len(n), i
    return where


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports that run up the floors, as printable lines."""
    out = []
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            if floor(dst) > floor(src) and not src.startswith(dst + "."):
                out.append(f"upward import: {src} (floor {floor(src)}) -> {dst} (floor {floor(dst)})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default=str(Path(__file__).resolve().parent.parent / "greenopt"))
    args = ap.parse_args(argv)
    root = Path(args.package).resolve()
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    deferred: dict[str, set[str]] = {m: set() for m in modules}
    lazy: list[str] = []
    for name, path in files.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, in_func in imports(path, name, modules):
            # A package's own __init__ re-exporting its submodules is not a dependency of theirs.
            if target == name or (name.startswith(target + ".") and target in modules and False):
                continue
            if in_func and "# lazy:" in lines[line - 1]:
                deferred[name].add(target)  # runs on first use, never at import: no import cycle, still a floor
                continue
            graph[name].add(target)
            if in_func:
                lazy.append(f"{path.relative_to(root.parent)}:{line}: function-level import of {target} "
                            "without a '# lazy: <backend>' comment")
    found = cycles(graph)
    for comp in found:
        print("import cycle: " + " <-> ".join(comp))
    for line in lazy:
        print(line)
    unplaced = sorted(m for m in modules if floor(m) < 0)
    for m in unplaced:
        print(f"module {m} is on no floor: add it to FLOORS")
    up = upward(_with_type_checking(files, modules, {m: graph[m] | deferred[m] for m in modules}))
    for line in up:
        print(line)
    print(f"{len(modules)} modules, {sum(map(len, graph.values()))} import edges, {len(found)} cycles, "
          f"{len(lazy)} unexplained function-level imports, {len(up)} upward imports")
    return 1 if found or lazy or up or unplaced else 0


def _with_type_checking(files: dict[str, Path], modules: set[str], graph: dict[str, set[str]]) -> dict[str, set[str]]:
    full = {m: set(t) for m, t in graph.items()}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line in _type_checking_lines(tree):
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno == line:
                    full[name].update(t for t in _targets(node, name, path.name == "__init__.py", modules) if t != name)
    return full


if __name__ == "__main__":
    sys.exit(main())
