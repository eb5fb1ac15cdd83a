"""The package's architecture as rules: the library never imports its command line, no import cycles between
modules (function-level imports count), no function longer than 100 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cvvae"


def _modules() -> dict[str, tuple[Path, ast.Module, bool]]:
    mods = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, ast.parse(f.read_text(), str(f)), is_pkg)
    return mods


def _targets(name: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (not its own parent package: re-exports)."""
    mods = _modules()
    graph = {}
    for name, (_, tree, is_pkg) in mods.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(name, is_pkg, node):
                    while t and t not in mods and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t in mods and t != name and not (mods[t][2] and name.startswith(t + ".")):
                        deps.add(t)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _is_cli(module: str) -> bool:
    return module == "cvvae.cli" or module.startswith("cvvae.cli.")


def test_the_library_never_imports_the_cli():
    graph = _graph()
    offenders = {m: sorted(d for d in deps if _is_cli(d)) for m, deps in graph.items()
                 if not _is_cli(m) and m != "cvvae.__main__"}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_checks_see_function_level_imports_and_cycles():
    """The rules above can fail: a function-level import is an edge, and a two-module loop is a cycle."""
    tree = ast.parse("def f():\n    from ..cli import main\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _targets("cvvae.model.autoencoder", False, node)[0] == "cvvae.cli"
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_no_function_longer_than_100_lines():
    long = []
    for name, (f, tree, _) in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{f.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert long == []
