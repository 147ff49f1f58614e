"""The package layout's rules, checked on the source with ``ast`` (docs/design.md).

- no import cycles between the modules of ``controller`` and ``statemachines``;
- ``statemachines`` never imports ``controller``;
- ``statemachines`` never imports or executes user modules (no importlib, no exec/eval/compile);
- no source module over the size the design allows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("controller", "statemachines")
MAX_LINES = 650  #: "no source module over ~600 lines"; exceptions are named in docs/design.md
#: modules that may import code by name; none in statemachines
DYNAMIC_IMPORTS = frozenset({"importlib", "importlib.util", "imp", "runpy", "pkgutil"})
BUILTINS_THAT_RUN_CODE = frozenset({"exec", "eval", "compile", "__import__"})
LOADERS = frozenset({"exec_module", "import_module", "spec_from_file_location", "run_path"})


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


MODULES = _sources()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str, path: Path) -> set[str]:
    """Every project module ``module`` imports (at any depth of its code)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # the deepest project module the name refers to
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_the_walk_finds_the_packages() -> None:
    assert "controller.client" in MODULES and "statemachines.expressions" in MODULES
    assert GRAPH["controller.client"], "the walk sees imports"


def test_no_import_cycles() -> None:
    # importing a package runs its __init__, which imports what it re-exports: a real edge
    edges = GRAPH
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_statemachines_never_imports_controller() -> None:
    bad = {
        module: sorted(dep for dep in deps if dep.split(".")[0] == "controller")
        for module, deps in GRAPH.items()
        if module.split(".")[0] == "statemachines"
    }
    assert not {m: d for m, d in bad.items() if d}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] == "statemachines"))
def test_statemachines_runs_no_user_code(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [a.name for a in node.names if a.name in DYNAMIC_IMPORTS]
        elif isinstance(node, ast.ImportFrom) and node.module in DYNAMIC_IMPORTS:
            problems.append(node.module)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in BUILTINS_THAT_RUN_CODE:
                problems.append(f"{func.id}() at line {node.lineno}")
            elif isinstance(func, ast.Attribute) and func.attr in LOADERS:
                problems.append(f".{func.attr}() at line {node.lineno}")
    assert not problems, f"{module} imports or executes code by name: {problems}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by job (docs/design.md)"


def test_every_package_ships_in_the_wheel() -> None:
    tomllib = pytest.importorskip("tomllib")
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    packages = {
        _module_name(path.parent / "__init__.py")
        for package in PACKAGES
        for path in (ROOT / package).rglob("__init__.py")
    }
    assert packages <= listed, (
        f"add to pyproject.toml [tool.setuptools] packages: {packages - listed}"
    )
