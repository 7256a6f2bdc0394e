"""Every test module declares exactly one tier (pyproject.toml's markers), so a new file cannot forget."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TIERS = {"unit", "grpc", "multiprocess"}
TESTS = Path(__file__).resolve().parent


def _declared_marks(path: Path) -> list[str]:
    """Names of the ``pytest.mark.X`` in the module-level ``pytestmark`` assignment(s)."""
    marks = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark":
                    marks.append(sub.attr)
    return marks


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_every_test_module_declares_exactly_one_tier(path):
    assigned = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)]
    assert len(assigned) <= 1, f"{path.name}: one `pytestmark` assignment (a second replaces the first's marks)"
    tiers = [m for m in _declared_marks(path) if m in TIERS]
    assert len(tiers) == 1, f"{path.name}: add one module-level `pytestmark` tier of {sorted(TIERS)}, found {tiers}"


def test_the_tiers_are_the_markers_pyproject_registers():
    text = (TESTS.parent / "pyproject.toml").read_text()
    assert all(f'"{tier}: ' in text for tier in TIERS)
