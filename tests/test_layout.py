"""The package's layout rules (CONTRIBUTING.md), checked on its source: no import cycle, layers that import only
downwards, short modules, and one definition of every default."""

from __future__ import annotations

import ast
import re

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "ladder_kernels"
MAX_MODULE_LINES = 500


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path) -> set[str]:
    """The ladder_kernels modules a file imports, anywhere in it (a function-level import is a dependency too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import (the package imports absolutely)")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ladder_kernels"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ladder_kernels"))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in package_imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            # a package's __init__ re-exporting its own submodules is not a cycle of the code
            if node.startswith(dep + ".") or dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("ladder_kernels.kernels", "ladder_kernels.ops"),  # kernels implement contracts; they never call the ops
        ("ladder_kernels.ops", "ladder_kernels.nn"),
        ("ladder_kernels.quant", "ladder_kernels.ops"),
        ("ladder_kernels.nn", "ladder_kernels.train"),
        ("ladder_kernels.planning.planner", "ladder_kernels.train"),  # planning needs no training code
        ("ladder_kernels.planning.methods", "ladder_kernels.train"),
        ("ladder_kernels.planning.memory", "ladder_kernels.train"),
        ("ladder_kernels.train", "ladder_kernels.cli"),
        ("ladder_kernels.planning", "ladder_kernels.cli"),
    ],
)
def test_layers_import_only_downwards(graph, layer, forbidden):
    offenders = {
        m: sorted(d for d in deps if d.startswith(forbidden)) for m, deps in graph.items() if m.startswith(layer)
    }
    assert not {m: d for m, d in offenders.items() if d}, f"{layer} must not import {forbidden}"


def test_no_module_is_long():
    lengths = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in lengths.items() if n > MAX_MODULE_LINES} == {}


ONE_HOME = (
    "METHODS",
    "DEFAULT_LR",
    "DTYPES",
    "LADDER_STORAGES",
    "BACKENDS",
    "DEFAULT_LADDER_EVERY",
    "DEFAULT_EVAL_SAMPLES",
    "TASKS",
    "LORA_R",
    "default_xladder_depth",
    "ConfigError",
    "DataError",
    "ModelError",
    "RunDirError",
    "TrainingError",
    "write_text_atomic",
    "write_bytes_atomic",
    "format_gib",
    "parse_bytes",
    "dequantize_packed",
)


@pytest.mark.parametrize("name", ONE_HOME)
def test_each_default_has_one_definition(name):
    pattern = re.compile(rf"^(?:{name}\b[^=\n]*=|def {name}\b|class {name}\b)", re.M)
    homes = [module_name(p) for p in PACKAGE.rglob("*.py") for _ in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert len(homes) == 1, f"{name} is defined in {homes}"


def test_every_cli_subcommand_has_its_module():
    from ladder_kernels.cli import SUBCOMMANDS

    assert sorted(p.stem for p in (PACKAGE / "cli").glob("*.py") if p.stem != "__init__") == sorted(SUBCOMMANDS)
