"""The package's layout: data flows one way between subpackages, and modules stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unetpp3d"

# Lower layers never import higher ones. Shared leaves at the bottom, then the stages in the
# order data flows through them, then the bundle and the commands that orchestrate them.
LAYERS = [
    {"errors", "strictjson"},
    {"tasks", "geometry", "hardware", "atomic", "readable"},
    {"config", "preview", "outputs"},
    {"imageio"},
    {"data", "model"},
    {"synth", "evaluation"},
    {"training", "inference"},
    {"bundle"},
    {"commands"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_LINES = 520  # "about 500": a module a newcomer reads in one sitting


def _unit(path: Path) -> str:
    """The subpackage (or top-level module) a file belongs to."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imports(path: Path) -> set[str]:
    """The units of unetpp3d that ``path`` imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "unetpp3d":
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "unetpp3d" and len(parts) > 1:
                    found.add(parts[1])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _unit(p) not in ("__init__", "__main__"))


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in MODULES}
    assert units <= set(RANK), f"add {sorted(units - set(RANK))} to LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_imports_upwards(path):
    unit = _unit(path)
    upward = []
    for target in _imports(path) - {unit}:
        if target == "__init__":  # the package root: only its version string is shared downwards
            if unit != "commands":
                upward.append(target)
        elif RANK[target] >= RANK[unit]:
            upward.append(target)
    assert not upward, f"{path.relative_to(PACKAGE)} ({unit}, layer {RANK[unit]}) imports {sorted(upward)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_readable(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it along a seam"
