"""Job lifecycle on the real services: cancel mid-job, expiry of the completion window, OpenAI statuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.conftest import deepbatch, job_progress, wait_until

pytestmark = pytest.mark.integration

SLOW_WORKER = {"DEEPBATCH_MAX_BATCH_SIZE": "2", "DEEPBATCH_WORKER_THREADS": "2", "DEEPBATCH_MAX_WAIT_MS": "0",
               "DEEPBATCH_RECONCILE_INTERVAL_S": "1", "DEEPBATCH_LEASE_S": "30"}


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Line {n}", "max_tokens": 8}) + "\n" for n in range(count)))
    return path


def result_rows(db_engine: Engine, job_id: str) -> int:
    with db_engine.connect() as connection:
        return connection.execute(text("SELECT count(*) FROM results WHERE job_id = :j"), {"j": job_id}).scalar_one()


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_cancel_mid_job_keeps_finished_results(tmp_path: Path, service_env: dict, start_worker,
                                                db_engine: Engine) -> None:
    env = {**service_env, **SLOW_WORKER}
    job_id = deepbatch("submit", str(write_prompts(tmp_path / "p.jsonl", 300)), env=env).stdout.strip()
    worker = start_worker(**env)
    wait_until(lambda: job_progress(db_engine, job_id)["succeeded"] >= 10, timeout=120,
               message=f"some progress; worker log:\n{worker.log_text()[-2000:]}")
    assert "queued requests cancelled" in deepbatch("cancel", job_id, env=env).stderr
    assert job_progress(db_engine, job_id)["status"] in ("cancelling", "cancelled")
    wait_until(lambda: job_progress(db_engine, job_id)["status"] == "cancelled", timeout=60, message="cancelled")

    final = job_progress(db_engine, job_id)
    assert final["succeeded"] >= 10 and final["cancelled"] > 0 and final["queued"] == final["running"] == 0
    assert final["succeeded"] + final["cancelled"] == 300
    assert result_rows(db_engine, job_id) == final["succeeded"]
    output = tmp_path / "out.jsonl"
    deepbatch("results", job_id, "-o", str(output), env=env)
    assert len(output.read_text().splitlines()) == final["succeeded"]
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert len(errors) == final["cancelled"] and {e["error"]["code"] for e in errors} == {"batch_cancelled"}


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_completion_window_expires_what_did_not_run(tmp_path: Path, service_env: dict, start_worker,
                                                    db_engine: Engine) -> None:
    env = {**service_env, **SLOW_WORKER}
    worker = start_worker(**env)
    prompts = write_prompts(tmp_path / "p.jsonl", 300)
    job_id = deepbatch("submit", str(prompts), "--completion-window", "8s", "--metadata", "team=search",
                       env=env).stdout.strip()
    wait_until(lambda: job_progress(db_engine, job_id)["status"] == "expired", timeout=90,
               message=f"the job to expire; worker log:\n{worker.log_text()[-2000:]}")
    final = job_progress(db_engine, job_id)
    assert final["succeeded"] > 0 and final["expired"] > 0
    assert final["succeeded"] + final["expired"] == 300
    assert result_rows(db_engine, job_id) == final["succeeded"]
    with db_engine.connect() as connection:
        assert connection.execute(text("SELECT metadata FROM jobs WHERE id = :j"), {"j": job_id}).scalar_one() == {
            "team": "search"}


def test_statuses_follow_the_openai_batch_names(tmp_path: Path, service_env: dict, db_engine: Engine) -> None:
    all_bad = tmp_path / "bad.jsonl"
    all_bad.write_text("{nope\n[1]\n")
    job_id = deepbatch("submit", str(all_bad), env=service_env).stdout.strip()
    assert job_progress(db_engine, job_id)["status"] == "failed"  # every line failed validation
    queued = deepbatch("submit", str(write_prompts(tmp_path / "p.jsonl", 3)), env=service_env).stdout.strip()
    assert job_progress(db_engine, queued)["status"] == "in_progress"
    deepbatch("cancel", queued, env=service_env)
    assert job_progress(db_engine, queued)["status"] == "cancelled"
    status = json.loads(deepbatch("status", queued, "--json", env=service_env).stdout)
    assert (status["status"], status["cancelled"], status["total"]) == ("cancelled", 3, 3)


def test_bad_cli_input_is_one_clear_line(tmp_path: Path, service_env: dict) -> None:
    missing = deepbatch("cancel", "batch_nope", env=service_env, check=False)
    assert missing.returncode == 1 and "no job 'batch_nope'" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    finished = deepbatch("submit", str(bad), env=service_env).stdout.strip()
    again = deepbatch("cancel", finished, env=service_env, check=False)
    assert again.returncode == 1 and "is already failed; there is nothing to cancel" in again.stderr
    window = deepbatch("submit", str(write_prompts(tmp_path / "p.jsonl", 1)), "--completion-window", "soon",
                       env=service_env, check=False)
    assert window.returncode == 2 and "--completion-window" in window.stderr


@pytest.mark.parametrize("broker_url", ["rabbitmq", "redis"], indirect=True)
def test_a_high_priority_job_overtakes_a_low_priority_backlog(tmp_path: Path, service_env: dict, start_worker,
                                                              db_engine: Engine) -> None:
    # Slices of 16: the backlog is 19 messages ahead of the urgent job's one, and the worker stopped at the
    # end finishes the backlog slice it holds, 16 requests, not 256 (13 s at 2 a step).
    env = {**service_env, **SLOW_WORKER, "DEEPBATCH_SLICE_SIZE": "16"}
    backlog = deepbatch("submit", str(write_prompts(tmp_path / "low.jsonl", 300)), env=env).stdout.strip()
    urgent = deepbatch("submit", str(write_prompts(tmp_path / "high.jsonl", 15)), "--priority", "10",
                       env=env).stdout.strip()  # every one of its messages sits behind the backlog's 300
    worker = start_worker(**env)
    wait_until(lambda: job_progress(db_engine, urgent)["status"] == "completed", timeout=120,
               message=f"the urgent job; worker log:\n{worker.log_text()[-2000:]}")
    backlog_done = job_progress(db_engine, backlog)["finished"]
    assert backlog_done < 60, f"the backlog ran {backlog_done} requests before the urgent job finished"
