"""Outputs PostgreSQL's text cannot hold: stored exactly and exported exactly (schema/stored_text.py), and a
row PostgreSQL refuses fails alone while the rest of its batch is written at once (worker/recorder.py)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, text, update
from sqlalchemy.orm import sessionmaker

from producer.queries import create_job
from schema.settings import Settings
from schema.stored_text import to_stored
from schema.tables import Request, RequestState
from tests.conftest import deepbatch, job_progress, wait_until
from tests.integration.odd_engines import ODD_OUTPUTS
from worker import transitions as transitions_module
from worker.recorder import Recorder
from worker.retries import UNSTORABLE_OUTPUT
from worker.transitions import Success, Transitions

pytestmark = pytest.mark.integration


def request_rows(db_engine: Engine, job_id: str) -> list[dict]:
    with db_engine.connect() as connection:
        return [dict(row) for row in connection.execute(text(
            "SELECT r.custom_id, r.state::text AS state, r.error_code, s.text, s.cached_from FROM requests r "
            "LEFT JOIN results s ON s.request_id = r.id WHERE r.job_id = :j ORDER BY r.line_no"),
            {"j": job_id}).mappings()]


def exported_texts(path: Path) -> dict[str, str]:
    lines = path.read_bytes().decode("utf-8").splitlines()  # strict UTF-8, or this raises
    answers = [json.loads(line) for line in lines]
    return {answer["custom_id"]: answer["response"]["body"]["choices"][0]["text"] for answer in answers}


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_odd_outputs_are_stored_and_exported_exactly(tmp_path: Path, service_env: dict, start_worker,
                                                     db_engine: Engine) -> None:
    """Two rounds of every odd output through a real worker; a second, identical job is answered from the
    result cache, which must hand back the output itself, not its stored form."""
    count = 2 * len(ODD_OUTPUTS)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"custom_id": f"r{n}", "prompt": f"odd {n}", "temperature": 0}) + "\n"
                               for n in range(count)))
    worker = start_worker(DEEPBATCH_ENGINE="tests.integration.odd_engines:OddOutputEngine")

    def run_and_export(name: str) -> tuple[str, dict[str, str]]:
        job_id = deepbatch("submit", str(prompts), env=service_env).stdout.strip()
        wait_until(lambda: job_progress(db_engine, job_id)["status"] == "completed", timeout=60,
                   message=f"job {job_id}; worker log:\n{worker.log_text()[-3000:]}")
        output = tmp_path / f"{name}.jsonl"
        deepbatch("results", job_id, "--output", str(output), env=service_env)
        return job_id, exported_texts(output)

    first_job, first = run_and_export("first")
    rows = request_rows(db_engine, first_job)
    assert [(row["state"], row["error_code"]) for row in rows] == [("succeeded", None)] * count
    # The SQL view holds the documented representation: each output escaped, nothing else changed.
    assert Counter(row["text"] for row in rows) == Counter(to_stored(output) for output in ODD_OUTPUTS * 2)
    # The file holds each output as JSON escapes it (a surrogate pair split in two reads back as one character).
    assert Counter(first.values()) == Counter(json.loads(json.dumps(output)) for output in ODD_OUTPUTS * 2)
    assert "worker_lost" not in worker.log_text() and "could not record" not in worker.log_text()

    second_job, second = run_and_export("second")
    assert job_progress(db_engine, second_job)["cache_hits"] == count
    assert second == first


@pytest.fixture
def sessions(db_engine: Engine) -> sessionmaker:
    return sessionmaker(db_engine, expire_on_commit=False)


def add_requests(sessions: sessionmaker, count: int, queue: str, max_attempts: int) -> list[int]:
    with sessions.begin() as session:
        job_id = create_job(session, "unstorable.jsonl", "m", queue=queue)
        rows = [{"job_id": job_id, "line_no": n, "custom_id": str(n), "url": "/v1/completions",
                 "body": {"prompt": f"hi {n}"}, "state": RequestState.queued, "max_attempts": max_attempts,
                 "queue": queue} for n in range(1, count + 1)]
        return list(session.scalars(insert(Request).returning(Request.id), rows))


def unescaped_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test only: the recorder writes result text raw, as it did before the escape, so a row can hold a NUL."""
    monkeypatch.setattr(transitions_module, "to_stored", lambda output: output)


@pytest.mark.parametrize("max_attempts, bad_state", [(2, "queued"), (1, "dead")])
def test_a_refused_row_fails_alone_and_the_rest_of_its_batch_is_written_at_once(
        sessions: sessionmaker, queue_name: str, monkeypatch: pytest.MonkeyPatch, max_attempts: int,
        bad_state: str) -> None:
    unescaped_writes(monkeypatch)
    ids = add_requests(sessions, 24, queue_name, max_attempts)
    with sessions.begin() as session:  # one innocent request was retried once: its old error must go
        session.execute(update(Request).where(Request.id == ids[0]).values(error_code="engine_unavailable",
                                                                          error_message="out of memory"))
    transitions = Transitions(sessions, "host:1", timedelta(seconds=60), queue_name)
    claims = transitions.claim_next(24)
    bad = {claims[3].id: "a raw \x00 NUL", claims[11].id: "a lone \ud800 surrogate", claims[17].id: None}
    batch = [Success(claim, bad.get(claim.id) or "fine", "length", 2**40 if claim.id == claims[17].id else 3, 2)
             for claim in claims]  # the third bad row: prompt_tokens beyond PostgreSQL's integer
    settings = Settings(_env_file=None, model="m", retry_backoff_s=30.0)
    written: list = []
    recorder = Recorder(transitions, settings, lambda outcomes, recorded: written.append((outcomes, recorded)))
    for outcome in batch:
        recorder.put(outcome)
    recorder.start()
    recorder.stop()  # writes what is pending: one batch of 24

    [(outcomes, recorded)] = written
    assert recorded == set(ids)  # every row recorded in this flush: none waits for a lease
    assert {outcome.claim.id for outcome in outcomes if not isinstance(outcome, Success)} == set(bad)
    with sessions() as session:
        rows = {row.id: row for row in session.execute(text(
            "SELECT r.id, r.state::text AS state, r.error_code, r.error_message, r.retry_after, s.text "
            "FROM requests r LEFT JOIN results s ON s.request_id = r.id WHERE r.id = ANY(:ids)"), {"ids": ids})}
        letters = session.scalar(text("SELECT count(*) FROM dead_letters WHERE request_id = ANY(:ids)"),
                                 {"ids": ids})
        bad_events = session.execute(text(
            "SELECT event, detail FROM audit_events WHERE request_id = ANY(:ids) AND event <> 'started'"),
            {"ids": list(bad)}).all()
    innocent = [rows[request_id] for request_id in ids if request_id not in bad]
    assert [(row.state, row.error_code, row.error_message, row.text) for row in innocent] == \
        [("succeeded", None, None, "fine")] * 21
    for request_id in bad:
        row = rows[request_id]
        assert (row.state, row.error_code, row.text) == (bad_state, UNSTORABLE_OUTPUT, None)
        assert "PostgreSQL refused to store" in row.error_message and "line " in row.error_message
        assert (row.retry_after is not None) == (bad_state == "queued")
    assert letters == (len(bad) if bad_state == "dead" else 0)
    assert sorted(event for event, _ in bad_events) == ["dead_lettered" if bad_state == "dead" else "retried"] * 3
    assert all(detail.startswith(UNSTORABLE_OUTPUT) for _, detail in bad_events)
