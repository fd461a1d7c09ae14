"""The README documents every setting (house rule: default, environment variable and a README line) and
every error code a request can end with."""

from __future__ import annotations

import re
from pathlib import Path

from schema.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# Where the code names an error code: line errors, engine error classes, the worker's own codes.
CODE_PATTERNS = (r'LineError\(\s*"([a-z_]+)"', r'^\s+code = "([a-z_]+)"', r'^[A-Z_]+ = "([a-z_]+)"(?:  #.*)?$',
                 r"coalesce\(staged\.error_code, '([a-z_]+)'\)", r'RequestState\.\w+: "([a-z_]+)"')


def test_every_setting_has_a_readme_line() -> None:
    for name in Settings.model_fields:
        assert f"`DEEPBATCH_{name.upper()}`" in README, name


def codes_in_source() -> set[str]:
    codes = set()
    for path in [*ROOT.glob("schema/*.py"), *ROOT.glob("producer/*.py"), *ROOT.glob("worker/**/*.py")]:
        text = path.read_text()
        for pattern in CODE_PATTERNS:
            codes.update(re.findall(pattern, text, flags=re.MULTILINE))
    return codes


def test_every_error_code_is_snake_case_and_has_a_readme_row() -> None:
    codes = codes_in_source()
    assert {"invalid_json", "prompt_too_long", "engine_unavailable", "worker_lost", "batch_cancelled",
            "duplicate_custom_id", "internal_error"} <= codes  # the patterns still find them
    for code in codes:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code), code
        assert f"| `{code}` |" in README, code
