"""The README's promises: its commands exist and its config reference is current."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeguard.app.configdoc import BEGIN, END, render

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    current = readme[readme.index(BEGIN): readme.index(END) + len(END)]
    assert current == render(), "README.md's config reference is stale: run `python -m pipeguard.app.configdoc` " \
                                "and paste its output between the config-reference markers"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
