"""The package's shape (docs/architecture.md): no import circles, no import hidden inside a
function without saying why, and no function longer than a reader takes in at one look. Read from
the source with ``ast``; nothing is imported (but by the last test, which imports every module).

Every ``import dynamics.x`` / ``from dynamics.x import y`` counts, at module level or inside a
function, so a function-level import that closes a circle is caught as a circle. An edge points
at the most specific module named (``from dynamics.training import loop`` -> dynamics.training.loop)
and, as Python runs them first, at the packages above it (``dynamics.training``), but for the root
package (its ``__getattr__`` imports lazily) and the importer's own packages (already running).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import launch
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


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement inside a function, ours and third-party."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, child.module or "."))
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


def says_lazy(lines: list[str], line: int) -> bool:
    """Whether the import on ``line`` (1-based) carries ``lazy`` in a comment: on its own line, on
    the line above, or above the block of imports it opens or belongs to."""
    index = line - 1
    while index > 0 and lines[index - 1].strip().startswith(("import ", "from ")):
        index -= 1  # up to the first import of the block
    return any("lazy" in text for text in (lines[line - 1], *lines[max(index - 1, 0) : line]))


def test_imports_at_the_top_unless_they_say_why():
    """An import inside a function, of a dynamics module or a third-party one, is allowed for
    start-up time (or an optional dependency) only, with a comment saying so (``# lazy: ...``):
    reading runs and drawing figures must not import torch, and the CLI starts in a second."""
    unexplained = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "studies").rglob("*.py")]:
        lines = path.read_text().splitlines()
        for line, module in function_level_imports(path):
            if not says_lazy(lines, line):
                unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert unexplained == []


def test_the_lazy_rule_reads_blocks():
    lines = ["def f():", "    # lazy: torch", "    import numpy", "    import torch", "    x = 1", "    import os"]
    assert says_lazy(lines, 3) and says_lazy(lines, 4) and not says_lazy(lines, 6)


MAX_FUNCTION_LINES = 80  # docstring included: a function a reader takes in at one look


def function_lengths() -> list[tuple[int, str]]:
    """``(lines, "path:name")`` of every function and method in the repository's Python files,
    longest first."""
    root = PACKAGE.parent
    lengths = []
    for path in root.rglob("*.py"):
        if {".venv", "build", ".git"} & set(path.relative_to(root).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.name}"))
    return sorted(lengths, reverse=True)


def test_no_function_is_longer_than_80_lines():
    lengths = function_lengths()
    print(f"longest function: {lengths[0][1]}, {lengths[0][0]} lines")  # shown with pytest -s
    assert [entry for entry in lengths if entry[0] > MAX_FUNCTION_LINES] == []


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
    names = sorted(name for name in modules() if name != "dynamics.__main__")
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'dynamics' or m.startswith('dynamics.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = launch.run_code(script, timeout=600)  # torch & co. preloaded; every dynamics module dropped first
    assert result.returncode == 0, result.stderr[-2000:]


def test_ruff_passes_on_every_python_file_and_notebook():
    """`make lint`, run by the suite: ruff over the whole repository (studies/, benchmarks/, tests/
    and the notebooks included), with the settings of pyproject.toml."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=PACKAGE.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]


if __name__ == "__main__":  # python tests/test_architecture.py: the shape in two lines, no pytest needed
    circles = cycles(import_graph())
    longest_lines, longest_name = function_lengths()[0]
    print(f"import circles: {circles or 'none'}")
    print(f"longest function: {longest_name}, {longest_lines} lines (at most {MAX_FUNCTION_LINES})")
