"""The README documents every setting (house rule: default, environment variable and a README line)."""

from __future__ import annotations

from pathlib import Path

from schema.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_has_a_readme_line() -> None:
    for name in Settings.model_fields:
        assert f"`DEEPBATCH_{name.upper()}`" in README, name
