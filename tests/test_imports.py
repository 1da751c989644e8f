"""The installed package's import graph: no cycle, and the core reaches methods and suites only
through the registries (entry points).

Every module of the installed `harness` package (the core and `harness.methods`,
`harness.suites`, `harness.kernels`, `harness.leaderboard`, wherever setuptools maps them from)
is parsed, and each `import` / `from ... import` statement in it, at any depth (imports inside
functions count), is an edge to the module it names: `from pkg import name` goes to `pkg.name`
when that is a module, else to `pkg`. A package's `__init__`, which Python runs before any of
its submodules, is an edge only where a statement names it. The core is every module but
`harness.methods.*` and `harness.suites.*`; the leaderboard counts as core (it reads the store
and the registries, never a method or suite module).
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import pytest

PLUGINS = ("harness.methods", "harness.suites")
# the packages pyproject maps from other folders (package-dir): an editable install finds them by
# name only, not by listing harness/
MAPPED = ("harness.methods", "harness.suites", "harness.kernels", "harness.leaderboard")


def installed_modules() -> dict[str, Path]:
    """Module name -> source file, for `harness` and every subpackage, as installed."""
    found: dict[str, Path] = {}

    def walk(package: str) -> None:
        spec = importlib.util.find_spec(package)
        found[package] = Path(spec.origin)
        for info in pkgutil.iter_modules(spec.submodule_search_locations):
            name = f"{package}.{info.name}"
            if info.ispkg:
                walk(name)
            else:
                found[name] = Path(importlib.util.find_spec(name).origin)

    for package in ("harness", *MAPPED):
        if package not in found:
            walk(package)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        edges = set()
        for target in targets:
            while target and target not in modules:  # `import harness.x.y` of a function-free name: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def is_plugin(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PLUGINS)


@pytest.fixture(scope="module")
def graph():
    return import_graph(installed_modules())


def test_the_walk_sees_every_part_of_the_package(graph):
    for name in (
        "harness.cli",
        "harness.families.hf_softmax",
        "harness.zoo.mqar",
        "harness.methods.leank",
        "harness.suites.mqar",
        "harness.kernels.fla_cpu",
        "harness.leaderboard.app",
    ):
        assert name in graph, name
    assert "harness.registry" in graph["harness.compress"]  # a top-level import
    assert "harness.families" in graph["harness.compress"]  # an import inside a function


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_core_reaches_methods_and_suites_only_through_the_registries(graph):
    reaching = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if not is_plugin(module)
        for target in targets
        if is_plugin(target) and target not in PLUGINS
    )
    assert reaching == []
