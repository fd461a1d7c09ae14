"""The only writer of request state: guarded transitions and their audit events, one statement per batch.

Every transition is an UPDATE guarded by the state (and attempt) it expects; its RETURNING rows feed the
audit INSERT in the same statement (a data-modifying CTE), so a row found elsewhere changes nothing and
gets no event — which is what makes a redelivered slice or a late worker harmless. A batch of N
transitions costs one round trip and one audit INSERT (sealed as one batch by the audit chain), not N.

Leases: a worker renews the leases of the requests it holds; a running request whose lease expired
belongs to a dead worker and is taken back by `reclaim_expired` — re-queued as a suspect while attempts
remain, dead-lettered after the last (a request that kills its worker cannot loop forever).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, TextClause, bindparam, func, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, TEXT
from sqlalchemy.orm import Session, sessionmaker

from schema.audit import AuditRow, append_events
from schema.stored_text import from_stored, storable_message, to_stored
from schema.tables import Request, RequestState

RECONCILE_LOCK = "deepbatch.reconcile"
WORKER_LOST = "worker_lost"


@dataclass(frozen=True)
class ClaimedRequest:
    id: int
    job_id: str
    line_no: int
    custom_id: str
    url: str
    body: dict[str, Any]
    attempt: int
    max_attempts: int
    cache_key: str | None
    queued_seconds: float  # since the request was submitted


@dataclass(frozen=True)
class Success:
    claim: ClaimedRequest
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_from: int | None = None  # the request whose stored result this reuses


@dataclass(frozen=True)
class Failure:
    """An attempt that ended in error: `to_state` is failed (permanent), queued (retry) or dead (last attempt)."""

    claim: ClaimedRequest
    to_state: RequestState
    error_code: str
    error_message: str
    retry_after_s: float = 0.0  # for a retry: how long the request waits before it is claimed again


@dataclass(frozen=True)
class DeadRequest:
    request_id: int
    job_id: str
    attempts: int
    error: str


def _arrays(**types: Any) -> list:
    return [bindparam(name, type_=ARRAY(type_)) for name, type_ in types.items()]


# The claimed rows come back as one JSON document (ClaimedRequest's fields, in order): json.loads runs in
# C, where the driver's and SQLAlchemy's per-row work would hold the GIL against the engine's step loop.
CLAIMED_COLUMNS = """
    SELECT coalesce(json_agg(json_build_array(id, job_id, line_no, custom_id, url, body, attempt, max_attempts,
                                              cache_key, extract(epoch FROM now() - created_at)::float8)
                             ORDER BY id), '[]')::text
    FROM claimed
"""


def _claim_statement(picked: str) -> TextClause:
    """queued (or lease-expired) → running, attempt + 1, with a 'started' event; `picked` chooses the rows."""
    return text(f"""
        WITH picked AS ({picked}),
        claimed AS (
            UPDATE requests r
            SET state = 'running', attempt = r.attempt + 1, worker = :worker, lease_expires_at = now() + :lease,
                retry_after = NULL, updated_at = now()
            FROM picked WHERE r.id = picked.id
            RETURNING r.*, picked.state::text AS from_state
        ),
        audited AS (
            INSERT INTO audit_events (job_id, request_id, event, from_state, to_state, attempt, worker)
            SELECT job_id, id, 'started', from_state, 'running', attempt, :worker FROM claimed
        )
        {CLAIMED_COLUMNS}
    """)


# The most urgent queued requests of the queue (priority, then age), skipping rows another worker is
# claiming, suspects (they run alone, from their own messages) and retries still in their backoff.
CLAIM_NEXT = _claim_statement("""
    SELECT id, state FROM requests
    WHERE queue = :queue AND state = 'queued' AND error_code IS DISTINCT FROM 'worker_lost'
      AND (retry_after IS NULL OR retry_after <= now())
    ORDER BY priority DESC, id LIMIT :limit
    FOR UPDATE SKIP LOCKED
""")

# These requests, if queued (any backoff is the caller's to wait) or held by a dead worker with attempts left.
CLAIM_IDS = _claim_statement("""
    SELECT id, state FROM requests
    WHERE id = ANY(:ids)
      AND (state = 'queued' OR (state = 'running' AND lease_expires_at < now() AND attempt < max_attempts))
    FOR UPDATE
""").bindparams(*_arrays(ids=BIGINT))

# A batch (successes here, failures below) arrives as one JSON array of rows: json.dumps runs in C, where binding one array per column
# costs the worker's Python (and so the engine's step loop) several times more GIL time (measured).
# A success clears the error of an earlier attempt (audit_events keeps it): a succeeded request carries no error code.
RECORD_SUCCESSES = text("""
    WITH finished AS (
        SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb))
            AS f(id bigint, attempt int, text text, finish_reason text, prompt_tokens int, completion_tokens int,
                 cached_from bigint)
    ),
    moved AS (
        UPDATE requests r SET state = 'succeeded', lease_expires_at = NULL, updated_at = now(),
                              error_code = NULL, error_message = NULL
        FROM finished f
        WHERE r.id = f.id AND r.state = 'running' AND r.attempt = f.attempt
        RETURNING r.id, r.job_id, r.attempt, f.text, f.finish_reason, f.prompt_tokens, f.completion_tokens,
                  f.cached_from
    ),
    stored AS (
        INSERT INTO results (request_id, job_id, text, finish_reason, prompt_tokens, completion_tokens, model,
                             worker, cached_from)
        SELECT id, job_id, text, finish_reason, prompt_tokens, completion_tokens, :model, :worker, cached_from
        FROM moved
        ON CONFLICT (request_id) DO NOTHING
    ),
    audited AS (
        INSERT INTO audit_events (job_id, request_id, event, from_state, to_state, attempt, worker, detail)
        SELECT job_id, id, 'succeeded', 'running', 'succeeded', attempt, :worker,
               'result reused from request ' || cached_from
        FROM moved ORDER BY id
    )
    SELECT id FROM moved
""")

RECORD_FAILURES = text("""
    WITH ended AS (
        SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb))
            AS e(id bigint, attempt int, to_state text, error_code text, error_message text, retry_after_s float8)
    ),
    moved AS (
        UPDATE requests r
        SET state = e.to_state::request_state, lease_expires_at = NULL, updated_at = now(),
            error_code = e.error_code, error_message = e.error_message,
            retry_after = CASE WHEN e.to_state = 'queued' THEN now() + make_interval(secs => e.retry_after_s) END
        FROM ended e
        WHERE r.id = e.id AND r.state = 'running' AND r.attempt = e.attempt
        RETURNING r.id, r.job_id, r.attempt, e.to_state, e.error_code || ': ' || e.error_message AS detail
    ),
    buried AS (
        INSERT INTO dead_letters (request_id, job_id, attempts, last_error)
        SELECT id, job_id, attempt, detail FROM moved WHERE to_state = 'dead'
        ON CONFLICT (request_id) DO NOTHING
    ),
    audited AS (
        INSERT INTO audit_events (job_id, request_id, event, from_state, to_state, attempt, worker, detail)
        SELECT job_id, id,
               CASE to_state WHEN 'queued' THEN 'retried' WHEN 'dead' THEN 'dead_lettered' ELSE 'failed' END,
               'running', to_state, attempt, :worker, detail
        FROM moved ORDER BY id
    )
    SELECT id, job_id, attempt, to_state, detail FROM moved
""")


def _lost_statement(lost: str, to_state: RequestState, event: str) -> TextClause:
    """Running requests whose worker stopped renewing their lease (`lost` picks them) → `to_state`."""
    dead_letter = """
        , buried AS (
            INSERT INTO dead_letters (request_id, job_id, attempts, last_error)
            SELECT id, job_id, attempt, 'worker_lost: ' || error_message FROM moved
            ON CONFLICT (request_id) DO NOTHING
        )""" if to_state is RequestState.dead else ""
    return text(f"""
        WITH lost AS ({lost} FOR UPDATE SKIP LOCKED),
        moved AS (
            UPDATE requests r
            SET state = '{to_state.value}', lease_expires_at = NULL, updated_at = now(), error_code = 'worker_lost',
                error_message = 'lease expired: worker ' || coalesce(r.worker, '?')
                                || ' stopped during attempt ' || r.attempt
            FROM lost WHERE r.id = lost.id
            RETURNING r.id, r.job_id, r.attempt, r.error_message
        ){dead_letter},
        audited AS (
            INSERT INTO audit_events (job_id, request_id, event, from_state, to_state, attempt, worker, detail)
            SELECT job_id, id, '{event}', 'running', '{to_state.value}', attempt, :worker, error_message
            FROM moved ORDER BY id
        )
        SELECT id, job_id, attempt, 'worker_lost: ' || error_message AS error FROM moved ORDER BY id
    """)


EXPIRED_LEASES = "SELECT id FROM requests WHERE state = 'running' AND lease_expires_at < now()"
REQUEUE_EXPIRED = _lost_statement(EXPIRED_LEASES + " AND queue = :queue AND attempt < max_attempts",
                                  RequestState.queued, "requeued")
BURY_EXPIRED = _lost_statement(EXPIRED_LEASES + " AND queue = :queue AND attempt >= max_attempts",
                               RequestState.dead, "dead_lettered")
BURY_EXPIRED_IDS = _lost_statement(EXPIRED_LEASES + " AND id = ANY(:ids) AND attempt >= max_attempts",
                                   RequestState.dead, "dead_lettered").bindparams(*_arrays(ids=BIGINT))


# An earlier succeeded request with the same cache key (schema/cache.py), for each key asked.
CACHED_RESULTS = text("""
    SELECT DISTINCT ON (r.cache_key) r.cache_key, s.request_id, s.text, s.finish_reason, s.prompt_tokens,
           s.completion_tokens
    FROM requests r JOIN results s ON s.request_id = r.id
    WHERE r.cache_key = ANY(:keys) AND r.state = 'succeeded'
    ORDER BY r.cache_key, r.id
""").bindparams(*_arrays(keys=TEXT))


def _claims(result: Any) -> list[ClaimedRequest]:
    return [ClaimedRequest(*fields) for fields in json.loads(result.scalar_one())]


def _dead(rows: Any) -> list[DeadRequest]:
    return [DeadRequest(row.id, row.job_id, row.attempt, row.error) for row in rows]


class Transitions:
    """The transitions one worker (or one CLI process) makes, with its identity on every event."""

    def __init__(self, sessions: sessionmaker[Session], worker: str, lease: timedelta, queue: str = "deepbatch"):
        self.sessions = sessions
        self.worker = worker
        self.lease = lease
        self.queue = queue

    def claim_next(self, limit: int) -> list[ClaimedRequest]:
        """Up to `limit` of the queue's most urgent queued requests: queued → running."""
        with self.sessions.begin() as session:
            return _claims(session.execute(CLAIM_NEXT, {"queue": self.queue, "limit": limit, "worker": self.worker,
                                                        "lease": self.lease}))

    def claim_ids(self, request_ids: Sequence[int]) -> tuple[list[ClaimedRequest], list[DeadRequest]]:
        """These requests: queued (or held by a dead worker) → running. A request whose worker died during
        its last attempt is not run again: it is dead-lettered here, as `reclaim_expired` would."""
        with self.sessions.begin() as session:
            ids = list(request_ids)
            dead = _dead(session.execute(BURY_EXPIRED_IDS, {"ids": ids, "worker": self.worker}))
            claims = _claims(session.execute(CLAIM_IDS, {"ids": ids, "worker": self.worker, "lease": self.lease}))
            return claims, dead

    def cached_successes(self, claims: Sequence[ClaimedRequest]) -> list[Success]:
        """The claims an identical earlier greedy request already answered, with that answer."""
        keys = {claim.cache_key for claim in claims if claim.cache_key}
        if not keys:
            return []
        with self.sessions() as session:
            stored = {row.cache_key: row for row in session.execute(CACHED_RESULTS, {"keys": list(keys)})}
        return [Success(claim, from_stored(row.text), row.finish_reason, row.prompt_tokens, row.completion_tokens,
                        cached_from=row.request_id)
                for claim in claims if (row := stored.get(claim.cache_key)) is not None and row.request_id != claim.id]

    def record(self, successes: Sequence[Success], failures: Sequence[Failure], model: str) -> set[int]:
        """Write finished attempts in one transaction; returns the ids whose attempt still owned the row.

        Result text is escaped where PostgreSQL cannot hold it (schema/stored_text.py). A row it still
        refuses raises (DataError, or UnicodeEncodeError in the driver): the recorder splits the batch."""
        recorded: set[int] = set()
        with self.sessions.begin() as session:
            if successes:
                recorded.update(session.scalars(RECORD_SUCCESSES, self._success_columns(successes, model)))
            if failures:
                recorded.update(row.id for row in session.execute(RECORD_FAILURES, self._failure_columns(failures)))
        return recorded

    def _success_columns(self, successes: Sequence[Success], model: str) -> dict[str, Any]:
        rows = [{"id": s.claim.id, "attempt": s.claim.attempt, "text": to_stored(s.text),
                 "finish_reason": s.finish_reason, "prompt_tokens": s.prompt_tokens,
                 "completion_tokens": s.completion_tokens, "cached_from": s.cached_from} for s in successes]
        return {"rows": json.dumps(rows, ensure_ascii=False), "model": model, "worker": self.worker}

    def _failure_columns(self, failures: Sequence[Failure]) -> dict[str, Any]:
        rows = [{"id": f.claim.id, "attempt": f.claim.attempt, "to_state": f.to_state.value,
                 "error_code": f.error_code, "error_message": storable_message(f.error_message),
                 "retry_after_s": f.retry_after_s} for f in failures]
        return {"rows": json.dumps(rows, ensure_ascii=False), "worker": self.worker}

    def renew_leases(self, request_ids: Sequence[int]) -> int:
        """Extend the leases of the requests this worker holds now; returns how many."""
        if not request_ids:
            return 0
        with self.sessions.begin() as session:
            return session.execute(
                update(Request)
                .where(Request.id.in_(request_ids), Request.worker == self.worker,
                       Request.state == RequestState.running)
                .values(lease_expires_at=func.now() + self.lease)
            ).rowcount

    def reclaim_expired(self) -> tuple[list[int], list[DeadRequest]]:
        """Take back this queue's running requests whose worker stopped renewing its lease.

        Returns (re-queued suspect ids, dead-lettered requests). Only one process does this at a time.
        """
        with self.sessions.begin() as session:
            lock_key = func.hashtext(f"{RECONCILE_LOCK}:{self.queue}")
            if not session.scalar(select(func.pg_try_advisory_xact_lock(lock_key))):
                return [], []
            parameters = {"queue": self.queue, "worker": self.worker}
            requeued = [row.id for row in session.execute(REQUEUE_EXPIRED, parameters)]
            return requeued, _dead(session.execute(BURY_EXPIRED, parameters))


def move(session: Session, which: ColumnElement[bool], from_state: RequestState, to_state: RequestState,
         event: str, actor: str, detail: str | None = None, **values: Any) -> list[Any]:
    """Every request matching `which` and in `from_state` → `to_state` with one audit event each (no commit).

    For the job-level operations (cancel, expiry, requeue from the dead-letter queue); returns
    (id, job_id, attempt) of the rows moved.
    """
    rows = session.execute(
        update(Request).where(which, Request.state == from_state)
        .values(state=to_state, **values).returning(Request.id, Request.job_id, Request.attempt)
    ).all()
    append_events(session, [AuditRow(job_id=row.job_id, request_id=row.id, event=event, from_state=from_state.value,
                                     to_state=to_state.value, attempt=row.attempt, worker=actor, detail=detail)
                            for row in rows])
    return rows
