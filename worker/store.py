"""All of the worker's SQL: guarded state transitions of requests, results and their audit events.

Every transition is one `UPDATE ... WHERE state = <expected>` plus one audit event in the same
transaction; a transition that finds the row elsewhere changes nothing and says so (returns None/False),
which is what makes a redelivered message harmless.

Leases: a worker renews the lease of every request it runs (`renew_leases`); a running request whose
lease has expired belongs to a dead worker and is taken back by `reclaim_expired` — re-queued while
attempts remain, dead-lettered after the last (a request that kills its worker cannot loop forever).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, sessionmaker

from schema.tables import AuditEvent, DeadLetter, Job, Request, RequestState, Result
from worker.engine.types import Completion

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
    queued_seconds: float  # since the request was submitted
    cache_key: str | None


@dataclass(frozen=True)
class DeadRequest:
    request_id: int
    job_id: str
    attempts: int
    error: str


def _audit(session: Session, request_id: int, job_id: str, event: str, from_state: str | None,
           to_state: str | None, attempt: int | None, worker: str | None, detail: str | None = None) -> None:
    session.execute(insert(AuditEvent).values(
        job_id=job_id, request_id=request_id, event=event, from_state=from_state, to_state=to_state,
        attempt=attempt, worker=worker, detail=detail,
    ))


def _dead_letter(session: Session, request_id: int, job_id: str, attempts: int, error: str) -> DeadRequest:
    session.execute(pg_insert(DeadLetter).values(
        request_id=request_id, job_id=job_id, attempts=attempts, last_error=error,
    ).on_conflict_do_nothing(index_elements=["request_id"]))
    return DeadRequest(request_id, job_id, attempts, error)


def lost_worker_message(row: Any) -> str:
    return f"lease expired: worker {row.worker} stopped during attempt {row.attempt}"


CLAIMED_COLUMNS = (Request.id, Request.job_id, Request.line_no, Request.custom_id, Request.url, Request.body,
                   Request.attempt, Request.max_attempts, Request.cache_key,
                   func.extract("epoch", func.now() - Request.created_at).label("queued_seconds"))


class RequestStore:
    def __init__(self, sessions: sessionmaker[Session], worker: str, lease: timedelta, queue: str = "deepbatch"):
        self.sessions = sessions
        self.worker = worker
        self.lease = lease
        self.queue = queue  # claim_next takes only requests published to this worker's queue

    def _audit_claim(self, session: Session, claim: ClaimedRequest, event: str, from_state: str,
                     to_state: str, detail: str | None = None) -> None:
        _audit(session, claim.id, claim.job_id, event, from_state, to_state, claim.attempt, self.worker, detail)

    def claim(self, request_id: int) -> ClaimedRequest | DeadRequest | None:
        """This request: queued → running (attempt + 1), or a running one whose lease expired (its worker
        died). Anything else (a final row, or one a live worker holds) is left alone and None returned.

        A worker that died during the last attempt leaves nothing to run: the request is dead-lettered,
        as `reclaim_expired` would, and its DeadRequest returned, whichever of the two gets there first.
        """
        lease_expired = (Request.state == RequestState.running) & (Request.lease_expires_at < func.now())
        with self.sessions.begin() as session:
            row = session.execute(
                select(Request.id, Request.state, Request.job_id, Request.attempt, Request.max_attempts, Request.worker)
                .where(Request.id == request_id, (Request.state == RequestState.queued) | lease_expired)
                .with_for_update()
            ).first()
            if row is None:
                return None
            if row.state is RequestState.running and row.attempt >= row.max_attempts:
                return self._bury_lost(session, row)
            return self._start(session, request_id, row.state)

    def claim_next(self) -> ClaimedRequest | None:
        """The most urgent queued request of this queue (highest job priority, then oldest): queued → running.

        A message is a right to run one request, not necessarily its own: so a high-priority job
        overtakes a backlog already in the broker. Requests whose worker died are left to their own
        message, which runs them in isolation (worker/isolation.py).
        """
        with self.sessions.begin() as session:
            request_id = session.scalar(
                select(Request.id)
                .where(Request.queue == self.queue, Request.state == RequestState.queued,
                       Request.error_code.is_distinct_from(WORKER_LOST))
                .order_by(Request.priority.desc(), Request.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            return self._start(session, request_id, RequestState.queued) if request_id else None

    def _start(self, session: Session, request_id: int, previous_state: RequestState) -> ClaimedRequest:
        row = session.execute(
            update(Request)
            .where(Request.id == request_id)
            .values(state=RequestState.running, attempt=Request.attempt + 1, worker=self.worker,
                    lease_expires_at=func.now() + self.lease)
            .returning(*CLAIMED_COLUMNS)
        ).mappings().one()
        claim = ClaimedRequest(**{**row, "queued_seconds": float(row["queued_seconds"])})
        self._audit_claim(session, claim, "started", previous_state.value, "running")
        return claim

    def lost_a_worker(self, request_id: int) -> bool:
        """Whether the request's last attempt ended with its worker's death (it may be the cause)."""
        lease_expired = (Request.state == RequestState.running) & (Request.lease_expires_at < func.now())
        with self.sessions() as session:
            return bool(session.scalar(
                select((Request.error_code == WORKER_LOST) | lease_expired).where(Request.id == request_id)
            ))

    def _leave_running(self, session: Session, claim: ClaimedRequest, to_state: RequestState,
                       **values: Any) -> bool:
        statement = (
            update(Request)
            .where(Request.id == claim.id, Request.state == RequestState.running,
                   Request.attempt == claim.attempt)
            .values(state=to_state, lease_expires_at=None, **values)
        )
        return session.execute(statement).rowcount == 1

    def succeed(self, claim: ClaimedRequest, completion: Completion, model: str,
                cached_from: int | None = None) -> bool:
        """running → succeeded with exactly one result row; False if this attempt no longer owns the row."""
        with self.sessions.begin() as session:
            if not self._leave_running(session, claim, RequestState.succeeded):
                return False
            session.execute(pg_insert(Result).values(
                request_id=claim.id, job_id=claim.job_id, text=completion.text,
                finish_reason=completion.finish_reason, prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens, model=model, worker=self.worker,
                cached_from=cached_from,
            ).on_conflict_do_nothing(index_elements=["request_id"]))
            detail = f"result reused from request {cached_from}" if cached_from else None
            self._audit_claim(session, claim, "succeeded", "running", "succeeded", detail)
            return True

    def cached_result(self, cache_key: str) -> tuple[int, Completion] | None:
        """An earlier succeeded request with the same cache key, and its result."""
        statement = (
            select(Result.request_id, Result.text, Result.finish_reason, Result.prompt_tokens,
                   Result.completion_tokens)
            .join(Request, Request.id == Result.request_id)
            .where(Request.cache_key == cache_key, Request.state == RequestState.succeeded)
            .limit(1)
        )
        with self.sessions() as session:
            row = session.execute(statement).first()
        if row is None:
            return None
        # Token ids are not stored; the reused result carries its text and counts.
        completion = Completion(token_ids=[], text=row.text, finish_reason=row.finish_reason,
                                prompt_tokens=row.prompt_tokens)
        completion.completion_tokens = row.completion_tokens
        return row.request_id, completion

    def fail(self, claim: ClaimedRequest, code: str, message: str) -> bool:
        """running → failed: a permanent error, never retried."""
        with self.sessions.begin() as session:
            if not self._leave_running(session, claim, RequestState.failed, error_code=code, error_message=message):
                return False
            self._audit_claim(session, claim, "failed", "running", "failed", f"{code}: {message}")
            return True

    def retry_or_dead_letter(self, claim: ClaimedRequest, code: str, message: str) -> RequestState | None:
        """A transient error: running → queued while attempts remain, else running → dead (dead letter)."""
        with self.sessions.begin() as session:
            to_state = RequestState.queued if claim.attempt < claim.max_attempts else RequestState.dead
            if not self._leave_running(session, claim, to_state, error_code=code, error_message=message):
                return None
            if to_state is RequestState.queued:
                self._audit_claim(session, claim, "retried", "running", "queued", f"{code}: {message}")
            else:
                _dead_letter(session, claim.id, claim.job_id, claim.attempt, f"{code}: {message}")
                self._audit_claim(session, claim, "dead_lettered", "running", "dead", f"{code}: {message}")
            return to_state

    def renew_leases(self, request_ids: Sequence[int]) -> int:
        """Extend the leases of the requests this worker is running now; returns how many."""
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

        Returns (re-queued request ids, dead-lettered requests). Only one process does this at a time.
        """
        with self.sessions.begin() as session:
            lock_key = func.hashtext(f"{RECONCILE_LOCK}:{self.queue}")
            locked = session.scalar(select(func.pg_try_advisory_xact_lock(lock_key)))
            if not locked:
                return [], []
            expired = session.execute(
                select(Request.id, Request.job_id, Request.attempt, Request.max_attempts, Request.worker)
                .where(Request.queue == self.queue, Request.state == RequestState.running,
                       Request.lease_expires_at < func.now())
                .with_for_update(skip_locked=True)
            ).all()
            requeued, dead = [], []
            for row in expired:
                if row.attempt < row.max_attempts:
                    lost = lost_worker_message(row)
                    self._move(session, row.id, RequestState.queued, error_code=WORKER_LOST, error_message=lost)
                    _audit(session, row.id, row.job_id, "requeued", "running", "queued", row.attempt, self.worker, lost)
                    requeued.append(row.id)
                else:
                    dead.append(self._bury_lost(session, row))
            return requeued, dead

    def _bury_lost(self, session: Session, row: Any) -> DeadRequest:
        """running → dead for a request whose worker died during its last attempt (a poison request)."""
        lost = lost_worker_message(row)
        self._move(session, row.id, RequestState.dead, error_code=WORKER_LOST, error_message=lost)
        _audit(session, row.id, row.job_id, "dead_lettered", "running", "dead", row.attempt, self.worker, lost)
        return _dead_letter(session, row.id, row.job_id, row.attempt, f"{WORKER_LOST}: {lost}")

    @staticmethod
    def _move(session: Session, request_id: int, to_state: RequestState, **values: Any) -> None:
        session.execute(update(Request).where(Request.id == request_id)
                        .values(state=to_state, lease_expires_at=None, **values))

    def cancel_job(self, job_id: str) -> int | None:
        """Mark the job cancelled and move its queued requests to cancelled; running ones finish.

        Returns how many requests were cancelled, or None if there is no such job.
        """
        with self.sessions.begin() as session:
            found = session.execute(update(Job).where(Job.id == job_id)
                                    .values(cancel_requested_at=func.coalesce(Job.cancel_requested_at, func.now()))
                                    ).rowcount
            if not found:
                return None
            return self._end_queued(session, Request.job_id == job_id, RequestState.cancelled, "cancelled",
                                    "the job was cancelled")

    def expire_overdue(self) -> int:
        """Queued requests of jobs whose completion window has closed become expired; finished ones stay."""
        overdue_jobs = select(Job.id).where(Job.expires_at < func.now())
        with self.sessions.begin() as session:
            return self._end_queued(session, Request.job_id.in_(overdue_jobs), RequestState.expired, "expired",
                                    "the job's completion window closed before this request ran")

    def _end_queued(self, session: Session, which: Any, to_state: RequestState, event: str, reason: str) -> int:
        rows = session.execute(
            update(Request).where(which, Request.state == RequestState.queued)
            .values(state=to_state, error_message=reason).returning(Request.id, Request.job_id, Request.attempt)
        ).all()
        if rows:
            session.execute(insert(AuditEvent), [
                {"job_id": row.job_id, "request_id": row.id, "event": event, "from_state": "queued",
                 "to_state": to_state.value, "attempt": row.attempt, "worker": self.worker, "detail": reason}
                for row in rows])
        return len(rows)

    def queued_request_ids(self, older_than: timedelta, job_id: str | None = None) -> list[int]:
        """This queue's requests queued and untouched for `older_than`: to re-publish if the broker lost them."""
        statement = select(Request.id).where(
            Request.queue == self.queue, Request.state == RequestState.queued,
            Request.updated_at < func.now() - older_than,
        ).order_by(Request.id)
        if job_id is not None:
            statement = statement.where(Request.job_id == job_id)
        with self.sessions() as session:
            return list(session.scalars(statement))

    def dead_letters(self, job_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        statement = (
            select(DeadLetter.request_id, DeadLetter.job_id, Request.line_no, Request.custom_id,
                   DeadLetter.attempts, DeadLetter.last_error, DeadLetter.created_at)
            .join(Request, Request.id == DeadLetter.request_id)
            .order_by(DeadLetter.created_at).limit(limit)
        )
        if job_id is not None:
            statement = statement.where(DeadLetter.job_id == job_id)
        with self.sessions() as session:
            return [dict(row) for row in session.execute(statement).mappings()]

    def requeue_dead(self, request_ids: Sequence[int] | None = None, job_id: str | None = None) -> list[int]:
        """dead → queued with a fresh set of attempts; the dead-letter record goes, its history stays audited."""
        statement = update(Request).where(Request.queue == self.queue, Request.state == RequestState.dead)
        if request_ids is not None:
            statement = statement.where(Request.id.in_(request_ids))
        if job_id is not None:
            statement = statement.where(Request.job_id == job_id)
        with self.sessions.begin() as session:
            rows = session.execute(
                statement.values(state=RequestState.queued, attempt=0).returning(Request.id, Request.job_id)
            ).all()
            for row in rows:
                _audit(session, row.id, row.job_id, "requeued", "dead", "queued", 0, self.worker,
                       "from the dead-letter queue")
            if rows:
                session.execute(delete(DeadLetter).where(DeadLetter.request_id.in_([row.id for row in rows])))
            return [row.id for row in rows]

    def purge_dead_letters(self, job_id: str | None = None) -> int:
        """Forget dead-letter records (the requests stay dead, their history audited)."""
        statement = delete(DeadLetter)
        if job_id is not None:
            statement = statement.where(DeadLetter.job_id == job_id)
        with self.sessions.begin() as session:
            return session.execute(statement).rowcount
