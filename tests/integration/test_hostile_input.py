"""Hostile input through the real pipeline: every bad line gets its own error naming it; the job goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.conftest import deepbatch, job_progress, wait_until

pytestmark = pytest.mark.integration

GOOD = b'{"prompt": "fine", "max_tokens": 2}'
HOSTILE_LINES: dict[str, tuple[bytes, str]] = {
    # name: (the line's bytes, what its error must say); ERROR_CODES: the code its error file line gives
    "invalid json": (b'{"prompt": "x"', "invalid JSON"),
    "wrong type": (b'{"prompt": ["a", "b"]}', "prompt: Input should be a valid string"),
    "missing field": (b'{"custom_id": "m", "method": "POST", "url": "/v1/chat/completions", "body": {}}',
                      "body.messages: Field required"),
    "unknown url": (b'{"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}',
                    "url: Input should be '/v1/chat/completions' or '/v1/completions'"),
    "unknown field": (b'{"prompt": "x", "colour": 5}', "colour: unknown parameter 'colour'"),
    "empty line": (b"", "empty line"),
    "10 MB line": (b'{"prompt": "' + b"y" * (10 * 1024 * 1024) + b'"}', "line is longer than 4194304 bytes"),
    "raw NUL byte": (b'{"prompt": "a\x00b"}', "invalid JSON"),
    "escaped NUL": (b'{"prompt": "a\\u0000b"}', "NUL characters"),
    "invalid UTF-8": (b'{"prompt": "caf\xe9"}', "invalid UTF-8 at byte 15"),
    "duplicate custom_id": (b'{"custom_id": "same", "prompt": "again"}', "duplicate custom_id 'same' (first used on line 1)"),
    "over the context": (b'{"prompt": "' + b"word " * 200 + b'"}', "max_model_len is 64"),
    "not an object": (b'"just a string"', "a line must be a JSON object"),
    "unknown model": (b'{"custom_id": "g", "method": "POST", "url": "/v1/completions", '
                      b'"body": {"model": "gpt-4o", "prompt": "x"}}', "unknown model 'gpt-4o'"),
}
ERROR_CODES = {
    "invalid json": "invalid_json",
    "wrong type": "invalid_request",
    "missing field": "invalid_request",
    "unknown url": "invalid_request",
    "unknown field": "invalid_request",
    "empty line": "invalid_request",
    "10 MB line": "line_too_long",
    "raw NUL byte": "invalid_json",
    "escaped NUL": "invalid_request",
    "invalid UTF-8": "invalid_encoding",
    "duplicate custom_id": "duplicate_custom_id",
    "over the context": "prompt_too_long",
    "not an object": "invalid_request",
    "unknown model": "unknown_model",
}


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_each_hostile_line_gets_an_error_naming_it(tmp_path: Path, service_env: dict, start_worker,
                                                  db_engine: Engine) -> None:
    env = {**service_env, "DEEPBATCH_MAX_MODEL_LEN": "64"}
    path = tmp_path / "hostile.jsonl"
    expected: dict[int, str] = {}
    expected_codes: dict[int, str] = {}
    with path.open("wb") as stream:
        stream.write(b'{"custom_id": "same", "prompt": "first"}\n')
        for line_no, (name, (line, fragment)) in enumerate(HOSTILE_LINES.items(), start=2):
            stream.write(line + b"\n" + GOOD + b"\n")
            expected[2 * line_no - 2], expected_codes[2 * line_no - 2] = fragment, ERROR_CODES[name]
    good_lines = 1 + len(HOSTILE_LINES)
    worker = start_worker(**env)
    job_id = deepbatch("submit", str(path), env=env).stdout.strip()
    wait_until(lambda: job_progress(db_engine, job_id)["status"] == "completed", timeout=120,
               message=f"the hostile job to complete; worker log:\n{worker.log_text()[-2000:]}")

    with db_engine.connect() as connection:
        failed = dict(connection.execute(text(
            "SELECT line_no, error_message FROM requests WHERE job_id = :j AND state = 'failed'"), {"j": job_id}).all())
        succeeded = connection.execute(text(
            "SELECT count(*) FROM requests WHERE job_id = :j AND state = 'succeeded'"), {"j": job_id}).scalar()
    assert succeeded == good_lines
    assert set(failed) == set(expected)
    for line_no, fragment in expected.items():
        assert failed[line_no].startswith(f"line {line_no}: ") and fragment in failed[line_no], (line_no, failed[line_no])

    output = tmp_path / "out.jsonl"
    deepbatch("results", job_id, "-o", str(output), env=env)
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert sorted(error["error"]["line"] for error in errors) == sorted(expected)
    assert {error["error"]["line"]: error["error"]["code"] for error in errors} == expected_codes


def test_an_empty_file_makes_an_empty_completed_job(tmp_path: Path, service_env: dict, db_engine: Engine) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    job_id = deepbatch("submit", str(path), env=service_env).stdout.strip()
    with db_engine.connect() as connection:
        row = connection.execute(text("SELECT status, total FROM job_progress WHERE job_id = :j"), {"j": job_id}).one()
    assert tuple(row) == ("completed", 0)


def test_lines_rejected_en_masse_get_one_summary_with_the_fix(tmp_path: Path, service_env: dict,
                                                              db_engine: Engine) -> None:
    """Every line names a model this deployment does not serve: besides the per-line errors, submit says
    once what happened and what to set; with that set, the same file is accepted."""
    path = tmp_path / "openai.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"model": "deepseek-chat", "messages": [
                                            {"role": "user", "content": f"question {n}"}]}}) + "\n"
                            for n in range(300)) + "{broken\n")
    rejected = deepbatch("submit", str(path), env=service_env)
    assert "300 lines rejected: unknown_model (first, line 1: unknown model 'deepseek-chat'" in rejected.stderr
    assert "1 line rejected: invalid_json (first, line 301: invalid JSON" in rejected.stderr
    assert "set DEEPBATCH_MODEL_ALIASES=deepseek-chat and submit again" in rejected.stderr
    assert job_progress(db_engine, rejected.stdout.strip())["failed"] == 301

    accepted = deepbatch("submit", str(path), env={**service_env, "DEEPBATCH_MODEL_ALIASES": "deepseek-chat"})
    assert "unknown_model" not in accepted.stderr and "DEEPBATCH_MODEL_ALIASES" not in accepted.stderr
    assert job_progress(db_engine, accepted.stdout.strip())["failed"] == 1
