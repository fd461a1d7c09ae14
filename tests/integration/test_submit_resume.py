"""An interrupted submit: SIGKILLed mid-file, then resumed (every line stored and run once) or cancelled;
Ctrl-C says how to resume; and every command that takes a job id refuses an unknown one the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.conftest import REPO_ROOT, deepbatch, job_progress, wait_until

pytestmark = pytest.mark.integration

# The kill falls once 2,000 lines are stored, within a poll of 20 ms: far from the end at any submit rate
# (25,000 lines/s measured); the worker then runs every line, so a longer file only adds waiting.
LINES = 20_000
CHUNK = "500"  # lines per transaction: a kill falls between many committed chunks


def write_file(path: Path, lines: int = LINES) -> Path:
    with path.open("w") as stream:
        for n in range(1, lines + 1):
            if n % 1000 == 0:
                stream.write("{not json\n")  # a bad line every thousand: its error must be stored once too
            else:
                stream.write(json.dumps({"custom_id": f"c{n}", "prompt": f"line {n} of the file", "max_tokens": 2})
                             + "\n")
    return path


def stored_lines(db_engine: Engine, job_id: str) -> int:
    with db_engine.connect() as connection:
        return connection.execute(text("SELECT submitted_lines FROM jobs WHERE id = :j"), {"j": job_id}).scalar_one()


def newest_job(db_engine: Engine, path: Path) -> str | None:
    with db_engine.connect() as connection:
        return connection.execute(text("SELECT id FROM jobs WHERE input_file = :f ORDER BY created_at DESC LIMIT 1"),
                                  {"f": str(path)}).scalar()


def interrupt_submit(path: Path, env: dict, db_engine: Engine, sig: int,
                     to_group: bool = False) -> tuple[str, subprocess.CompletedProcess]:
    """Start a real `deepbatch submit`, and send it `sig` once some chunks are stored (not all); `to_group`:
    to its whole process group, as a terminal sends Ctrl-C (its reader process gets it too)."""
    process = subprocess.Popen([sys.executable, "-m", "producer.cli", "submit", str(path)], env=env, cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_until(lambda: (job := newest_job(db_engine, path)) is not None and stored_lines(db_engine, job) >= 2000,
               timeout=120, interval=0.02, message="some chunks to be stored")
    if to_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    job_id = newest_job(db_engine, path)
    assert stored_lines(db_engine, job_id) < LINES, "the submit finished before the signal: make the file longer"
    return job_id, subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_every_line_once(db_engine: Engine, job_id: str) -> None:
    with db_engine.connect() as connection:
        row = connection.execute(text("""
            SELECT count(*) AS rows, count(DISTINCT line_no) AS lines, min(line_no) AS first, max(line_no) AS last,
                   count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
                   count(*) FILTER (WHERE state = 'failed' AND error_code = 'invalid_json') AS bad,
                   (SELECT count(*) FROM results WHERE job_id = :j) AS results,
                   (SELECT count(*) FROM (SELECT request_id FROM audit_events WHERE job_id = :j AND event = 'started'
                                          GROUP BY request_id HAVING count(*) > 1) AS twice) AS started_twice
            FROM requests WHERE job_id = :j"""), {"j": job_id}).mappings().one()
    assert dict(row) == {"rows": LINES, "lines": LINES, "first": 1, "last": LINES, "succeeded": LINES - LINES // 1000,
                         "bad": LINES // 1000, "results": LINES - LINES // 1000, "started_twice": 0}, dict(row)


# The file is read in a process of its own (DEEPBATCH_SUBMIT_PROCESS_MIN_BYTES=0) on RabbitMQ, in the
# submitting process's helper thread on Redis: both resume at the stored line's byte.
@pytest.mark.parametrize("broker_url", ["redis", "rabbitmq"], indirect=True)
def test_sigkilled_submit_resumes_with_every_line_once(tmp_path: Path, service_env: dict, start_worker,
                                                       db_engine: Engine, broker_url: str) -> None:
    env = {**service_env, "DEEPBATCH_INSERT_CHUNK_SIZE": CHUNK, "DEEPBATCH_ENGINE": "null"}
    if broker_url.startswith("amqp"):
        env["DEEPBATCH_SUBMIT_PROCESS_MIN_BYTES"] = "0"
    path = write_file(tmp_path / "big.jsonl")
    job_id, killed = interrupt_submit(path, env, db_engine, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    stopped_at = stored_lines(db_engine, job_id)

    status = deepbatch("status", job_id, env=env)
    assert f"submission stopped at line {stopped_at}" in status.stderr and f"--resume {job_id}" in status.stderr
    assert f"(submission stopped at line {stopped_at})" in deepbatch("jobs", env=env).stdout
    assert job_progress(db_engine, job_id)["status"] == "validating"

    start_worker(**env)  # what was stored runs meanwhile
    resumed = deepbatch("submit", str(path), "--resume", job_id, env=env)
    assert resumed.stdout.strip() == job_id and f"resumed at line {stopped_at + 1}" in resumed.stderr
    wait_until(lambda: job_progress(db_engine, job_id)["status"] == "completed", timeout=300,
               message=f"the resumed job {job_id} to complete")
    assert_every_line_once(db_engine, job_id)
    again = deepbatch("submit", str(path), "--resume", job_id, env=env, check=False)
    assert again.returncode == 1 and "is fully submitted" in again.stderr


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_resume_refuses_a_changed_file_and_cancel_ends_an_interrupted_job(tmp_path: Path, service_env: dict,
                                                                          db_engine: Engine) -> None:
    env = {**service_env, "DEEPBATCH_INSERT_CHUNK_SIZE": CHUNK}
    path = write_file(tmp_path / "big.jsonl")
    job_id, _ = interrupt_submit(path, env, db_engine, signal.SIGKILL)

    changed = tmp_path / "changed.jsonl"
    changed.write_bytes(b"{}\n" + path.read_bytes())
    refused = deepbatch("submit", str(changed), "--resume", job_id, env=env, check=False)
    assert refused.returncode == 1 and "resume only with the same file" in refused.stderr

    deepbatch("cancel", job_id, env=env)
    wait_until(lambda: job_progress(db_engine, job_id)["status"] == "cancelled", timeout=30,
               message="the interrupted job to be cancelled")
    assert job_progress(db_engine, job_id)["total"] == stored_lines(db_engine, job_id)
    again = deepbatch("submit", str(path), "--resume", job_id, env=env, check=False)
    assert again.returncode == 1 and "was cancelled" in again.stderr


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
@pytest.mark.parametrize("process_min_bytes", ["0", None], ids=["reader-process", "reader-thread"])
def test_ctrl_c_during_submit_says_how_to_resume(tmp_path: Path, service_env: dict, db_engine: Engine,
                                                 process_min_bytes: str | None) -> None:
    env = {**service_env, "DEEPBATCH_INSERT_CHUNK_SIZE": CHUNK}
    if process_min_bytes is not None:
        env["DEEPBATCH_SUBMIT_PROCESS_MIN_BYTES"] = process_min_bytes
    path = write_file(tmp_path / "big.jsonl")
    job_id, interrupted = interrupt_submit(path, env, db_engine, signal.SIGINT, to_group=True)
    assert interrupted.returncode == 130, interrupted.stderr
    assert f"deepbatch submit {path} --resume {job_id}" in interrupted.stderr
    assert f"holds lines 1-{stored_lines(db_engine, job_id)}" in interrupted.stderr
    time.sleep(0.5)  # the process is gone: its submission lock with it
    assert "submission stopped" in deepbatch("status", job_id, env=env).stderr


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
@pytest.mark.parametrize("command", [["status"], ["cancel"], ["results", "-o", "out.jsonl"],
                                     ["submit", "FILE", "--resume"]])
def test_every_command_refuses_an_unknown_job_the_same_way(tmp_path: Path, service_env: dict,
                                                           command: list[str]) -> None:
    file = write_file(tmp_path / "small.jsonl", 3)
    arguments = [str(file) if part == "FILE" else part for part in command]
    if command[0] == "submit":
        arguments.append("batch_nope")
    else:
        arguments.insert(1, "batch_nope")
    refused = deepbatch(*arguments, env=service_env, check=False)
    assert refused.returncode == 1 and "error: no job 'batch_nope'" in refused.stderr, refused.stderr
