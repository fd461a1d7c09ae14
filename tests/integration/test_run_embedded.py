"""`deepbatch run` with nothing configured: embedded PostgreSQL and Redis, a worker, results on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import deepbatch
from tests.integration.prompt_files import write_prompt_file

pytestmark = pytest.mark.integration


def test_run_with_embedded_services_writes_results_and_errors(tmp_path: Path) -> None:
    prompt_file = write_prompt_file(tmp_path / "prompts.jsonl", total_lines=30,
                                    broken={7: ("{oops", "invalid JSON")})
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "BROKER_URL", "DEEPBATCH_DATABASE_URL", "DEEPBATCH_BROKER_URL")}
    env.update(DEEPBATCH_DATA_DIR=str(tmp_path / "data"), DEEPBATCH_DEFAULT_MAX_TOKENS="4")
    output = tmp_path / "results.jsonl"

    completed = deepbatch("run", str(prompt_file.path), "-o", str(output), env=env, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = [json.loads(line) for line in output.read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "results.errors.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in results) == sorted(prompt_file.valid_custom_ids.values())
    assert [line["error"]["line"] for line in errors] == [7]
    assert "29 results" in completed.stderr and "1 errors" in completed.stderr
    assert (tmp_path / "data" / "postgres" / "PG_VERSION").exists()


EXPECTED_WORDS = {"capital-france": "Paris", "capital-japan": "Tokyo", "gold": "Au", "opposite": "cold",
                  "week": "7", "ocean": "Pacific", "openai-1": "Rome"}


def test_quick_start_answers_with_the_real_model(tmp_path: Path) -> None:
    """The README's first command: the example file through the whole pipeline (embedded services, a
    worker, submit, export) with SmolLM2-135M-Instruct, and the results file holds right answers."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "BROKER_URL", "DEEPBATCH_DATABASE_URL", "DEEPBATCH_BROKER_URL")}
    env.update(DEEPBATCH_DATA_DIR=str(tmp_path / "data"))
    output = tmp_path / "results.jsonl"
    example = Path(__file__).resolve().parents[2] / "examples" / "prompts.jsonl"

    completed = deepbatch("run", str(example), "--model", "smollm2-135m-instruct", "-o", str(output), env=env,
                          timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]

    answers = {}
    for line in output.read_text().splitlines():
        result = json.loads(line)
        choice = result["response"]["body"]["choices"][0]
        answers[result["custom_id"]] = choice["message"]["content"] if "message" in choice else choice["text"]
        assert result["response"]["body"]["model"] == "smollm2-135m-instruct"
    assert set(answers) == set(EXPECTED_WORDS) | {"colours", "openai-2"}
    for custom_id, word in EXPECTED_WORDS.items():
        assert word in answers[custom_id], (custom_id, answers[custom_id])
    errors = [json.loads(line) for line in (tmp_path / "results.errors.jsonl").read_text().splitlines()]
    assert [line["error"]["line"] for line in errors] == [10]
