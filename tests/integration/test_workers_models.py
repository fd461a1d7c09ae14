"""Workers announce themselves and lines route by model: two workers of two models on one broker, one
mixed file, each line answered by its model; a model nobody serves is the line's error; `deepbatch workers`
lists the registry, a worker gone silent as stale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.conftest import deepbatch, job_progress, wait_until

pytestmark = pytest.mark.integration

SMOLLM = "smollm2-135m-instruct"  # the packaged real model
TINY = "tiny-deepseek-v3"  # the default


def rows(db_engine: Engine, sql: str, **params) -> list:
    with db_engine.connect() as connection:
        return connection.execute(text(sql), params).all()


def live_workers(db_engine: Engine, queue_name: str) -> dict[str, str]:
    """model → queue of the test's live workers."""
    return {row.model: row.queue for row in rows(
        db_engine, "SELECT model, queue FROM workers WHERE starts_with(queue, :q) AND stopped_at IS NULL "
                   "AND heartbeat_at > now() - interval '60 seconds'", q=queue_name)}


def line(custom_id: str, model: str | None, content: str = "Hi") -> str:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}
    if model is not None:
        body["model"] = model
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_two_workers_two_models_one_mixed_file(tmp_path: Path, service_env: dict, queue_name: str, start_worker,
                                               db_engine: Engine) -> None:
    tiny = start_worker(DEEPBATCH_MODEL_ALIASES="deepseek-chat")
    smollm = start_worker("--model", SMOLLM)  # another model than the default: on a queue of its own
    wait_until(lambda: len(live_workers(db_engine, queue_name)) == 2, timeout=180,
               message=f"both workers to announce themselves; logs:\n{tiny.log_text()[-2000:]}\n"
                       f"{smollm.log_text()[-2000:]}")
    assert live_workers(db_engine, queue_name) == {TINY: queue_name, SMOLLM: f"{queue_name}.{SMOLLM}"}

    # The worker says what it loads and when it is ready, in Celery's log format, and no delayed-delivery warning.
    for worker, model, fmt in ((tiny, TINY, "built-in"), (smollm, SMOLLM, "gguf")):
        log = worker.log_text()
        assert f"loading {model} ({fmt}, no quantization) on cpu, float32" in log, log[-2000:]
        assert "ready in " in log and "max batch 16, KV cache " in log, log[-2000:]
        assert "direct exchange" not in log and "delayed delivery" not in log, log[-2000:]

    prompts = tmp_path / "mixed.jsonl"
    prompts.write_text("\n".join([line("t-1", TINY), line("s-1", SMOLLM), line("d-1", None),
                                  line("a-1", "deepseek-chat"), line("s-2", SMOLLM, "Hello"),
                                  line("x-1", "gpt-4o")]) + "\n")
    job_id = deepbatch("submit", str(prompts), env=service_env).stdout.strip().splitlines()[-1]
    wait_until(lambda: job_progress(db_engine, job_id)["status"] in ("completed", "failed"), timeout=180,
               message=f"job {job_id} to finish; logs:\n{tiny.log_text()[-2000:]}\n{smollm.log_text()[-2000:]}")

    answered = {row.custom_id: (row.model, row.queue) for row in rows(
        db_engine, "SELECT r.custom_id, s.model, r.queue FROM requests r JOIN results s ON s.request_id = r.id "
                   "WHERE r.job_id = :j", j=job_id)}
    smollm_queue = f"{queue_name}.{SMOLLM}"
    assert answered == {"t-1": (TINY, queue_name), "d-1": (TINY, queue_name), "a-1": (TINY, queue_name),
                        "s-1": (SMOLLM, smollm_queue), "s-2": (SMOLLM, smollm_queue)}
    [(code, error)] = rows(db_engine, "SELECT error_code, line_error FROM requests WHERE job_id = :j AND "
                                      "state = 'failed'", j=job_id)
    assert code == "unknown_model"
    assert error == (f"unknown model 'gpt-4o': this deployment serves '{SMOLLM}', '{TINY}' (or 'deepseek-chat')"
                     " (DEEPBATCH_MODEL_ALIASES adds names)")
    # The job is labelled with the models its lines run on.
    assert job_progress(db_engine, job_id)["model"] == f"{SMOLLM}, {TINY}"

    listed = deepbatch("workers", env=service_env).stdout
    for expected in (TINY, SMOLLM, "deepseek-chat", "live", smollm_queue, "deepseek_v3", "2 workers, 2 live"):
        assert expected in listed, listed
    described = {worker["model"]: worker for worker in json.loads(deepbatch("workers", "--json", env=service_env).stdout)}
    assert described[SMOLLM]["model_format"] == "gguf" and described[SMOLLM]["devices"] == ["cpu"]
    assert described[SMOLLM]["max_batch_size"] == 16 and described[SMOLLM]["kv_cache_tokens"] > 0
    assert described[TINY]["aliases"] == ["deepseek-chat"] and described[TINY]["dtype"] == "float32"

    # Stopped cleanly, a worker shows as stopped, and its model is no longer served.
    smollm.stop()
    assert rows(db_engine, "SELECT stopped_at IS NOT NULL FROM workers WHERE model = :m AND queue = :q",
                m=SMOLLM, q=smollm_queue)[0][0]
    late = tmp_path / "late.jsonl"
    late.write_text(line("s-3", SMOLLM) + "\n" + line("t-3", TINY) + "\n")
    late_job = deepbatch("submit", str(late), env=service_env).stdout.strip().splitlines()[-1]
    wait_until(lambda: job_progress(db_engine, late_job)["status"] in ("completed", "failed"), timeout=120,
               message=f"job {late_job} to finish")
    [(late_error,)] = rows(db_engine, "SELECT line_error FROM requests WHERE job_id = :j AND state = 'failed'",
                           j=late_job)
    assert late_error.startswith(f"unknown model '{SMOLLM}': this deployment serves '{TINY}'"), late_error


def test_a_silent_worker_is_stale_and_no_longer_routed_to(tmp_path: Path, service_env: dict, queue_name: str,
                                                          db_engine: Engine) -> None:
    from sqlalchemy.orm import sessionmaker

    from worker.registry import Announcement, announce

    sessions = sessionmaker(db_engine)
    announce(sessions, Announcement(id=f"gone-host:{queue_name}", model=SMOLLM, aliases=[], queue=f"{queue_name}.{SMOLLM}",
                                    host="gone-host", pid=4242, devices=["cuda:0"], dtype="bfloat16"))
    announce(sessions, Announcement(id=f"here-host:{queue_name}", model=TINY, aliases=[], queue=queue_name,
                                    host="here-host", pid=4243, devices=["cuda:1"], dtype="bfloat16"))
    with sessions.begin() as session:  # the first stopped beating its heart an hour ago
        session.execute(text("UPDATE workers SET heartbeat_at = now() - interval '1 hour' WHERE id = :id"),
                        {"id": f"gone-host:{queue_name}"})

    listed = deepbatch("workers", env=service_env).stdout
    gone = next(row for row in listed.splitlines() if "gone-host" in row)
    here = next(row for row in listed.splitlines() if "here-host" in row)
    assert "stale" in gone and "60m ago" in gone and "live" in here, listed
    assert "2 workers, 1 live" in listed, listed

    # Only live workers serve: a line for the stale worker's model is refused, naming what is served.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(line("s-1", SMOLLM) + "\n" + line("t-1", TINY) + "\n")
    job_id = deepbatch("submit", str(prompts), env=service_env).stdout.strip().splitlines()[-1]
    [(error,)] = rows(db_engine, "SELECT line_error FROM requests WHERE job_id = :j AND state = 'failed'", j=job_id)
    assert error.startswith(f"unknown model '{SMOLLM}': this deployment serves '{TINY}'"), error
    [(queue,)] = rows(db_engine, "SELECT queue FROM requests WHERE job_id = :j AND state = 'queued'", j=job_id)
    assert queue == queue_name


def test_the_default_models_lines_wait_on_its_queue_while_only_another_model_is_live(
        tmp_path: Path, service_env: dict, queue_name: str, db_engine: Engine) -> None:
    """Default-model workers restarting (or not started yet) beside a live worker of another model: lines naming
    the default model, or none, are neither refused nor sent to the other model; they wait on its queue."""
    from sqlalchemy.orm import sessionmaker

    from worker.registry import Announcement, announce

    announce(sessionmaker(db_engine), Announcement(
        id=f"other-host:{queue_name}", model=SMOLLM, aliases=[], queue=f"{queue_name}.{SMOLLM}", host="other-host",
        pid=4244, devices=["cpu"], dtype="float32"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([line("t-1", TINY), line("d-1", None), line("s-1", SMOLLM)]) + "\n")
    job_id = deepbatch("submit", str(prompts), env=service_env).stdout.strip().splitlines()[-1]
    queued = dict(rows(db_engine, "SELECT custom_id, queue FROM requests WHERE job_id = :j AND state = 'queued'",
                       j=job_id))
    assert queued == {"t-1": queue_name, "d-1": queue_name, "s-1": f"{queue_name}.{SMOLLM}"}, queued
