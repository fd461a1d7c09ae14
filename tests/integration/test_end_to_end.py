"""A prompt file through the whole system, on each broker: producer → broker → real worker → Postgres."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.conftest import deepbatch, job_progress, wait_until
from tests.integration.prompt_files import write_prompt_file

pytestmark = pytest.mark.integration


def scalar(db_engine: Engine, sql: str, **params) -> object:
    with db_engine.connect() as connection:
        return connection.execute(text(sql), params).scalar_one()


def test_file_with_broken_lines_gives_one_result_or_one_error_per_line(
    tmp_path: Path, service_env: dict, start_worker, db_engine: Engine
) -> None:
    prompt_file = write_prompt_file(tmp_path / "prompts.jsonl")
    assert len(prompt_file.valid_custom_ids) == 190 and len(prompt_file.broken) == 10
    worker = start_worker()

    job_id = deepbatch("submit", str(prompt_file.path), env=service_env).stdout.strip()
    assert job_id.startswith("batch_")
    wait_until(lambda: job_progress(db_engine, job_id)["status"] == "completed", timeout=240,
               message=f"job {job_id} to complete; worker log:\n{worker.log_text()[-3000:]}")

    # Counted by SQL: one request row per line, one result per valid line, nothing else.
    assert scalar(db_engine, "SELECT count(*) FROM requests WHERE job_id = :j", j=job_id) == 200
    assert scalar(db_engine, "SELECT count(*) FROM results WHERE job_id = :j", j=job_id) == 190
    with db_engine.connect() as connection:
        succeeded = dict(connection.execute(text(
            "SELECT r.line_no, r.custom_id FROM requests r JOIN results s ON s.request_id = r.id "
            "WHERE r.job_id = :j AND r.state = 'succeeded'"), {"j": job_id}).all())
        failed = dict(connection.execute(text(
            "SELECT line_no, error_message FROM requests WHERE job_id = :j AND state = 'failed'"),
            {"j": job_id}).all())
    assert succeeded == prompt_file.valid_custom_ids
    assert set(failed) == set(prompt_file.broken)
    for line_no, fragment in prompt_file.broken.items():
        assert failed[line_no].startswith(f"line {line_no}: ") and fragment in failed[line_no], failed[line_no]

    # Every succeeded request went submitted → started → succeeded in the audit log.
    events = scalar(db_engine, "SELECT count(*) FROM audit_events WHERE job_id = :j AND event IN "
                               "('submitted', 'started', 'succeeded')", j=job_id)
    assert events == 3 * 190

    # And again in the exported files.
    output, errors = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    deepbatch("results", job_id, "-o", str(output), env=service_env)
    result_lines = [json.loads(line) for line in output.read_text().splitlines()]
    error_lines = [json.loads(line) for line in errors.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in result_lines) == sorted(prompt_file.valid_custom_ids.values())
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in result_lines)
    assert {line["error"]["line"] for line in error_lines} == set(prompt_file.broken)
    for line in error_lines:
        assert f"line {line['error']['line']}" in line["error"]["message"]
    chat = next(line for line in result_lines if line["custom_id"] == "r-2")
    assert chat["response"]["body"]["object"] == "chat.completion"
    assert chat["response"]["body"]["usage"]["completion_tokens"] <= 3
