"""job_counts (schema/tables.py: JobCount) against COUNT(*) of the requests, after every kind of transition.

A job is submitted through insert_staged (accepted, invalid and duplicate lines, over two chunks), then
moved through each transition by several Transitions, each with its own connection (so its own shard):
claim, success (one a cache hit), failure with a retry, permanent failure, last attempt (dead), a lost
worker's leases taken back, a circuit's give-back, cancel, requeue from the dead letters and expiry. After
each step the counts, rejected lines, cache hits, tokens and models must be what the rows say.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine, text, update
from sqlalchemy.orm import Session, sessionmaker

from producer import queries
from producer.api import store
from producer.queries import JobOptions, cancel_job, create_job, insert_staged, requeue_dead, stage_chunk
from producer.reader import validate_line
from schema.tables import Job, Request, RequestState
from worker.transitions import Failure, Success, Transitions, expire_overdue

pytestmark = pytest.mark.integration

MODEL = "tiny-deepseek-v3"


@pytest.fixture
def engines(db_engine: Engine) -> list[Engine]:
    """Three engines of one connection each: three backends, three shards of the counts."""
    made = [create_engine(db_engine.url, pool_size=1, max_overflow=0) for _ in range(3)]
    yield made
    for engine in made:
        engine.dispose()


def line(custom_id: str, prompt: str) -> bytes:
    return json.dumps({"custom_id": custom_id, "prompt": prompt}).encode()


def submit(sessions: sessionmaker, queue: str, lines: list[bytes], chunk: int) -> str:
    with sessions.begin() as session:
        job_id = create_job(session, "counts.jsonl", MODEL, queue=queue)
    read = [validate_line(raw, number) for number, raw in enumerate(lines, 1)]
    for start in range(0, len(read), chunk):
        with sessions.begin() as session:
            insert_staged(session, job_id, stage_chunk(read[start:start + chunk], None), JobOptions(2, queue=queue))
    return job_id


def counted(session: Session, job_id: str) -> dict:
    rows = session.execute(text("""
        SELECT state::text, label, sum(requests), sum(rejected), sum(cache_hits), sum(prompt_tokens),
               sum(completion_tokens)
        FROM job_counts WHERE job_id = :j GROUP BY 1, 2 HAVING sum(requests) <> 0 OR sum(rejected) <> 0
    """), {"j": job_id})
    return {(state, label): tuple(int(value) for value in values) for state, label, *values in rows}


def counted_from_rows(session: Session, job_id: str) -> dict:
    rows = session.execute(text("""
        SELECT r.state::text,
               CASE WHEN r.state = 'succeeded' THEN s.model WHEN r.state IN ('failed', 'dead') THEN r.error_code
                    ELSE '' END,
               count(*), count(*) FILTER (WHERE r.line_error IS NOT NULL), count(s.cached_from),
               coalesce(sum(s.prompt_tokens), 0), coalesce(sum(s.completion_tokens), 0)
        FROM requests r LEFT JOIN results s ON s.request_id = r.id WHERE r.job_id = :j GROUP BY 1, 2
    """), {"j": job_id})
    return {(state, label): tuple(int(value) for value in values) for state, label, *values in rows}


def expire_leases(sessions: sessionmaker, request_ids: list[int]) -> None:
    with sessions.begin() as session:
        session.execute(update(Request).where(Request.id.in_(request_ids))
                        .values(lease_expires_at=Request.lease_expires_at - timedelta(hours=1)))


def check(sessions: sessionmaker, job_id: str) -> dict:
    with sessions() as session:
        expected = counted_from_rows(session, job_id)
        assert counted(session, job_id) == expected
        progress = queries.job_progress(session, job_id)
        by_state = {state.value: sum(v[0] for (s, _), v in expected.items() if s == state.value)
                    for state in RequestState}
        assert {state: getattr(progress, state) for state in by_state} == by_state
        assert progress.total == sum(by_state.values())
        assert progress.cache_hits == sum(v[2] for v in expected.values())
        assert queries.rejected_line_count(session, job_id) == sum(v[1] for v in expected.values())
        assert queries.result_models(session, job_id) == [
            (label, v[0]) for (state, label), v in expected.items() if state == "succeeded"]
        assert store.batch_usage(session, job_id) == (sum(v[3] for v in expected.values()),
                                                       sum(v[4] for v in expected.values()))
    return by_state


def test_counts_follow_every_transition(db_engine: Engine, engines: list[Engine], queue_name: str) -> None:
    sessions = sessionmaker(db_engine, expire_on_commit=False)
    lines = [line(f"r{n}", f"prompt {n}") for n in range(1, 41)]
    lines[4] = b'{"prompt": "unterminated'  # invalid JSON: rejected
    lines[12] = line("r2", "duplicate of line 2, next chunk")
    lines[13] = line("r13", "x")
    lines[14] = line("r13", "duplicate of line 14, same chunk")
    job_id = submit(sessions, queue_name, lines, chunk=10)
    assert check(sessions, job_id)["failed"] == 3

    workers = [Transitions(sessionmaker(engine, expire_on_commit=False), f"host:{n}", timedelta(seconds=60),
                           queue_name) for n, engine in enumerate(engines)]
    first, second, third = workers
    claims = first.claim_next(12)
    assert len(claims) == 12
    check(sessions, job_id)
    # Recorded by another backend than the one that claimed: that shard's running count goes negative.
    second.record([Success(c, "ok", "stop", 3, 2, cached_from=claims[0].id if n == 1 else None)
                   for n, c in enumerate(claims[:4])], [], "model-a")
    second.record([Success(claims[4], "ok", "length", 5, 7)], [], "model-b")
    third.record([], [Failure(claims[5], RequestState.queued, "engine_error", "retry me", 0.0),
                      Failure(claims[6], RequestState.failed, "prompt_too_long", "permanent"),
                      Failure(claims[7], RequestState.dead, "engine_error", "last attempt")], MODEL)
    by_state = check(sessions, job_id)
    assert (by_state["succeeded"], by_state["dead"]) == (5, 1)

    # claims[8:10]: a lost worker's leases; claims[10:12]: a circuit gives them back.
    expire_leases(sessions, [c.id for c in claims[8:10]])
    assert third.reclaim_expired()[0]
    first.give_back(claims[10:12], {})
    check(sessions, job_id)

    # The retry's second attempt (its last) is lost alone with its worker: dead, worker_lost.
    lone = Transitions(sessionmaker(engines[0], expire_on_commit=False), "host:lone", timedelta(seconds=60),
                       queue_name)
    [retried] = lone.claim_ids([claims[5].id])
    assert retried.attempt == 2
    expire_leases(sessions, [retried.id])
    assert third.reclaim_expired()[1]
    assert ("dead", "worker_lost") in counted(sessions(), job_id)
    check(sessions, job_id)
    claimed = second.claim_next(40)
    with sessions.begin() as session:
        assert len(requeue_dead(session, queue_name, "test")) == 2
    assert check(sessions, job_id)["dead"] == 0

    with sessions.begin() as session:
        cancelled = cancel_job(session, job_id, "test")
    assert cancelled and check(sessions, job_id)["cancelled"] == cancelled

    # A second job expires: its completion window closed while its lines were queued.
    other = submit(sessions, queue_name, lines[:6], chunk=6)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == other).values(expires_at=Job.created_at))
        assert expire_overdue(session, "test") == 5
    assert check(sessions, other)["expired"] == 5
    assert check(sessions, job_id)["running"] == len(claimed)  # untouched by the other job
