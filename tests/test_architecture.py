"""The package's import structure: the networks below the presets, no import cycle, lazy imports only where needed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fpt_monai"
#: Modules that may be imported inside a function: optional extras and platform-only modules.
LAZY_IMPORTS_ALLOWED = ("nvflare", "fcntl")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path):
    """(imported module name, whether the import runs inside a function or class) of every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def walk(node, nested):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                yield from ((alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                yield child.module, nested
                yield from ((f"{child.module}.{alias.name}", nested) for alias in child.names)
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            yield from walk(child, inner)

    return list(walk(tree, False))


def _package_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_the_networks_import_nothing_above_them():
    above = ("fpt_monai.presets", "fpt_monai.pretrained", "fpt_monai.weights", "fpt_monai.data", "fpt_monai.preload",
             "fpt_monai.engine", "fpt_monai.bundle", "fpt_monai.cli", "fpt_monai.conventions")
    found = [(module, imported) for module, path in MODULES.items() if module.startswith("fpt_monai.networks")
             for imported, _ in _imports(path) if imported.startswith(above)]
    assert not found, f"fpt_monai.networks imports modules that build on it: {found}"


def test_the_package_has_no_import_cycle():
    graph = {module: set() for module in MODULES}
    for module, path in MODULES.items():
        for imported, _ in _imports(path):
            target = _package_module(imported) if imported.startswith("fpt_monai") else None
            if target and target != module and not module.startswith(target + "."):  # a package's own __init__
                graph[module].add(target)
    # depth-first search for a back edge
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_imports_inside_functions_are_only_for_optional_dependencies():
    lazy = sorted({(module, imported.split(".")[0] if not imported.startswith("fpt_monai") else imported)
                   for module, path in MODULES.items() for imported, nested in _imports(path)
                   if nested and not imported.startswith(LAZY_IMPORTS_ALLOWED)})
    assert not lazy, f"imports inside functions (move them to the module's top): {lazy}"


def test_the_factories_read_from_the_networks_still_work_and_say_where_they_are():
    import fpt_monai.networks as networks
    import fpt_monai.presets as presets

    for name in sorted(networks.MOVED_TO_PRESETS):
        with pytest.warns(DeprecationWarning, match=f"fpt_monai.presets.{name}"):
            assert getattr(networks, name) is getattr(presets, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        networks.no_such_name  # noqa: B018
