"""The documentation stays in step with the code: every setting is in the README, api.md matches the design."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [f"CARE_{name.upper()}" for name in Settings.model_fields if f"`CARE_{name.upper()}`" not in readme]
    assert not missing, f"README.md's configuration table lacks {missing}"


def test_readme_shows_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme


def test_docs_api_starts_with_the_design_contract() -> None:
    design = ROOT.parent / "shared" / "design" / "api.md"
    if not design.is_file():
        pytest.skip("the design folder is not beside this checkout")
    assert (ROOT / "docs" / "api.md").read_text().startswith(design.read_text())
