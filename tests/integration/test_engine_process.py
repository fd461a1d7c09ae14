"""A worker whose engine runs in a process of its own (DEEPBATCH_ENGINE_PROCESS=own; the default on a GPU):
a job completes through it, and the engine process's death ends the worker at once, naming it, after which
another worker finishes the job with every request succeeded once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import Engine, text

from tests.conftest import deepbatch, job_progress, wait_until
from worker.engine.engine import FATAL_EXIT_CODE

pytestmark = pytest.mark.integration

OWN_PROCESS = {"DEEPBATCH_ENGINE_PROCESS": "own", "DEEPBATCH_LEASE_S": "5", "DEEPBATCH_RECONCILE_INTERVAL_S": "1"}


def write_prompts(path: Path, count: int, max_tokens: int) -> Path:
    with path.open("w") as stream:
        for index in range(count):
            stream.write(json.dumps({"custom_id": f"p{index}", "prompt": f"Question {index}: what comes next?",
                                     "max_tokens": max_tokens}) + "\n")
    return path


def engine_child(worker_pid: int, timeout: float = 120) -> psutil.Process:
    """The worker's spawned engine process, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(worker_pid).children():
            try:
                if "spawn_main" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:  # a short-lived child that ended meanwhile
                continue
        time.sleep(0.2)
    raise AssertionError("the worker started no engine process")


def counts(db_engine: Engine, job_id: str) -> dict[str, int]:
    with db_engine.connect() as connection:
        return dict(connection.execute(text("SELECT state, count(*) FROM requests WHERE job_id = :j GROUP BY state"),
                                       {"j": job_id}).all())


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)  # the engine's process is the worker's concern
def test_a_job_runs_through_an_engine_in_its_own_process_which_dies_with_a_clear_error(
        tmp_path: Path, service_env: dict, start_worker, db_engine: Engine) -> None:
    first = start_worker(**OWN_PROCESS)
    child = engine_child(first.process.pid)
    quick = deepbatch("submit", str(write_prompts(tmp_path / "quick.jsonl", 24, 4)), env=service_env).stdout.strip()
    wait_until(lambda: job_progress(db_engine, quick)["status"] == "completed", timeout=180,
               message=f"job {quick} to complete; worker log:\n{first.log_text()[-3000:]}")
    assert counts(db_engine, quick) == {"succeeded": 24}

    slow = deepbatch("submit", str(write_prompts(tmp_path / "slow.jsonl", 24, 400)), env=service_env).stdout.strip()
    wait_until(lambda: counts(db_engine, slow).get("running", 0) > 0, timeout=60, message="requests running")
    os.kill(child.pid, signal.SIGKILL)
    assert first.process.wait(timeout=30) == FATAL_EXIT_CODE
    assert f"the engine process (pid {child.pid}) died (killed by SIGKILL)" in first.log_text()

    second = start_worker(DEEPBATCH_LEASE_S="5", DEEPBATCH_RECONCILE_INTERVAL_S="1")  # in-process engine
    wait_until(lambda: job_progress(db_engine, slow)["status"] == "completed", timeout=240,
               message=f"job {slow} to complete; worker log:\n{second.log_text()[-3000:]}")
    assert counts(db_engine, slow) == {"succeeded": 24}
    with db_engine.connect() as connection:
        results = connection.execute(text("SELECT count(*), count(DISTINCT request_id) FROM results r "
                                          "JOIN requests q ON q.id = r.request_id WHERE q.job_id = :j"),
                                     {"j": slow}).one()
    assert tuple(results) == (24, 24)
