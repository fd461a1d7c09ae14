"""The engine options of `run` and `worker` are refused by the command line itself when out of range."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from producer.cli import cli


@pytest.mark.parametrize("command", ["worker", "run"])
def test_an_unknown_quantization_is_refused_naming_the_choices(command: str) -> None:
    arguments = [command, "--quantization", "fp9"] + (["prompts.jsonl"] if command == "run" else [])
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 2
    assert "fp9" in result.output and "fp8" in result.output
