"""At-least-once delivery, exactly-once effect: every request published twice still gives one result."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from schema.settings import Settings
from tests.conftest import deepbatch, wait_until
from tests.integration.prompt_files import write_prompt_file
from worker.app import make_celery_app, publish_slices, queue_length

pytestmark = pytest.mark.integration


def test_duplicate_messages_produce_no_second_result(
    tmp_path: Path, service_env: dict, broker_url: str, queue_name: str, start_worker, db_engine: Engine
) -> None:
    prompt_file = write_prompt_file(tmp_path / "prompts.jsonl", total_lines=20, broken={})
    job_id = deepbatch("submit", str(prompt_file.path), env=service_env).stdout.strip()
    with db_engine.connect() as connection:
        request_ids = list(connection.execute(
            text("SELECT id FROM requests WHERE job_id = :j ORDER BY id"), {"j": job_id}).scalars())
    app = make_celery_app(Settings(broker_url=broker_url, queue_name=queue_name))
    publish_slices(app, request_ids, 7)  # every request is now in two slices: the producer's, and one of these
    assert queue_length(app, queue_name) == 1 + 3

    worker = start_worker()
    wait_until(lambda: queue_length(app, queue_name) == 0, timeout=180,
               message=f"the queue to drain; worker log:\n{worker.log_text()[-2000:]}")
    worker.stop()  # a warm shutdown finishes the messages in hand

    with db_engine.connect() as connection:
        counts = connection.execute(text(
            "SELECT count(*) FILTER (WHERE state = 'succeeded'), "
            "(SELECT count(*) FROM results WHERE job_id = :j), "
            "(SELECT count(*) FROM audit_events WHERE job_id = :j AND event = 'succeeded'), "
            "(SELECT count(*) FROM audit_events WHERE job_id = :j AND event = 'started') "
            "FROM requests WHERE job_id = :j"), {"j": job_id}).one()
    assert tuple(counts) == (20, 20, 20, 20)


def test_reconcile_rebuilds_lost_messages_as_slices(
    tmp_path: Path, service_env: dict, broker_url: str, queue_name: str, db_engine: Engine
) -> None:
    env = {**service_env, "DEEPBATCH_SLICE_SIZE": "100"}
    prompt_file = write_prompt_file(tmp_path / "prompts.jsonl", total_lines=450, broken={})
    deepbatch("submit", str(prompt_file.path), env=env)
    app = make_celery_app(Settings(broker_url=broker_url, queue_name=queue_name))
    assert queue_length(app, queue_name) == 5
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge(queue_name)  # the broker loses every message
    assert "450 queued requests re-published" in deepbatch("reconcile", env=env).stderr
    assert queue_length(app, queue_name) == 5  # as slices of 100, not 450 messages
