"""The house stays as built: imports run one way down the layers, no cycles, no private names across modules,
small modules and functions (docs/architecture.md).

    cli -> jobs -> {training, evals, geometry} -> {patches, judges} -> modeling -> data -> {config, io_utils,
    errors, tables}

A module may import from a lower layer, or from its own package; packages side by side in one layer never
import each other. The bottom modules may import each other (they hold no logic that could loop).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "safetypatch"
LAYERS = [("cli",), ("jobs",), ("training", "evals", "geometry", "reports"), ("patches", "judges"), ("modeling",),
          ("data",), ("config", "io_utils", "errors", "tables", "__init__")]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _package(module: str) -> str:
    """Top-level part under safetypatch: 'safetypatch.evals.suite.schema' -> 'evals'; the root -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    pkg = _package(module)
    if pkg == "__main__":  # `python -m safetypatch`: above the command line
        return -1
    for i, names in enumerate(LAYERS):
        if pkg in names:
            return i
    raise AssertionError(f"{module}: package '{pkg}' has no layer; add it to LAYERS and docs/architecture.md")


def _imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name, line) for every safetypatch import in `module`, lazy ones included."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in MODULES else target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
    return [(t, n, line) for t, n, line in out if t == "safetypatch" or t.startswith("safetypatch.")]


def test_every_package_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_imports_point_down_the_layers():
    bad = []
    for m in MODULES:
        for target, name, line in _imports(m):
            if target not in MODULES:
                bad.append(f"{MODULES[m]}:{line}: imports {target}, which does not exist")
                continue
            same_package = _package(target) == _package(m)
            bottom = _layer(m) == _layer(target) == len(LAYERS) - 1
            if not (same_package or bottom or _layer(target) > _layer(m)):
                bad.append(f"{MODULES[m].relative_to(SRC)}:{line}: {_package(m)} imports {target} "
                           f"({_package(target)} is not below it)")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_private_name_imported_across_modules():
    bad = [f"{MODULES[m].relative_to(SRC)}:{line}: imports {target}.{name}"
           for m in MODULES for target, name, line in _imports(m)
           if name.startswith("_") and not name.startswith("__") and f"{target}.{name}" not in MODULES]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_tests_and_benchmarks_use_public_names_only():
    root = SRC.parents[1]
    bad = []
    for path in sorted([*(root / "tests").glob("*.py"), *(root / "benchmarks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safetypatch"):
                bad += [f"{path.relative_to(root)}:{node.lineno}: imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "private names imported by tests or benchmarks:\n" + "\n".join(bad)


def test_conftest_is_not_imported_as_a_module():
    tests = SRC.parents[1] / "tests"
    bad = [f"{path.name}:{node.lineno}" for path in sorted(tests.glob("*.py"))
           for node in ast.walk(ast.parse(path.read_text()))
           if (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "conftest")
           or (isinstance(node, ast.Import) and any(a.name.split(".")[-1] == "conftest" for a in node.names))]
    assert not bad, "conftest imported as a module (use its fixtures, or tests/support.py helpers): " + ", ".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_no_import_cycles():
    inits = {m for m, p in MODULES.items() if p.name == "__init__.py"}  # re-exporting packages are not cycles
    graph = {m: {t for t, _, _ in _imports(m) if t in MODULES and t not in inits and t != m} for m in MODULES}
    assert not _cycles(graph)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_small_modules_and_functions(module):
    text = MODULES[module].read_text()
    n = len(text.splitlines())
    if n > MAX_MODULE_LINES:
        pytest.fail(f"{module}: {n} lines, over {MAX_MODULE_LINES}")
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{module}: functions over {MAX_FUNCTION_LINES} lines: {long}"
