"""The package's import graph: no cycle (imports under TYPE_CHECKING and inside functions
included), and the load generator never imports the server's models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "echoplex"

pytestmark = pytest.mark.timeout(30)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The echoplex modules `path` imports, wherever in the file the import is."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("echoplex")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if not source.startswith("echoplex"):
                continue
            submodules = {
                f"{source}.{a.name}" for a in node.names if is_module(f"{source}.{a.name}")
            }
            found |= submodules
            if len(submodules) < len(node.names):  # names from the module itself
                found.add(source)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in graph:
                continue
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "echoplex.plan" in graph["echoplex.server"]  # the graph is really read
    assert cycles(graph) == []


def test_a_cycle_is_found() -> None:
    # The check itself: a graph with a cycle through three modules is caught.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_load_generator_does_not_import_the_models() -> None:
    graph = import_graph()
    load_modules = [name for name in graph if name.startswith("echoplex.load")]
    assert load_modules
    for name in load_modules:
        assert not {m for m in graph[name] if m.startswith("echoplex.models")}, name


def test_the_model_registry_imports_nothing() -> None:
    # Every layer may read the registry (the config's --mode choices), so it must not
    # import any of them.
    assert import_graph()["echoplex.models"] == set()
