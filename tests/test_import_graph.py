"""The package's import graph is a tree of layers (DESIGN.md: imports point down only): it has no cycle.

The graph is read from the source, not from ``sys.modules``, so an import inside a function counts as much as one at
the top of a module: a late import only postpones a circle to the first call, it does not remove it. Imports under
``if TYPE_CHECKING:`` never run and do not count, nor do ``importlib.import_module`` calls with a name in a string
(``perceiver_fast.__getattr__``'s lazy exports), which are data rather than import statements. Importing a module
from outside its package runs the package's ``__init__`` first, and that counts as an import of the ``__init__``
(see :func:`_packages_entered`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "perceiver_fast"
PACKAGE_ROOT = Path(__file__).resolve().parents[1] / PACKAGE


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` (both dotted module names; a package is its ``__init__``) at ``line``."""

    source: str
    target: str
    line: int


def package_modules(root: Path = PACKAGE_ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root`` (``a/b/__init__.py`` is ``a.b``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, function and class bodies included, except the body of an
    ``if TYPE_CHECKING:`` (its ``else`` runs, so it counts)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.orelse:
                yield from _import_nodes(ast.Module(body=[statement], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """The module ``name`` is, or lies in (an attribute path like ``pkg.mod.func``): its longest known prefix."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: Mapping[str, Path]) -> set[str]:
    """The modules of this package that ``node`` (in ``module``) imports directly.

    ``from pkg import name`` imports ``pkg.name`` when that is a module, else ``pkg`` itself (its ``__init__``).
    """
    if isinstance(node, ast.Import):
        found = (_known(alias.name, modules) for alias in node.names)
        return {t for t in found if t is not None}
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if _known(base, modules) is None:
        return set()
    targets = set()
    for alias in node.names:
        child = f"{base}.{alias.name}"
        targets.add(child if child in modules else _known(base, modules))
    return targets


def _packages_entered(source: str, target: str, modules: Mapping[str, Path]) -> list[str]:
    """The packages whose ``__init__`` importing ``target`` from ``source`` runs first: those above ``target``
    that do not contain ``source``.

    Python runs every package above a module before the module. From inside a package that package has already
    started, so a sibling import does not run it again; counting it would make every package whose ``__init__``
    re-exports its submodules a circle with each submodule that imports a sibling. From outside, the ``__init__``
    is a real dependency: ``import pkg.core.position`` runs everything ``pkg/core/__init__.py`` imports.
    """
    parts = target.split(".")
    entered = []
    for end in range(1, len(parts)):
        package = ".".join(parts[:end])
        if package in modules and source != package and not source.startswith(package + "."):
            entered.append(package)
    return entered


def import_graph(root: Path = PACKAGE_ROOT, package: str = PACKAGE) -> dict[str, list[Edge]]:
    """Module -> the edges to the modules of the package it imports anywhere in its source."""
    modules = package_modules(root, package)
    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges = {}
        for node in _import_nodes(tree):
            for target in _targets(node, module, is_package, modules):
                for reached in (*_packages_entered(module, target, modules), target):
                    edges.setdefault(reached, Edge(module, reached, node.lineno))
        graph[module] = sorted(edges.values(), key=lambda e: e.target)
    return graph


def strongly_connected_components(graph: Mapping[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to meet); each component's modules sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            edge = next(edges, None)
            if edge is not None:
                target = edge.target
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(graph.get(target, []))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def shortest_cycle(graph: Mapping[str, list[Edge]], component: list[str]) -> list[Edge]:
    """A shortest circle through the first module of ``component`` (breadth-first, inside the component)."""
    start, members = component[0], set(component)
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target not in members:
                    continue
                if edge.target == start:
                    cycle = [edge]
                    while cycle[0].source != start:
                        cycle.insert(0, came_by[cycle[0].source])
                    return cycle
                if edge.target not in came_by:
                    came_by[edge.target] = edge
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"{component} is not a cycle")


def cycles(graph: Mapping[str, list[Edge]]) -> list[tuple[list[str], list[Edge]]]:
    """Each circle of the graph as (its strongly connected component, one shortest cycle in it)."""
    found = []
    for component in strongly_connected_components(graph):
        self_import = any(e.target == component[0] for e in graph[component[0]])
        if len(component) > 1 or self_import:
            found.append((component, shortest_cycle(graph, component)))
    return found


def describe(component: list[str], cycle: list[Edge]) -> str:
    steps = "\n".join(f"    {e.source} -> {e.target}  (line {e.line})" for e in cycle)
    return f"{len(component)} modules in one circle: {', '.join(component)}\n  for example:\n{steps}"


# ----------------------------------------------------------------------------------------------------------------
#  The package
# ----------------------------------------------------------------------------------------------------------------


def test_the_import_graph_has_no_cycle():
    found = cycles(import_graph())
    if found:
        report = "\n".join(describe(component, cycle) for component, cycle in found)
        pytest.fail(f"the import graph of {PACKAGE} has {len(found)} circle(s):\n{report}", pytrace=False)


# ----------------------------------------------------------------------------------------------------------------
#  The graph builder itself, on a small package written for the purpose
# ----------------------------------------------------------------------------------------------------------------


def _write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_builder_counts_late_relative_and_package_imports_but_not_type_checking(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import top\n",
        "top.py": "def f():\n    from .sub import low\n",
        "sub/__init__.py": "from . import low\n",
        "sub/low.py": "import os\nfrom ..top import f\nfrom pkg.top import f as g\n",
        "sub/other.py": "from pkg.sub.low import x\nimport pkg.sub\n",
    })
    graph = import_graph(root, "pkg")
    targets = {module: [e.target for e in edges] for module, edges in graph.items()}
    assert targets == {
        "pkg": [],
        "pkg.top": ["pkg.sub", "pkg.sub.low"],  # importing pkg.sub.low from outside pkg.sub runs its __init__
        "pkg.sub": ["pkg.sub.low"],
        "pkg.sub.low": ["pkg.top"],
        "pkg.sub.other": ["pkg.sub", "pkg.sub.low"],  # from inside, pkg.sub counts only where it is named
    }
    found = cycles(graph)
    assert [component for component, _ in found] == [["pkg.sub", "pkg.sub.low", "pkg.top"]]


def test_builder_finds_a_self_import_and_reports_a_shortest_cycle(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "import pkg.b\nimport pkg.c\n",
        "b.py": "import pkg.c\n",
        "c.py": "def g():\n    import pkg.a\n",
        "d.py": "from pkg import d\n",
    })
    found = cycles(import_graph(root, "pkg"))
    assert [component for component, _ in found] == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.d"]]
    assert [(e.source, e.target, e.line) for e in found[0][1]] == [("pkg.a", "pkg.c", 2), ("pkg.c", "pkg.a", 2)]
