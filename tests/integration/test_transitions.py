"""Guarded, batched state transitions (worker/transitions.py) on the real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, insert, text, update
from sqlalchemy.orm import sessionmaker

from producer.queries import create_job
from schema.tables import Request, RequestState
from worker.transitions import ClaimedRequest, Failure, Success, Transitions

pytestmark = pytest.mark.integration


@pytest.fixture
def sessions(db_engine: Engine) -> sessionmaker:
    return sessionmaker(db_engine, expire_on_commit=False)


def add_requests(sessions: sessionmaker, count: int, queue: str, priority: int = 0, max_attempts: int = 2) -> list[int]:
    with sessions.begin() as session:
        job_id = create_job(session, "transitions-test.jsonl", "tiny-deepseek-v3", priority=priority, queue=queue)
        rows = [{"job_id": job_id, "line_no": n, "custom_id": str(n), "url": "/v1/completions",
                 "body": {"prompt": f"hi {n}"}, "state": RequestState.queued, "max_attempts": max_attempts,
                 "priority": priority, "queue": queue} for n in range(1, count + 1)]
        return list(session.scalars(insert(Request).returning(Request.id), rows))


@pytest.fixture
def queue(queue_name: str) -> str:
    return queue_name


def transitions(sessions: sessionmaker, queue: str, worker: str = "host:1", lease_s: float = 60) -> Transitions:
    return Transitions(sessions, worker, timedelta(seconds=lease_s), queue)


def success(claim: ClaimedRequest) -> Success:
    return Success(claim, "ok", "length", 2, 2)


def events(sessions: sessionmaker, request_id: int) -> list[tuple]:
    with sessions() as session:
        return [tuple(row) for row in session.execute(text(
            "SELECT event, from_state, to_state, attempt FROM audit_events WHERE request_id = :r ORDER BY id"),
            {"r": request_id})]


def states(sessions: sessionmaker, request_ids: list[int]) -> list[str]:
    with sessions() as session:
        return list(session.scalars(text("SELECT state::text FROM requests WHERE id = ANY(:ids) ORDER BY id"),
                                    {"ids": request_ids}))


def expire_leases(sessions: sessionmaker, request_ids: list[int]) -> None:
    with sessions.begin() as session:
        session.execute(update(Request).where(Request.id.in_(request_ids))
                        .values(lease_expires_at=Request.lease_expires_at - timedelta(hours=1)))


def test_a_batch_is_claimed_once_and_recorded_once(sessions: sessionmaker, queue: str) -> None:
    ids = add_requests(sessions, 5, queue)
    first = transitions(sessions, queue).claim_next(3)
    second = transitions(sessions, queue, "host:2").claim_next(10)
    assert [c.id for c in first] == ids[:3] and [c.id for c in second] == ids[3:]  # oldest first, never twice
    assert transitions(sessions, queue, "host:3").claim_next(10) == []
    worker = transitions(sessions, queue)
    assert worker.record([success(c) for c in first], [], "m") == set(ids[:3])
    assert worker.record([success(c) for c in first], [], "m") == set()  # a repeat changes nothing
    with sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM results WHERE request_id = ANY(:ids)"), {"ids": ids}) == 3
    assert events(sessions, ids[0]) == [("started", "queued", "running", 1), ("succeeded", "running", "succeeded", 1)]


def test_higher_priority_is_claimed_first(sessions: sessionmaker, queue: str) -> None:
    backlog = add_requests(sessions, 4, queue)
    urgent = add_requests(sessions, 2, queue, priority=5)
    assert [c.id for c in transitions(sessions, queue).claim_next(3)] == sorted(urgent + backlog[:1])


def test_failures_retry_fail_or_dead_letter_in_one_batch(sessions: sessionmaker, queue: str) -> None:
    ids = add_requests(sessions, 3, queue)
    worker = transitions(sessions, queue)
    retried, failed, dead = worker.claim_next(3)
    dead = ClaimedRequest(**{**dead.__dict__, "attempt": 2})  # as if on its last attempt
    with sessions.begin() as session:
        session.execute(text("UPDATE requests SET attempt = 2 WHERE id = :r"), {"r": dead.id})
    assert worker.record([], [Failure(retried, RequestState.queued, "engine_unavailable", "oom", 30.0),
                              Failure(failed, RequestState.failed, "prompt_too_long", "line 2: too long"),
                              Failure(dead, RequestState.dead, "engine_unavailable", "oom")], "m") == set(ids)
    assert states(sessions, ids) == ["queued", "failed", "dead"]
    assert worker.claim_next(3) == []  # the retry waits out its backoff
    again = worker.claim_ids([retried.id])  # ... unless its own worker claims it
    assert again[0].attempt == 2
    with sessions() as session:
        letter = session.execute(text("SELECT attempts, last_error FROM dead_letters WHERE request_id = :r"),
                                 {"r": dead.id}).one()
    assert tuple(letter) == (2, "engine_unavailable: oom")
    assert [e[0] for e in events(sessions, retried.id)] == ["started", "retried", "started"]
    assert events(sessions, failed.id)[-1] == ("failed", "running", "failed", 1)
