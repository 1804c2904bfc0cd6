"""The package's shape: what its modules may reach of each other.

Read from the source with :mod:`ast`: an integration that reaches into a store's
privates, an import cycle, or a private SQLAlchemy attribute read outside
``hermes_orm/_sa.py`` fails here before it ships.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hermes_orm

PACKAGE = Path(hermes_orm.__file__).parent
#: The modules that define the stores (their privates are theirs to share).
STORE_MODULES = {"store", "async_store"}
#: The module that reads SQLAlchemy's and aiosqlite's privates (one of them is named
#: ``_transaction`` too); it imports nothing of the stores.
FOREIGN_PRIVATES = "_sa"
#: Classes whose private attributes are the stores'.
STORE_CLASSES = {
    "StoreCore",
    "_Sessions",
    "SessionStore",
    "UserStore",
    "_AsyncSessions",
    "AsyncSessionStore",
    "AsyncUserStore",
}
#: Private attributes of SQLAlchemy that hermes_orm reads (only in ``_sa``).
SQLALCHEMY_PRIVATES = {
    "_has_events",
    "_echo",
    "_should_log_info",
    "_handle_dbapi_exception",
    "_dbapi_connection",
}


def modules() -> dict[str, ast.Module]:
    """Every module of the package, by dotted name below ``hermes_orm``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(part for part in relative.parts if part != "__init__") or "__init__"
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def private_names(tree: ast.Module, classes: set[str]) -> set[str]:
    """Private (single underscore) attributes the ``classes`` of ``tree`` define or assign."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for inner in ast.walk(node):
                if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(inner.name)
                elif isinstance(inner, ast.Attribute) and isinstance(inner.ctx, ast.Store):
                    names.add(inner.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def reached(tree: ast.Module, names: set[str]) -> list[str]:
    """``x.name`` for each of ``names`` reached on something other than ``self`` / ``cls``."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in names
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_outside_the_stores_reaches_a_store_private() -> None:
    trees = modules()
    privates: set[str] = set()
    for name in STORE_MODULES:
        privates |= private_names(trees[name], STORE_CLASSES)
    assert {"_insert", "_locked_cursor", "_transaction"} <= privates  # the check sees them
    offences = {
        name: hits
        for name, tree in trees.items()
        if name not in STORE_MODULES | {FOREIGN_PRIVATES} and (hits := reached(tree, privates))
    }
    assert offences == {}
    assert not top_level_imports(FOREIGN_PRIVATES, trees[FOREIGN_PRIVATES]) & STORE_MODULES


def test_the_check_finds_a_reach_into_a_store_private() -> None:
    tree = ast.parse("def f(store):\n    return store._insert(1)\n")
    assert reached(tree, {"_insert"}) == ["line 2: store._insert"]
    assert reached(ast.parse("self._insert(1)"), {"_insert"}) == []


def top_level_imports(name: str, tree: ast.Module) -> set[str]:
    """The package's modules ``tree`` imports when it is imported (not under TYPE_CHECKING)."""
    package = name.split(".")[:-1] if name != "__init__" else []
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1
                parts = ["hermes_orm", *package[: len(package) - node.level + 1]]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("hermes_orm."):
                found.add(target.removeprefix("hermes_orm."))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles of ``graph`` (module -> the modules it imports), each once."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    trees = modules()
    graph = {
        name: {t for t in top_level_imports(name, tree) if t in trees and t != name}
        for name, tree in trees.items()
    }
    assert graph["store"], "the graph holds the package's imports"
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("attribute", sorted(SQLALCHEMY_PRIVATES))
def test_sqlalchemy_privates_are_read_in_one_module(attribute: str) -> None:
    readers = sorted(
        name
        for name, tree in modules().items()
        if reached(tree, {attribute}) and name != FOREIGN_PRIVATES
    )
    assert readers == []


def test_ci_pins_every_store_dependency_at_its_lower_bound() -> None:
    """CI's run on the lowest releases installs what devtools/lowest_pins.py prints: each
    dependency of the package and of its postgres and async extras, at its bound."""
    import tomllib

    from devtools.lowest_pins import EXTRAS, lowest_pins

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"])
    for extra in EXTRAS:
        wanted += project["optional-dependencies"][extra]
    pins = {
        pin.split("[")[0].split("==")[0].lower(): pin
        for pin in lowest_pins(root / "pyproject.toml")
    }
    for requirement in wanted:
        if requirement.startswith(project["name"]):
            continue
        name = requirement.split("[")[0].split(">=")[0].strip().lower()
        bound = requirement.split(">=")[1].split(",")[0].strip()
        assert pins[name].endswith(f"=={bound}"), (requirement, pins)
    assert "[asyncio]" in pins["sqlalchemy"]  # the async extra's, with its greenlet
