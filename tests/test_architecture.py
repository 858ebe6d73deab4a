"""The package's shape (docs/architecture.md): no import circles, and no import hidden inside a
function to dodge one. Read from the source with ``ast``; nothing is imported.

Every ``import dynamics.x`` / ``from dynamics.x import y`` counts, at module level or inside a
function, so a function-level import that closes a circle is caught as a circle. An edge points
at the most specific module named (``from dynamics.training import loop`` -> dynamics.training.loop)
and, as Python runs them first, at the packages above it (``dynamics.training``), but for the root
package (its ``__getattr__`` imports lazily) and the importer's own packages (already running).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dynamics"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of a dynamics module."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names
                             if alias.name.split(".")[0] == "dynamics")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "dynamics":
                for alias in child.names:
                    target = f"{child.module}.{alias.name}"
                    found.append((target if target in known else child.module, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def packages_above(name: str) -> list[str]:
    """``dynamics.a.b.c`` -> ``[dynamics.a, dynamics.a.b]`` (the root package left out)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph = {}
    for name, path in found.items():
        own = {name, *packages_above(name)}
        targets = set()
        for target, _, _ in imports_of(path, known):
            targets |= {target, *packages_above(target)} - own
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_import_graph_has_no_circle():
    assert cycles(import_graph()) == []


def test_the_circle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_say_why():
    """A dynamics import inside a function is allowed for start-up time only, with a comment on
    that line or the one above saying so (``# lazy: ...``)."""
    known = set(modules())
    unexplained = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for target, line, in_function in imports_of(path, known):
            context = " ".join(lines[max(line - 2, 0) : line])
            if in_function and "lazy" not in context:
                unexplained.append(f"{name}:{line} imports {target}")
    assert unexplained == []


@pytest.mark.parametrize("package, forbidden", [
    ("dynamics.models", "dynamics.perturbations"),  # models know no perturbation
    ("dynamics.adapters", "dynamics.perturbations"),  # adapters and perturbations are separate
    ("dynamics.analysis", "dynamics.training"),  # the pure analysis reads arrays, not runs
    ("dynamics.analysis", "dynamics.runs"),
    ("dynamics.figures", "dynamics.training"),  # figures read frames, never torch
])
def test_layers_only_import_downwards(package, forbidden):
    graph = import_graph()
    offending = sorted(f"{source} -> {target}" for source, targets in graph.items()
                       if source == package or source.startswith(package + ".")
                       for target in targets if target == forbidden or target.startswith(forbidden + "."))
    assert offending == []


def test_every_module_imports_first_in_a_fresh_package():
    """Import each module as the first one of the package (the others dropped from sys.modules):
    an import-order circle fails here whichever module a user imports first."""
    import subprocess
    import sys

    names = sorted(name for name in modules() if name != "dynamics.__main__")
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'dynamics' or m.startswith('dynamics.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
