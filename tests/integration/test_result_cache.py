"""The result cache: identical greedy requests reuse a stored result; sampled ones and opted-out jobs never do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.conftest import deepbatch, job_progress, wait_until

pytestmark = pytest.mark.integration


def texts(db_engine: Engine, job_id: str) -> list[str]:
    with db_engine.connect() as connection:
        return list(connection.execute(text(
            "SELECT s.text FROM results s JOIN requests r ON r.id = s.request_id WHERE r.job_id = :j "
            "ORDER BY r.line_no"), {"j": job_id}).scalars())


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_identical_greedy_requests_reuse_results(tmp_path: Path, service_env: dict, start_worker,
                                                 db_engine: Engine) -> None:
    lines = [{"prompt": f"Greedy {n}", "max_tokens": 6, "temperature": 0, "user": f"u{n}"} for n in range(5)]
    lines += [{"prompt": f"Sampled {n}", "max_tokens": 6, "temperature": 0.9} for n in range(3)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    worker = start_worker()

    def run(*options: str) -> str:
        job_id = deepbatch("submit", str(prompts), *options, env=service_env).stdout.strip()
        wait_until(lambda: job_progress(db_engine, job_id)["status"] == "completed", timeout=120,
                   message=f"job {job_id}; worker log:\n{worker.log_text()[-2000:]}")
        return job_id

    first, second, opted_out = run(), run(), run("--no-cache")
    assert job_progress(db_engine, first)["cache_hits"] == 0
    assert job_progress(db_engine, second)["cache_hits"] == 5  # the greedy lines; never the sampled ones
    assert job_progress(db_engine, opted_out)["cache_hits"] == 0
    assert texts(db_engine, second)[:5] == texts(db_engine, first)[:5]
    with db_engine.connect() as connection:
        reused = connection.execute(text(
            "SELECT count(*) FROM audit_events WHERE job_id = :j AND detail LIKE 'result reused from request %'"),
            {"j": second}).scalar_one()
    assert reused == 5
