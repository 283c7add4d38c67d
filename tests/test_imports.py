"""The package's import graph: no cycles, and imports at the top of a module.

The graph is read from the source (``ast``), so imports inside functions count as much as those at
the top: a cycle hidden in a function is still a cycle.  The command line is the one module that
imports the library inside its functions, so that ``instructedit-lite --help`` and each command load
only what they use.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "instructedit_lite"
#: Modules allowed to import the package's own modules inside functions.
LAZY = {"instructedit_lite.cli"}


def module_names(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(package: Path) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """``(module -> the package's modules it imports, [(module, line, target)] of imports inside
    functions)``."""
    modules = module_names(package)
    root = package.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    inner = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(node) for node in tree.body}
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if not (target == root or target.startswith(root + ".")):
                    continue
                while target not in modules:
                    target = target.rpartition(".")[0]
                if target != name:
                    graph[name].add(target)
                    if id(node) not in top:
                        inner.append((name, node.lineno, target))
    return graph, inner


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def test_the_package_has_no_import_cycle():
    graph, _ = import_graph(PACKAGE)
    assert len(graph) > 40
    found = cycle(graph)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_library_imports_its_modules_at_the_top():
    _, inner = import_graph(PACKAGE)
    stray = [f"{m}:{line} imports {t}" for m, line, t in inner if m not in LAZY]
    assert not stray, "imports inside functions (move them to the top of the module):\n" + "\n".join(stray)


@pytest.mark.parametrize("inside_function", [False, True])
def test_a_cycle_is_found_where_it_hides(tmp_path, inside_function):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    body = "def g():\n    from .a import f\n    return f\n" if inside_function else "from . import a\n\ndef g():\n    return a\n"
    (package / "b.py").write_text(body)
    graph, inner = import_graph(package)
    assert set(cycle(graph)) == {"pkg.a", "pkg.b"}
    assert bool(inner) is inside_function
