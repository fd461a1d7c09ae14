"""Guarded state transitions of the worker's store, on the real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, text, update
from sqlalchemy.orm import sessionmaker

from producer.queries import JobOptions, create_job, insert_chunk
from producer.reader import validate_line
from schema.tables import Request, RequestState
from worker.engine.types import Completion
from worker.store import RequestStore

pytestmark = pytest.mark.integration


@pytest.fixture
def sessions(db_engine: Engine) -> sessionmaker:
    return sessionmaker(db_engine, expire_on_commit=False)


@pytest.fixture
def request_id(sessions: sessionmaker) -> int:
    with sessions.begin() as session:
        job_id = create_job(session, "store-test.jsonl", "tiny-deepseek-v3")
        outcome = insert_chunk(session, job_id, [validate_line(b'{"prompt": "hi"}', 1)], JobOptions(max_attempts=2))
    return outcome.queued_request_ids[0]


def store(sessions: sessionmaker, worker: str = "host:1", lease_s: float = 60) -> RequestStore:
    return RequestStore(sessions, worker, timedelta(seconds=lease_s))


def completion() -> Completion:
    return Completion(token_ids=[5, 6], text="ok", finish_reason="length", prompt_tokens=2)


def events(sessions: sessionmaker, request_id: int) -> list[tuple]:
    with sessions() as session:
        return [tuple(row) for row in session.execute(text(
            "SELECT event, from_state, to_state, attempt FROM audit_events WHERE request_id = :r ORDER BY id"),
            {"r": request_id})]


def test_a_request_is_claimed_once_and_succeeds_once(sessions: sessionmaker, request_id: int) -> None:
    first = store(sessions).claim(request_id)
    assert first is not None and first.attempt == 1
    assert store(sessions, "host:2").claim(request_id) is None  # a live worker holds it
    assert store(sessions).succeed(first, completion(), "m") is True
    assert store(sessions).succeed(first, completion(), "m") is False
    assert store(sessions, "host:2").claim(request_id) is None  # final rows are never claimed again
    with sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM results WHERE request_id = :r"), {"r": request_id}) == 1
    assert events(sessions, request_id) == [
        ("submitted", None, "queued", 0), ("started", "queued", "running", 1), ("succeeded", "running", "succeeded", 1)]


def test_an_expired_lease_is_taken_over_and_the_old_attempt_cannot_finish(
    sessions: sessionmaker, request_id: int
) -> None:
    stale = store(sessions, "dead-host:1").claim(request_id)
    expire_lease(sessions, request_id)
    fresh = store(sessions, "host:2").claim(request_id)
    assert fresh is not None and fresh.attempt == 2
    assert store(sessions, "dead-host:1").succeed(stale, completion(), "m") is False
    assert store(sessions, "host:2").succeed(fresh, completion(), "m") is True
    assert ("started", "running", "running", 2) in events(sessions, request_id)


def expire_lease(sessions: sessionmaker, request_id: int) -> None:
    with sessions.begin() as session:
        session.execute(update(Request).where(Request.id == request_id)
                        .values(lease_expires_at=Request.lease_expires_at - timedelta(hours=1)))


def test_a_worker_lost_on_the_last_attempt_dead_letters_the_request_instead_of_running_it(
    sessions: sessionmaker, request_id: int
) -> None:
    """max_attempts is 2: the second claimant died too, so the next claim buries the request at attempt 2."""
    store(sessions, "dead-host:1").claim(request_id)
    expire_lease(sessions, request_id)
    assert store(sessions, "dead-host:2").claim(request_id).attempt == 2
    expire_lease(sessions, request_id)
    buried = store(sessions, "host:3").claim(request_id)
    assert (buried.request_id, buried.attempts) == (request_id, 2)
    assert "stopped during attempt 2" in buried.error
    with sessions() as session:
        row = session.execute(text("SELECT state, attempt FROM requests WHERE id = :r"), {"r": request_id}).one()
        letters = session.scalar(text("SELECT count(*) FROM dead_letters WHERE request_id = :r"), {"r": request_id})
    assert (tuple(row), letters) == (("dead", 2), 1)
    assert events(sessions, request_id)[-1] == ("dead_lettered", "running", "dead", 2)
    assert store(sessions, "host:4").claim(request_id) is None


def test_transient_errors_retry_then_dead_letter(sessions: sessionmaker, request_id: int) -> None:
    worker = store(sessions)
    first = worker.claim(request_id)
    assert worker.retry_or_dead_letter(first, "TransientEngineError", "oom") == RequestState.queued
    second = worker.claim(request_id)
    assert second.attempt == 2
    assert worker.retry_or_dead_letter(second, "TransientEngineError", "oom") == RequestState.dead
    with sessions() as session:
        dead_letter = session.execute(text("SELECT attempts, last_error FROM dead_letters WHERE request_id = :r"),
                                      {"r": request_id}).one()
    assert tuple(dead_letter) == (2, "TransientEngineError: oom")
    assert [event[0] for event in events(sessions, request_id)] == [
        "submitted", "started", "retried", "started", "dead_lettered"]


def test_permanent_errors_fail_at_once(sessions: sessionmaker, request_id: int) -> None:
    worker = store(sessions)
    claim = worker.claim(request_id)
    assert worker.fail(claim, "PromptTooLongError", "prompt has 5000 tokens") is True
    with sessions() as session:
        row = session.execute(text("SELECT state, error_code FROM requests WHERE id = :r"), {"r": request_id}).one()
    assert tuple(row) == ("failed", "PromptTooLongError")
