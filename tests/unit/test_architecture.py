"""The package's layers import one way: core <- schema <- envs <- actors <- data <- callbacks <- learner <- cli.

A module may import from its own layer or a lower one, never a higher one; ``core`` knows nothing of
torchrl, TensorDicts or Lightning.
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "lit_impala"

# Lowest first. A module's layer is that of the longest prefix listed here.
LAYERS = [
    ("lit_impala.core", "lit_impala.config", "lit_impala.interrupts", "lit_impala.video", "lit_impala.wandb_history",
     "lit_impala.checkpoint_io", "lit_impala.checkpoints", "lit_impala.schedule"),
    ("lit_impala.schema",),
    ("lit_impala.envs",),
    ("lit_impala.actors", "lit_impala.play", "lit_impala.remote"),
    ("lit_impala.data",),
    ("lit_impala.callbacks",),
    ("lit_impala.learner",),
    ("lit_impala.cli", "lit_impala.__main__", "lit_impala.export"),
    ("lit_impala.launch",),  # runs `python -m lit_impala fit` processes; its settings check builds them with cli
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer: add it to LAYERS"
    return max(matches)[1]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_point_down_the_layers(path):
    name = module_name(path)
    upward = []
    for imported in imports(path):
        if not imported.startswith("lit_impala.") or not _is_module(imported):
            continue
        if layer(imported) > layer(name):
            upward.append(imported)
    assert not upward, f"{name} (layer {layer(name)}) imports from higher layers: {sorted(upward)}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").rglob("*.py")), ids=lambda p: p.stem)
def test_core_is_pure_torch(path):
    third_party = {name.split(".")[0] for name in imports(path)}
    assert not third_party & {"torchrl", "tensordict", "lightning"}, f"{path.name} imports {third_party}"


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split("."))
    return (REPO / relative).with_suffix(".py").is_file() or (REPO / relative / "__init__.py").is_file()


def test_the_lit_impala_script_is_python_m_lit_impala():
    """``lit-impala`` (pyproject's script) runs what ``python -m lit_impala`` runs, the Ctrl-C shield included."""
    import importlib

    import tomllib

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["lit-impala"]
    module_name, _, function = target.partition(":")
    assert module_name == "lit_impala.__main__"
    assert callable(getattr(importlib.import_module(module_name), function))
