"""All of the producer's SQL: creating jobs, inserting request rows, progress, result export, and the
job-level operations of the CLI (cancel, expiry, dead letters, lost messages)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import RowMapping, delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from producer.reader import ReadLine
from schema.cache import result_cache_key
from schema.tables import AuditEvent, DeadLetter, Job, Request, RequestState, Result


def new_job_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def create_job(session: Session, input_file: str, model: str, metadata: dict[str, Any] | None = None,
               completion_window: timedelta | None = None, use_result_cache: bool = True, priority: int = 0,
               queue: str = "deepbatch") -> str:
    job_id = new_job_id()
    expires_at = func.now() + completion_window if completion_window else None
    session.add(Job(id=job_id, input_file=input_file, model=model, metadata_json=metadata or {},
                    expires_at=expires_at, use_result_cache=use_result_cache, priority=priority, queue=queue))
    session.flush()  # the job row first: the audit event refers to it
    session.add(AuditEvent(job_id=job_id, event="job_created", detail=input_file))
    session.flush()
    return job_id


@dataclass
class ChunkOutcome:
    queued_request_ids: list[int]
    rejected_lines: int


@dataclass(frozen=True)
class JobOptions:
    """What every request row of a job inherits."""

    max_attempts: int
    cache_model: str | None = None  # the served model, when the job uses the result cache
    priority: int = 0
    queue: str = "deepbatch"


def _accepted_row(job_id: str, line: ReadLine, options: JobOptions) -> dict[str, Any]:
    assert line.request is not None
    body = line.request.body_json()
    return {
        "job_id": job_id,
        "line_no": line.line_no,
        "custom_id": line.request.custom_id,
        "url": line.request.url,
        "body": body,
        "state": RequestState.queued,
        "max_attempts": options.max_attempts,
        "priority": options.priority,
        "queue": options.queue,
        "cache_key": result_cache_key(options.cache_model, line.request.url, body) if options.cache_model else None,
    }


def _rejected_row(job_id: str, line_no: int, custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "line_no": line_no,
        "custom_id": custom_id,
        "state": RequestState.failed,
        "line_error": message,
        "error_code": code,
        "error_message": f"line {line_no}: {message}",
    }


def _insert_accepted(session: Session, job_id: str, lines: list[ReadLine], options: JobOptions) -> dict[int, int]:
    """Insert valid lines; a custom_id already taken in the job is skipped. Returns line_no → request id."""
    if not lines:
        return {}
    statement = (
        pg_insert(Request)
        .values([_accepted_row(job_id, line, options) for line in lines])
        .on_conflict_do_nothing(index_elements=["job_id", "custom_id"], index_where=text("line_error IS NULL"))
        .returning(Request.line_no, Request.id)
    )
    return {line_no: request_id for line_no, request_id in session.execute(statement)}


def _first_line_of(session: Session, job_id: str, custom_id: str) -> int | None:
    return session.scalar(
        select(Request.line_no).where(
            Request.job_id == job_id, Request.custom_id == custom_id, Request.line_error.is_(None)
        )
    )


def _rejections(session: Session, job_id: str, lines: list[ReadLine], inserted: dict[int, int]) -> list[dict]:
    rows = []
    for line in lines:
        if line.error is not None:
            rows.append(_rejected_row(job_id, line.line_no, line.error.custom_id, line.error.code, line.error.message))
        elif line.line_no not in inserted and line.request is not None:
            custom_id = line.request.custom_id
            first = _first_line_of(session, job_id, custom_id)
            message = f"duplicate custom_id {custom_id!r} (first used on line {first})"
            rows.append(_rejected_row(job_id, line.line_no, custom_id, "duplicate_custom_id", message))
    return rows


def insert_chunk(session: Session, job_id: str, lines: list[ReadLine], options: JobOptions) -> ChunkOutcome:
    """Insert one chunk of read lines as request rows with their audit events (no commit)."""
    valid = [line for line in lines if line.request is not None]
    inserted = _insert_accepted(session, job_id, valid, options)
    rejections = _rejections(session, job_id, lines, inserted)
    rejected_ids = []
    if rejections:
        rejected_ids = list(session.scalars(insert(Request).returning(Request.id), rejections))
    events = [
        {"job_id": job_id, "request_id": request_id, "event": "submitted", "to_state": "queued", "attempt": 0}
        for request_id in inserted.values()
    ] + [
        {"job_id": job_id, "request_id": request_id, "event": "rejected", "to_state": "failed",
         "attempt": 0, "detail": row["error_message"]}
        for request_id, row in zip(rejected_ids, rejections)
    ]
    if events:
        session.execute(insert(AuditEvent), events)
    return ChunkOutcome(queued_request_ids=list(inserted.values()), rejected_lines=len(rejections))


def finish_submission(session: Session, job_id: str, total_lines: int) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(total_lines=total_lines, submitted_at=func.now())
    )
    session.add(AuditEvent(job_id=job_id, event="job_submitted", detail=f"{total_lines} lines"))


@dataclass(frozen=True)
class JobProgress:
    """A row of the job_progress view (README: Polling from SQL)."""

    job_id: str
    status: str
    model: str
    input_file: str
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    dead: int
    cancelled: int
    expired: int
    finished: int
    completed_requests: int
    failed_requests: int
    created_at: datetime
    expires_at: datetime | None
    cancel_requested_at: datetime | None
    last_finished_at: datetime | None
    cache_hits: int

    @property
    def done(self) -> bool:
        """Nothing left to run: the job reached a final status."""
        return self.status in ("completed", "failed", "expired", "cancelled")


PROGRESS_COLUMNS = ", ".join(JobProgress.__dataclass_fields__)


def job_progress(session: Session, job_id: str) -> JobProgress | None:
    row = session.execute(
        text(f"SELECT {PROGRESS_COLUMNS} FROM job_progress WHERE job_id = :job_id"), {"job_id": job_id}
    ).mappings().first()
    return JobProgress(**row) if row else None


def recent_jobs(session: Session, limit: int = 20) -> list[JobProgress]:
    rows = session.execute(
        text(f"SELECT {PROGRESS_COLUMNS} FROM job_progress ORDER BY created_at DESC LIMIT :limit"),
        {"limit": limit},
    ).mappings()
    return [JobProgress(**row) for row in rows]


def export_rows(session: Session, job_id: str, states: Sequence[RequestState]) -> Iterator[RowMapping]:
    """Stream a job's requests in line order with their results, a thousand rows at a time."""
    statement = (
        select(
            Request.id, Request.line_no, Request.custom_id, Request.url, Request.state,
            Request.error_code, Request.error_message, Result.text, Result.finish_reason,
            Result.prompt_tokens, Result.completion_tokens, Result.model, Result.created_at,
        )
        .outerjoin(Result, Result.request_id == Request.id)
        .where(Request.job_id == job_id, Request.state.in_(states))
        .order_by(Request.line_no)
        .execution_options(yield_per=1000)
    )
    yield from session.execute(statement).mappings()


# ---- job-level operations: cancel, expiry, dead letters, lost messages (the CLI's admin SQL) ----
# Request states change only through worker.transitions.move: a guarded UPDATE plus its audit events.


def cancel_job(session: Session, job_id: str, actor: str) -> int | None:
    """Mark the job cancelled and move its queued requests to cancelled; running ones finish.

    Returns how many requests were cancelled, or None if there is no such job.
    """
    from worker.transitions import move

    found = session.execute(update(Job).where(Job.id == job_id)
                            .values(cancel_requested_at=func.coalesce(Job.cancel_requested_at, func.now()))).rowcount
    if not found:
        return None
    reason = "the job was cancelled"
    return len(move(session, Request.job_id == job_id, RequestState.queued, RequestState.cancelled, "cancelled",
                    actor, reason, error_message=reason))


def expire_overdue(session: Session, actor: str) -> int:
    """Queued requests of jobs whose completion window has closed become expired; finished ones stay."""
    from worker.transitions import move

    overdue_jobs = select(Job.id).where(Job.expires_at < func.now())
    reason = "the job's completion window closed before this request ran"
    return len(move(session, Request.job_id.in_(overdue_jobs), RequestState.queued, RequestState.expired, "expired",
                    actor, reason, error_message=reason))


def queued_request_ids(session: Session, queue: str, older_than: timedelta,
                       job_id: str | None = None) -> tuple[list[int], list[int]]:
    """The queue's requests queued and untouched for `older_than`, to re-publish if the broker lost them:
    (suspects, which run alone; the others)."""
    statement = select(Request.id, Request.error_code).where(
        Request.queue == queue, Request.state == RequestState.queued, Request.updated_at < func.now() - older_than,
    ).order_by(Request.priority.desc(), Request.id)
    if job_id is not None:
        statement = statement.where(Request.job_id == job_id)
    suspects, others = [], []
    for request_id, error_code in session.execute(statement):
        (suspects if error_code == "worker_lost" else others).append(request_id)
    return suspects, others


def dead_letters(session: Session, job_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    statement = (
        select(DeadLetter.request_id, DeadLetter.job_id, Request.line_no, Request.custom_id,
               DeadLetter.attempts, DeadLetter.last_error, DeadLetter.created_at)
        .join(Request, Request.id == DeadLetter.request_id)
        .order_by(DeadLetter.created_at).limit(limit)
    )
    if job_id is not None:
        statement = statement.where(DeadLetter.job_id == job_id)
    return [dict(row) for row in session.execute(statement).mappings()]


def requeue_dead(session: Session, queue: str, actor: str, request_ids: Sequence[int] | None = None,
                 job_id: str | None = None) -> list[int]:
    """dead → queued with a fresh set of attempts; the dead-letter record goes, its history stays audited."""
    from worker.transitions import move

    which = Request.queue == queue
    if request_ids is not None:
        which = which & Request.id.in_(request_ids)
    if job_id is not None:
        which = which & (Request.job_id == job_id)
    rows = move(session, which, RequestState.dead, RequestState.queued, "requeued", actor,
                "from the dead-letter queue", attempt=0, retry_after=None)
    requeued = [row.id for row in rows]
    if requeued:
        session.execute(delete(DeadLetter).where(DeadLetter.request_id.in_(requeued)))
    return requeued


def purge_dead_letters(session: Session, job_id: str | None = None) -> int:
    """Forget dead-letter records (the requests stay dead, their history audited)."""
    statement = delete(DeadLetter)
    if job_id is not None:
        statement = statement.where(DeadLetter.job_id == job_id)
    return session.execute(statement).rowcount
