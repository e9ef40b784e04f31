"""The package's import graph: no cycle (imports under TYPE_CHECKING and inside functions
included), each module imports only from its own layer of the README's table and those
below it, the load generator never imports the server's models; and no function is
longer than the house limit."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "echoplex"
README = PACKAGE.parent / "README.md"
LAYERS_INTRO = "The layers, lowest first"
MAX_FUNCTION_LINES = 80

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


@dataclass(frozen=True)
class Layer:
    """One row of the README's layer table: its entries, relative to echoplex/ (a file,
    a glob such as `models/*.py`, or a folder such as `load/`), and the row as written."""

    number: int
    entries: tuple[str, ...]
    row: str


def layers(readme: str) -> list[Layer]:
    """The rows of the table after LAYERS_INTRO that name modules, lowest first. A row's
    first column ends at the first run of two spaces; its entries are comma-separated,
    the first spelt from the repository (`echoplex/...`), the others from echoplex/."""
    _, found, after = readme.partition(LAYERS_INTRO)
    assert found, f"README.md has no paragraph starting {LAYERS_INTRO!r}"
    block = after.split("```", 2)[1]
    rows: list[Layer] = []
    for line in block.splitlines():
        column = line.split("  ", 1)[0]
        if not column.startswith("echoplex/"):
            continue  # a continuation line, or a row of the repository (deploy/, tests/)
        entries = tuple(e.strip().removeprefix("echoplex/") for e in column.split(","))
        rows.append(Layer(len(rows) + 1, entries, column))
    return rows


def relative_path(module: str) -> str:
    """echoplex.models.pool -> models/pool.py; echoplex.load -> load/__init__.py."""
    path = PACKAGE.parent / module.replace(".", "/")
    file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return file.relative_to(PACKAGE).as_posix()


def matches(entry: str, path: str) -> int:
    """How closely `entry` names the file `path`: 3 by name, 2 by glob, 1 by folder, 0 not."""
    if entry == path:
        return 3
    if "*" in entry and PurePosixPath(path).match(entry) and path.count("/") == entry.count("/"):
        return 2
    if entry.endswith("/") and path.startswith(entry):
        return 1
    return 0


def rows_naming(module: str, table: list[Layer]) -> list[Layer]:
    """The rows that name `module` most closely: one, unless the table lacks it or
    lists it twice."""
    path = relative_path(module)
    closeness = {layer: max(matches(entry, path) for entry in layer.entries) for layer in table}
    best = max(closeness.values())
    return [layer for layer, value in closeness.items() if value == best and value]


def unlisted(graph: dict[str, set[str]], table: list[Layer]) -> list[str]:
    """What the table gets wrong about which modules there are, one line each."""
    found = []
    for module in sorted(graph):
        rows = rows_naming(module, table)
        if not rows:
            found.append(f"echoplex/{relative_path(module)} is in no row: add it")
        elif len(rows) > 1:
            found.append(f"echoplex/{relative_path(module)} is in rows {[r.row for r in rows]}")
    for layer in table:
        for entry in layer.entries:
            if not [m for m in graph if matches(entry, relative_path(m))]:
                found.append(f"row {layer.row!r} names echoplex/{entry}, which is no module")
    return found


def misplaced(graph: dict[str, set[str]], table: list[Layer]) -> list[str]:
    """Every import of a module listed in a higher row than the importer's."""
    found = []
    for module in sorted(graph):
        (own,) = rows_naming(module, table)
        for imported in sorted(graph[module] & graph.keys()):
            (theirs,) = rows_naming(imported, table)
            if theirs.number > own.number:
                found.append(
                    f"{module} (row {own.number}, {own.row!r}) imports {imported}, "
                    f"listed higher (row {theirs.number}, {theirs.row!r})"
                )
    return found


def test_the_readme_lists_every_module_in_import_order() -> None:
    table = layers(README.read_text())
    graph = import_graph()
    problems = unlisted(graph, table) or misplaced(graph, table)
    assert not problems, "README.md's layer table (## Layout):\n" + "\n".join(problems)


def test_an_unlisted_module_and_an_import_from_a_higher_layer_are_found() -> None:
    # The checks themselves, on a table and a graph of their own.
    table = layers(
        f"{LAYERS_INTRO}:\n```\nechoplex/errors.py, config.py   low\n"
        "                    a continuation\nechoplex/models/*.py   the models\n"
        "echoplex/load/, shutdown.py   the load generator\ndeploy/   not a module\n```\n"
    )
    assert [layer.entries for layer in table] == [
        ("errors.py", "config.py"),
        ("models/*.py",),
        ("load/", "shutdown.py"),
    ]
    graph = {
        "echoplex.config": {"echoplex.errors"},
        "echoplex.errors": set(),
        "echoplex.models.pool": {"echoplex.config", "echoplex.load.engine"},
        "echoplex.load.engine": {"echoplex.load.config", "echoplex.models.pool"},
        "echoplex.load.config": set(),
    }
    assert unlisted({**graph, "echoplex.tutorial": set()}, table) == [
        "echoplex/tutorial.py is in no row: add it",
        "row 'echoplex/load/, shutdown.py' names echoplex/shutdown.py, which is no module",
    ]
    assert misplaced(graph, table) == [
        "echoplex.models.pool (row 2, 'echoplex/models/*.py') imports echoplex.load.engine, "
        "listed higher (row 3, 'echoplex/load/, shutdown.py')"
    ]


def long_functions(path: Path) -> list[str]:
    """The functions in `path` longer than MAX_FUNCTION_LINES, from `def` to their end."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                where = path.relative_to(PACKAGE.parent).as_posix()
                found.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_80_lines() -> None:
    found = [entry for path in sorted(PACKAGE.rglob("*.py")) for entry in long_functions(path)]
    assert not found, "split these functions:\n" + "\n".join(found)
