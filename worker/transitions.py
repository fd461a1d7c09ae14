"""The only writer of request state: guarded transitions and their audit events, one statement per batch.

Every transition is an UPDATE guarded by the state (and attempt) it expects; its RETURNING rows feed the
audit INSERT in the same statement (a data-modifying CTE), so a row found elsewhere changes nothing and
gets no event — which is what makes a redelivered slice or a late worker harmless. A batch of N
transitions costs one round trip and one audit INSERT (sealed as one batch by the audit chain), not N.
The maintenance that `reconcile` runs (expiry of overdue jobs, the scan for messages the broker lost) is
here too, so that all of the worker's SQL sits in one module.

Leases: a worker renews the leases of the requests it holds; a running request whose lease expired
belongs to a lost worker and is taken back by `reclaim_expired`, into an isolation group (RECLAIM_EXPIRED
says how groups run, split and are charged: a request that kills its worker cannot loop forever, nor
take innocent requests with it). A worker whose engine is broken gives back what it holds (`give_back`).

An attempt that is not the request's fault is not counted by raising the request's `max_attempts` by one,
never by lowering `attempt`: the attempt number guards every record, and a number that came round again
would let the worker that lost the request (hung, not dead) record over the attempt that replaced it.
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
from schema.logprobs import from_stored_logprobs, stored_choice, to_stored_logprobs
from schema.stored_text import from_stored, storable_message, to_stored
from schema.tables import Job, Request, RequestState
from worker.job_counts import add_moves, counted, moves_of

RECONCILE_LOCK = "deepbatch.reconcile"
WORKER_LOST = "worker_lost"
FAILED_HERE = "failed here: "  # how a given-back request's audit event begins when its attempt failed
IsolationGroups = dict[int, list[int]]  # isolation group → its request ids


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
class Choice:
    """A further choice of a request that asked for several (n > 1); the first is the Success itself."""

    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[Any] | None = None


@dataclass(frozen=True)
class Success:
    claim: ClaimedRequest
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_from: int | None = None  # the request whose stored result this reuses
    # When the request asked: per output token [token, logprob, bytes, top alternatives] (schema/logprobs.py)
    logprobs: list[Any] | None = None
    choices: list[Choice] | None = None  # choices 1..n-1 of a request with n > 1; completion_tokens counts all


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
        ),
        {moves_of("claimed", "from_state", "'running'")},
        {counted("moves")}
        {CLAIMED_COLUMNS}
    """)


# The most urgent queued requests of the queue (priority, then age), skipping rows another worker is
# claiming, suspects (their isolation group runs apart, from its own message) and retries in their backoff.
CLAIM_NEXT = _claim_statement("""
    SELECT id, state FROM requests
    WHERE queue = :queue AND state = 'queued' AND isolation_group IS NULL
      AND (retry_after IS NULL OR retry_after <= now())
    ORDER BY priority DESC, id LIMIT :limit
    FOR UPDATE SKIP LOCKED
""")

# These requests, if queued: retries whose backoff the caller waited out. A lost worker's requests are
# not taken over here but by RECLAIM_EXPIRED, which alone decides what their loss costs them.
CLAIM_IDS = _claim_statement("""
    SELECT id, state FROM requests WHERE id = ANY(:ids) AND state = 'queued' FOR UPDATE
""").bindparams(*_arrays(ids=BIGINT))

# An isolation group's queued requests, if the group is still the one its message names: a stale message
# (a group since split, redelivered by the broker) claims nothing.
CLAIM_GROUP = _claim_statement("""
    SELECT id, state FROM requests
    WHERE id = ANY(:ids) AND isolation_group = :isolation_group AND state = 'queued'
    FOR UPDATE
""").bindparams(*_arrays(ids=BIGINT))

# A batch (successes here, failures below) arrives as one JSON array of rows: json.dumps runs in C, where binding one array per column
# costs the worker's Python (and so the engine's step loop) several times more GIL time (measured).
# A success clears the error of an earlier attempt (audit_events keeps it): a succeeded request carries no error code.
RECORD_SUCCESSES = text(f"""
    WITH finished AS (
        SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb))
            AS f(id bigint, attempt int, text text, finish_reason text, prompt_tokens int, completion_tokens int,
                 cached_from bigint, logprobs jsonb, choices jsonb)
    ),
    moved AS (
        UPDATE requests r SET state = 'succeeded', lease_expires_at = NULL, updated_at = now(),
                              error_code = NULL, error_message = NULL
        FROM finished f
        WHERE r.id = f.id AND r.state = 'running' AND r.attempt = f.attempt
        RETURNING r.id, r.job_id, r.attempt, f.text, f.finish_reason, f.prompt_tokens, f.completion_tokens,
                  f.cached_from, f.logprobs, f.choices
    ),
    stored AS (
        INSERT INTO results (request_id, job_id, text, finish_reason, prompt_tokens, completion_tokens, model,
                             worker, cached_from, logprobs, choices)
        SELECT id, job_id, text, finish_reason, prompt_tokens, completion_tokens, :model, :worker, cached_from,
               logprobs, choices
        FROM moved
        ON CONFLICT (request_id) DO NOTHING
    ),
    audited AS (
        INSERT INTO audit_events (job_id, request_id, event, from_state, to_state, attempt, worker, detail)
        SELECT job_id, id, 'succeeded', 'running', 'succeeded', attempt, :worker,
               'result reused from request ' || cached_from
        FROM moved ORDER BY id
    ),
    {moves_of("moved", "'running'", "'succeeded'", to_label=":model", cache_hit="(cached_from IS NOT NULL)::int",
              prompt_tokens="prompt_tokens", completion_tokens="completion_tokens")},
    {counted("moves")}
    SELECT id FROM moved
""")

RECORD_FAILURES = text(f"""
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
        RETURNING r.id, r.job_id, r.attempt, e.to_state, e.error_code, e.error_code || ': ' || e.error_message AS detail
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
    ),
    {moves_of("moved", "'running'", "to_state",
              to_label="CASE WHEN to_state IN ('failed', 'dead') THEN coalesce(error_code, '') ELSE '' END")},
    {counted("moves")}
    SELECT id, job_id, attempt, to_state, detail FROM moved
""")


# Running requests whose worker stopped renewing their leases (it died, hung or lost its database), taken
# back: all that worker holds, as soon as one of its leases has expired and none was renewed for half a
# lease (a live worker renews them all every third of one), so that what it held comes back together. A
# live worker's lone expired lease (a result it could not record) is taken back alone, not its neighbours.
# Which of them (if any) stopped a worker cannot be told, so the loss is charged only to a request that was
# running alone: lost with others, its attempt is not counted. They
# come back as one isolation group, which runs with nothing else in a worker's engine — at full depth, so
# that a hung worker's requests are finished at the normal rate, where running each suspect alone made a
# hung worker's 128 requests a tail of one at a time — and a group that loses its worker again is split
# in two, each half a group of its own (bisection): a request that kills every worker it runs on is alone
# after a few losses (one per halving), is charged from then on, and is dead-lettered after its last
# attempt, while its innocent group-mates succeed, never charged. Bisection costs a few more lost workers
# in that rare case (each a lease and a restart) for a full-depth recovery in the common one (a hang, a
# kill, a lost host), and while it halves, the other half and every other worker run at full depth.
RECLAIM_EXPIRED = text(f"""
    WITH lost_workers AS (
        SELECT worker FROM requests
        WHERE queue = :queue AND state = 'running'
        GROUP BY worker
        HAVING min(lease_expires_at) < now() AND max(lease_expires_at) < now() + :lease / 2
    ),
    taken AS (
        SELECT id FROM requests
        WHERE queue = :queue AND state = 'running'
          AND (worker IN (SELECT worker FROM lost_workers) OR lease_expires_at < now())
        FOR UPDATE SKIP LOCKED
    ),
    lost AS (
        SELECT r.id, r.worker, r.attempt, r.max_attempts,
               bool_or(r.isolation_group IS NOT NULL) OVER (PARTITION BY r.worker) AS was_isolated,
               row_number() OVER (PARTITION BY r.worker ORDER BY r.id) AS position,
               count(*) OVER (PARTITION BY r.worker) AS held
        FROM requests r JOIN taken USING (id)
    ),
    parted AS (
        SELECT id, worker, attempt, held,
               CASE WHEN was_isolated AND position > (held + 1) / 2 THEN 2 ELSE 1 END AS part,
               held = 1 AND attempt >= max_attempts AS buried
        FROM lost
    ),
    groups AS (
        SELECT worker, part, nextval('request_isolation_groups') AS isolation_group
        FROM (SELECT DISTINCT worker, part FROM parted WHERE NOT buried) AS parts
    ),
    moved AS (
        UPDATE requests r
        SET state = CASE WHEN p.buried THEN 'dead' ELSE 'queued' END::request_state,
            max_attempts = r.max_attempts + CASE WHEN p.held > 1 THEN 1 ELSE 0 END,
            isolation_group = g.isolation_group, lease_expires_at = NULL, updated_at = now(),
            error_code = '{WORKER_LOST}',
            error_message = 'lease expired: worker ' || coalesce(r.worker, '?') || ' stopped during attempt '
                            || r.attempt || CASE WHEN p.held > 1 THEN ' (lost with ' || p.held - 1
                                                 || ' other requests: not counted)' ELSE '' END
        FROM parted p LEFT JOIN groups g ON g.worker = p.worker AND g.part = p.part
        WHERE r.id = p.id
        RETURNING r.id, r.job_id, r.attempt, r.state::text AS to_state, r.isolation_group, r.error_message
    ),
    buried AS (
        INSERT INTO dead_letters (request_id, job_id, attempts, last_error)
        SELECT id, job_id, attempt, '{WORKER_LOST}: ' || error_message FROM moved WHERE to_state = 'dead'
        ON CONFLICT (request_id) DO NOTHING
    ),
    audited AS (
        INSERT INTO audit_events (job_id, request_id, event, from_state, to_state, attempt, worker, detail)
        SELECT job_id, id, CASE to_state WHEN 'dead' THEN 'dead_lettered' ELSE 'requeued' END, 'running', to_state,
               attempt, :worker, error_message
        FROM moved ORDER BY id
    ),
    {moves_of("moved", "'running'", "to_state",
              to_label=f"CASE to_state WHEN 'dead' THEN '{WORKER_LOST}' ELSE '' END")},
    {counted("moves")}
    SELECT id, job_id, attempt, to_state, isolation_group, '{WORKER_LOST}: ' || error_message AS error
    FROM moved ORDER BY id
""")

# What a worker whose circuit opened (worker/circuit.py) held: running → queued, the attempt not counted,
# into the isolation group each had (none, for most). Guarded by the worker and the attempt, so a request
# that another worker has taken back meanwhile is left alone.
GIVE_BACK = text(f"""
    WITH given AS (
        SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS g(id bigint, attempt int, detail text)
    ),
    moved AS (
        UPDATE requests r
        SET state = 'queued', max_attempts = r.max_attempts + 1, lease_expires_at = NULL, retry_after = NULL,
            updated_at = now()
        FROM given g
        WHERE r.id = g.id AND r.state = 'running' AND r.worker = :worker AND r.attempt = g.attempt
        RETURNING r.id, r.job_id, r.attempt, r.max_attempts, r.isolation_group, g.detail
    ),
    audited AS (
        INSERT INTO audit_events (job_id, request_id, event, from_state, to_state, attempt, worker, detail)
        SELECT job_id, id, 'given_back', 'running', 'queued', attempt, :worker,
               detail || '; attempt ' || attempt || ' not counted (attempts allowed: ' || max_attempts || ')'
        FROM moved ORDER BY id
    ),
    {moves_of("moved", "'running'", "'queued'")},
    {counted("moves")}
    SELECT id, isolation_group FROM moved ORDER BY id
""")

# Which of these requests an opened circuit of another worker gave back after they failed there: failing
# again, on a second worker, the fault is plausibly the request's own, and the attempt counts.
FAILED_ELSEWHERE = text("""
    SELECT DISTINCT request_id FROM audit_events
    WHERE request_id = ANY(:ids) AND event = 'given_back' AND worker <> :worker AND detail LIKE :failed_here
""").bindparams(*_arrays(ids=BIGINT))


# An earlier succeeded request with the same cache key (schema/cache.py), for each key asked.
CACHED_RESULTS = text("""
    SELECT DISTINCT ON (r.cache_key) r.cache_key, s.request_id, s.text, s.finish_reason, s.prompt_tokens,
           s.completion_tokens, s.logprobs, s.choices
    FROM requests r JOIN results s ON s.request_id = r.id
    WHERE r.cache_key = ANY(:keys) AND r.state = 'succeeded'
    ORDER BY r.cache_key, r.id
""").bindparams(*_arrays(keys=TEXT))


def choices_to_stored(choices: list[Choice] | None) -> list[dict[str, Any]] | None:
    """Further choices as `results.choices` holds them (schema/logprobs.py: stored_choice)."""
    if choices is None:
        return None
    return [stored_choice(to_stored(choice.text), choice.finish_reason, choice.completion_tokens,
                          to_stored_logprobs(choice.logprobs)) for choice in choices]


def choices_from_stored(stored: list[dict[str, Any]] | None) -> list[Choice] | None:
    if stored is None:
        return None
    return [Choice(from_stored(choice["text"]), choice["finish_reason"], choice["completion_tokens"],
                   from_stored_logprobs(choice["logprobs"])) for choice in stored]


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

    def claim_ids(self, request_ids: Sequence[int]) -> list[ClaimedRequest]:
        """Those of these requests that are queued: queued → running."""
        with self.sessions.begin() as session:
            return _claims(session.execute(CLAIM_IDS, {"ids": list(request_ids), "worker": self.worker,
                                                       "lease": self.lease}))

    def claim_group(self, request_ids: Sequence[int], isolation_group: int) -> list[ClaimedRequest]:
        """The queued requests of an isolation group (`request_ids`, as its message lists them) → running."""
        with self.sessions.begin() as session:
            return _claims(session.execute(CLAIM_GROUP, {"ids": list(request_ids), "isolation_group": isolation_group,
                                                         "worker": self.worker, "lease": self.lease}))

    def cached_successes(self, claims: Sequence[ClaimedRequest]) -> list[Success]:
        """The claims an identical earlier greedy request already answered, with that answer."""
        keys = {claim.cache_key for claim in claims if claim.cache_key}
        if not keys:
            return []
        with self.sessions() as session:
            stored = {row.cache_key: row for row in session.execute(CACHED_RESULTS, {"keys": list(keys)})}
        return [Success(claim, from_stored(row.text), row.finish_reason, row.prompt_tokens, row.completion_tokens,
                        cached_from=row.request_id, logprobs=from_stored_logprobs(row.logprobs),
                        choices=choices_from_stored(row.choices))
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
                 "completion_tokens": s.completion_tokens, "cached_from": s.cached_from,
                 "logprobs": to_stored_logprobs(s.logprobs), "choices": choices_to_stored(s.choices)}
                for s in successes]
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

    def reclaim_expired(self) -> tuple[IsolationGroups, list[DeadRequest]]:
        """Take back this queue's running requests whose worker stopped renewing its lease.

        Returns (the isolation groups re-queued, dead-lettered requests). Only one process does this at a time.
        """
        with self.sessions.begin() as session:
            lock_key = func.hashtext(f"{RECONCILE_LOCK}:{self.queue}")
            if not session.scalar(select(func.pg_try_advisory_xact_lock(lock_key))):
                return {}, []
            parameters = {"queue": self.queue, "worker": self.worker, "lease": self.lease}
            rows = session.execute(RECLAIM_EXPIRED, parameters).all()
        groups: IsolationGroups = {}
        for row in rows:
            if row.to_state == RequestState.queued.value:
                groups.setdefault(row.isolation_group, []).append(row.id)
        return groups, _dead(row for row in rows if row.to_state == RequestState.dead.value)

    def give_back(self, held: Sequence[ClaimedRequest],
                  failed_here: dict[int, str]) -> tuple[list[int], IsolationGroups]:
        """Requests this worker holds and cannot run (its circuit opened) → queued, their attempts not
        counted. `failed_here`: those whose attempt failed on this worker, with the error, which the audit
        event keeps. Returns (ordinary request ids, isolation groups) given back, to publish again."""
        rows = [{"id": claim.id, "attempt": claim.attempt,
                 "detail": (FAILED_HERE + storable_message(failed_here[claim.id][:1000]) if claim.id in failed_here
                            else "circuit open")}
                for claim in held]
        if not rows:
            return [], {}
        with self.sessions.begin() as session:
            parameters = {"rows": json.dumps(rows, ensure_ascii=False), "worker": self.worker}
            moved = session.execute(GIVE_BACK, parameters).all()
        groups: IsolationGroups = {}
        for row in moved:
            if row.isolation_group is not None:
                groups.setdefault(row.isolation_group, []).append(row.id)
        return [row.id for row in moved if row.isolation_group is None], groups

    def failed_elsewhere(self, request_ids: Sequence[int]) -> set[int]:
        """Those of these requests that another worker's opened circuit gave back after they failed there."""
        if not request_ids:
            return set()
        with self.sessions() as session:
            return set(session.scalars(FAILED_ELSEWHERE, {"ids": list(request_ids), "worker": self.worker,
                                                          "failed_here": FAILED_HERE + "%"}))


def move(session: Session, which: ColumnElement[bool], from_state: RequestState, to_state: RequestState,
         event: str, actor: str, detail: str | None = None, **values: Any) -> list[Any]:
    """Every request matching `which` and in `from_state` → `to_state` with one audit event each, and the
    job_counts they change (no commit).

    For the job-level operations (cancel, expiry, requeue from the dead-letter queue); returns
    (id, job_id, attempt) of the rows moved.
    """
    assert RequestState.succeeded not in (from_state, to_state) and "error_code" not in values
    rows = session.execute(
        update(Request).where(which, Request.state == from_state)
        .values(state=to_state, **values).returning(Request.id, Request.job_id, Request.attempt, Request.error_code)
    ).all()
    append_events(session, [AuditRow(job_id=row.job_id, request_id=row.id, event=event, from_state=from_state.value,
                                     to_state=to_state.value, attempt=row.attempt, worker=actor, detail=detail)
                            for row in rows])
    add_moves(session, from_state, to_state, rows)
    return rows


# ---- maintenance: completion windows and messages the broker lost (worker/reconcile.py) ----


def expire_overdue(session: Session, actor: str) -> int:
    """Queued requests of jobs whose completion window has closed become expired; finished ones stay."""
    overdue_jobs = select(Job.id).where(Job.expires_at < func.now())
    reason = "the job's completion window closed before this request ran"
    return len(move(session, Request.job_id.in_(overdue_jobs), RequestState.queued, RequestState.expired, "expired",
                    actor, reason, error_message=reason))


def queued_request_ids(session: Session, queue: str, older_than: timedelta,
                       job_id: str | None = None) -> tuple[IsolationGroups, list[int]]:
    """The queue's requests queued and untouched for `older_than`, to re-publish if the broker lost them:
    (suspects by isolation group, each group run apart; the others)."""
    statement = select(Request.id, Request.isolation_group).where(
        Request.queue == queue, Request.state == RequestState.queued, Request.updated_at < func.now() - older_than,
    ).order_by(Request.priority.desc(), Request.id)
    if job_id is not None:
        statement = statement.where(Request.job_id == job_id)
    groups: IsolationGroups = {}
    others = []
    for request_id, isolation_group in session.execute(statement):
        if isolation_group is None:
            others.append(request_id)
        else:
            groups.setdefault(isolation_group, []).append(request_id)
    return groups, others
