"""The package's structure, read from the source with `ast`: what may import what.

The rules (issue 15): no import cycle inside `lbnat` (a function-local import that dodges one
counts too); no private name imported from another module; the load balancer imports nothing
from the tools beside it (`lbnat_lab`, `lbnat_bench`, `scripts`); `lbnat.config` and the modules it
builds on import nothing from `lbnat.dataplane` or `lbnat.health`; the pure modules import no
I/O module of the standard library.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lbnat"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """(imported module, names taken from it, under TYPE_CHECKING) for every import of a module."""
    tree = ast.parse(MODULES[name].read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for child in ast.walk(node))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), id(node) in typing_only
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = tuple(alias.name for alias in node.names)
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            if submodules:  # `from lbnat import fields` imports the module lbnat.fields
                for submodule in submodules:
                    yield submodule, (), id(node) in typing_only
                rest = tuple(n for n in names if f"{base}.{n}" not in MODULES)
                if rest:
                    yield base, rest, id(node) in typing_only
            else:
                yield base, names, id(node) in typing_only


def graph() -> dict[str, set[str]]:
    """lbnat's run-time import graph (imports under TYPE_CHECKING left out: they never run)."""
    return {
        name: {target for target, _, typing in imports(name) if target in MODULES and not typing}
        for name in MODULES
    }


def test_no_import_cycle() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if target.startswith(name + "."):  # a package importing its own submodule
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_private_name_imported_from_another_module() -> None:
    private = [
        f"{name}: {target}.{taken}"
        for name in MODULES
        for target, names, _ in imports(name)
        for taken in names
        if taken.startswith("_") and not taken.startswith("__")
    ]
    assert private == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_load_balancer_imports_no_tool(name: str) -> None:
    tools = [
        t for t, _, _ in imports(name) if t.split(".")[0] in {"lbnat_lab", "lbnat_bench", "scripts"}
    ]
    assert tools == []


def closure(name: str) -> set[str]:
    edges, seen, todo = graph(), set[str](), [name]
    while todo:
        for target in edges[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_config_imports_nothing_from_the_data_plane_or_health() -> None:
    reached = closure("lbnat.config")
    assert sorted(m for m in reached if m.startswith(("lbnat.dataplane.", "lbnat.health."))) == []


# The modules docs/architecture.md calls pure, without a qualification: none of them opens a
# socket or a file, starts a thread or a process, sleeps or reads the clock (`now` comes in).
# (Importing `socket` for inet_aton/inet_ntoa is fine: those are pure functions.)
PURE = [
    "lbnat.packet",
    "lbnat.nat",
    "lbnat.checkpoint",
    "lbnat.scheduler",
    "lbnat.engine",
    "lbnat.backends",
    "lbnat.service",
    "lbnat.registry",
    "lbnat.control.plane",
    "lbnat.fields",
    "lbnat.health_settings",
    "lbnat.health.state",
    "lbnat.messages",
    "lbnat.views",
    "lbnat.drops",
    "lbnat.actions",
    "lbnat.syncookie",
    "lbnat.synproxy",
    "lbnat.linkwatch",
    "lbnat.syncwire",
]
IO_CALLS = {
    "socket": {"socket", "socketpair", "create_connection", "create_server", "fromfd"},
    "time": {"time", "monotonic", "perf_counter", "sleep", "time_ns", "monotonic_ns"},
    "threading": None,  # None: every name
    "subprocess": None,
    "multiprocessing": None,
    "select": None,
    "mmap": None,
    "os": {"open", "read", "write", "fork", "system", "popen", "kill", "getpid"},
}


def io_uses(name: str) -> list[str]:
    tree = ast.parse(MODULES[name].read_text())
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = IO_CALLS.get(node.value.id, set())
            if node.value.id in IO_CALLS and (names is None or node.attr in names):
                uses.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in IO_CALLS:
            names = IO_CALLS[node.module]
            uses += [
                f"from {node.module} import {a.name}"
                for a in node.names
                if names is None or a.name in names
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "open"
        ):
            uses.append("open()")
    return uses


@pytest.mark.parametrize("name", PURE)
def test_a_pure_module_does_no_io(name: str) -> None:
    assert io_uses(name) == []
