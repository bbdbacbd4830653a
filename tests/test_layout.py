"""The house's import rules, checked on the source: no import cycle between modules, and no room
imports a higher one (the rooms follow the data: store -> manifest -> sources -> generation ->
rankers -> builder -> publish -> evaluate -> verify -> selm_train -> the entry points).

Every import counts, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("selm_data", "selm_train")

# Lowest first. A module may import modules of its own room and of lower rooms only.
ROOMS = (
    "selm_data.errors",
    "selm_data.store",
    "selm_data.manifest",
    "selm_data.sources",
    "selm_data.generation",
    "selm_data.rankers",
    "selm_data.builder",
    "selm_data.publish",
    "selm_data.evaluate",
    "selm_data.verify",  # the whole store, snapshots included
    "selm_data.view",  # the read-only web viewer of the store
    "selm_train",
    "selm_data.cli",
    "selm_train.cli",
    "selm_data",  # the package facade (__init__): imports from below; nothing imports it
)


def modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, anywhere in its body."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:  # `from pkg import module` depends on the module
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, known) for name, path in found.items()}


def room(module: str) -> int:
    """The index of the most specific room holding `module`."""
    best = max((r for r in ROOMS if module == r or module.startswith(r + ".")), key=len)
    return ROOMS.index(best)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a higher room than the importer's, as 'a -> b' lines."""
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if room(b) > room(a))


def test_every_module_has_a_room():
    for module in modules():
        assert room(module) >= 0


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_room_imports_a_higher_room():
    assert upward(graph()) == []


def test_nothing_imports_an_entry_point_or_the_facade():
    entry = {"selm_data.cli", "selm_train.cli", "selm_data"}
    assert sorted(f"{a} -> {b}" for a, t in graph().items() for b in t if b in entry) == []


def test_each_room_says_what_it_holds_and_may_import():
    for name in ROOMS:
        path = REPO / Path(*name.split(".")) / "__init__.py"
        if name.count(".") == 1 and path.is_file():
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            assert "May import" in doc, f"{path}: its docstring says what it may import"


@pytest.mark.parametrize("edges, bad", [
    ({"selm_data.store.store": {"selm_data.store.leases"},
      "selm_data.store.leases": {"selm_data.store.store"}}, "cycle"),
    ({"selm_data.store.store": {"selm_data.rankers.base"}, "selm_data.rankers.base": set()},
     "upward"),
])
def test_the_checks_catch_what_they_guard(edges, bad):
    """A planted cycle and a planted upward import are found (the checks can fail)."""
    assert bool(cycles(edges)) == (bad == "cycle")
    assert bool(upward(edges)) == (bad == "upward")


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    source = "def f():\n    from selm_data.rankers import factory\n    from . import pairing\n"
    path = tmp_path / "iteration.py"
    path.write_text(source)
    known = {"selm_data.rankers.factory", "selm_data.builder.pairing"}
    assert imports("selm_data.builder.iteration", path, known) == known
