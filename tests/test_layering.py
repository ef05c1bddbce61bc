"""The shape of the code: imports point one way (no cycle, lazy imports included), no
module reaches into another's private names, and no module outgrows one job (~600 lines).

Parsed from the source (nothing is imported), so it runs in a blink and names the exact
modules and lines to look at.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "bench")
TOP_MODULES = ("cli",)
MAX_LINES = 600


def _module_files() -> dict[str, Path]:
    files = {name: ROOT / f"{name}.py" for name in TOP_MODULES if (ROOT / f"{name}.py").exists()}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "results" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


MODULES = _module_files()


def _internal(name: str) -> bool:
    return name.split(".")[0] in PACKAGES + TOP_MODULES


def _resolve(importer: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _runtime_nodes(tree: ast.AST):
    """Every node that can run: all of them but the bodies of ``if TYPE_CHECKING:``
    (imports for annotations only, which never execute)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: Path):
    """(imported module, line, imported names) for every import in the file, lazy ones too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, ()
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from engine import api`: the submodule itself
                    yield sub, node.lineno, ()
                else:
                    yield base, node.lineno, (alias.name,)


def _graph() -> dict[str, dict[str, int]]:
    graph: dict[str, dict[str, int]] = {name: {} for name in MODULES}
    for name, path in MODULES.items():
        for target, line, _ in _imports(name, path):
            if _internal(target) and target in MODULES and target != name:
                graph[name].setdefault(target, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_parser_sees_the_package():
    graph = _graph()
    assert "engine.jobs.local" in graph and "engine.api" in graph["engine.jobs.chunks"]


def test_no_import_cycle():
    graph = _graph()
    problems = []
    for component in _cycles(graph):
        edges = [
            f"{a} -> {b} (line {graph[a][b]})"
            for a in component
            for b in graph[a]
            if b in component
        ]
        problems.append("; ".join(edges))
    assert not problems, "import cycles:\n" + "\n".join(problems)


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_private_names_across_modules():
    problems = []
    for name, path in MODULES.items():
        aliases = {}
        tree = ast.parse(path.read_text())
        for target, line, names in _imports(name, path):
            if not _internal(target) or target == name:
                continue
            for imported in names:
                if imported.startswith("_") and not imported.startswith("__"):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {target}.{imported}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(name, path, node)
                for alias in node.names:
                    if f"{base}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in MODULES:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                problems.append(f"{where}: {aliases[node.value.id]}.{node.attr}")
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_one_job_in_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {lines} lines"
