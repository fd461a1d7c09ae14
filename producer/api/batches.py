"""/v1/batches of the Batch API: a batch is a job, created from an uploaded file and shown as OpenAI's batch
object.

A job the CLI submitted is a batch too (with auth off, or to the key that owns it), and the `job_progress`
view supplies status and counts, so API, CLI and SQL agree. A key's requests queued or running across its
batches are limited (DEEPBATCH_API_MAX_QUEUED_LINES), checked under a lock of the key's so that concurrent
creates on any number of servers cannot pass it together.
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from producer import queries
from producer.api import keys, outputs, store
from producer.api.auth import Caller
from producer.api.dependencies import CeleryApp, Db, FilesDirectory, ServerSettings, Sessions
from producer.api.errors import ApiError, not_found
from producer.api.files import BATCH_PURPOSE, owned_file
from producer.api.inputs import CreateBatch
from producer.api.pages import list_object
from producer.submit import parse_duration, submit_file
from schema.lines import CHAT_URL, COMPLETIONS_URL
from schema.tables import Job, StoredFile

ENDPOINTS = (CHAT_URL, COMPLETIONS_URL)
ERRORS_SHOWN = 10  # a failed batch's `errors`: its most frequent reasons

router = APIRouter(prefix="/v1/batches")


def timestamp(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def completion_window(job: Job) -> str:
    if job.expires_at is None:
        return "24h"
    return f"{round((job.expires_at - job.created_at).total_seconds() / 3600)}h"


def batch_object(job: Job, progress: queries.JobProgress, output_file_id: str | None, error_file_id: str | None,
                 errors: list[queries.FailedLines] | None = None, usage: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """A job as OpenAI's batch object, with its fields and their meanings; `usage`: its results' (input,
    output) tokens."""
    status = progress.status
    ended = timestamp(progress.last_finished_at or job.submitted_at or job.created_at)
    return {
        "id": job.id, "object": "batch", "endpoint": job.endpoint or CHAT_URL,
        "errors": {"object": "list", "data": [
            {"code": error.code, "message": error.first_message, "param": None, "line": error.first_line}
            for error in errors]} if errors else None,
        "input_file_id": job.input_file_id or job.input_file, "completion_window": completion_window(job),
        "status": status, "output_file_id": output_file_id, "error_file_id": error_file_id,
        "created_at": timestamp(job.created_at), "in_progress_at": timestamp(job.submitted_at),
        "expires_at": timestamp(job.expires_at), "finalizing_at": None,
        "completed_at": ended if status == "completed" else None,
        "failed_at": ended if status == "failed" else None,
        "expired_at": ended if status == "expired" else None,
        "cancelling_at": timestamp(job.cancel_requested_at),
        "cancelled_at": ended if status == "cancelled" else None,
        # As OpenAI counts them: a request the batch never ran (cancelled, expired) is failed, in the error
        # file as batch_cancelled / batch_expired, so completed + failed = total once the batch has ended.
        "request_counts": {"total": progress.total, "completed": progress.completed_requests,
                           "failed": progress.failed_requests + progress.cancelled + progress.expired},
        "usage": {"input_tokens": usage[0], "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": usage[1], "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": usage[0] + usage[1]},
        "metadata": job.metadata_json or None,
        "model": job.model,
    }


def batch_response(session: Session, job: Job, directory: Path) -> dict[str, Any]:
    """The batch object of `job`, its output and error files written if it has ended (then committed)."""
    progress = queries.job_progress(session, job.id)
    assert progress is not None  # the job row exists: the view has it
    output_id, error_id = outputs.batch_files(session, job, progress, directory)
    errors = queries.failed_lines(session, job.id)[:ERRORS_SHOWN] if progress.status == "failed" else None
    usage = store.batch_usage(session, job.id)
    session.commit()
    return batch_object(job, progress, output_id, error_id, errors, usage)


def owned_batch(batch_id: str, owner: Caller, session: Db) -> Job:
    """The caller's batch named in the path; a 404 for another key's and one that never was."""
    if (job := store.owned_job(session, batch_id, owner)) is None:
        raise not_found("batch", batch_id)
    return job


OwnedBatch = Annotated[Job, Depends(owned_batch)]


def cancel(session: Session, batch_id: str, owner: str | None, actor: str) -> Job | None:
    """Cancel the caller's batch (queued requests cancelled, running ones finish) and commit; None when the
    caller has no such batch."""
    if store.owned_job(session, batch_id, owner) is None:
        return None
    queries.cancel_job(session, batch_id, actor=actor)
    session.commit()
    return store.owned_job(session, batch_id, owner)  # as cancelling left it


def parse_window(window: str) -> timedelta:
    try:
        return parse_duration(window)
    except ValueError as error:
        raise ApiError(400, f"completion_window: {error}", param="completion_window") from None


def check_creatable(body: CreateBatch, owner: str | None, session: Session) -> tuple[timedelta, StoredFile]:
    """The batch's completion window and input file, if a batch can be made of them; a 400 or 404 if not."""
    if body.endpoint not in ENDPOINTS:
        raise ApiError(400, f"endpoint {body.endpoint!r} is not supported; DeepBatch runs "
                       f"{' and '.join(ENDPOINTS)}", param="endpoint")
    window = parse_window(body.completion_window)
    input_file = owned_file(body.input_file_id, owner, session)
    session.commit()  # no transaction held while this create waits for its key's lock
    if input_file.purpose != BATCH_PURPOSE:
        raise ApiError(400, f"file '{input_file.id}' has purpose {input_file.purpose!r}, not 'batch'",
                       param="input_file_id")
    return window, input_file


def queued_lines_refusal(owner: str, waiting: int, lines: int, limit: int) -> ApiError:
    return ApiError(429, f"{owner} has {waiting} requests queued or running; {lines} more would pass its limit "
                    f"of {limit} (DEEPBATCH_API_MAX_QUEUED_LINES)", code="queued_lines_limit_exceeded",
                    kind="tokens", headers={"retry-after": "60"})


@router.post("")
def create_batch(owner: Caller, body: CreateBatch, session: Db, sessions: Sessions, settings: ServerSettings,
                 celery_app: CeleryApp, directory: FilesDirectory) -> dict[str, Any]:
    window, input_file = check_creatable(body, owner, session)
    origin = queries.ApiOrigin(owner, input_file.id, body.endpoint)
    try:
        with keys.queued_lines_lock(sessions, owner) if owner is not None else nullcontext(0) as waiting:
            if owner is not None and waiting + input_file.lines > settings.api_max_queued_lines:
                raise queued_lines_refusal(owner, waiting, input_file.lines, settings.api_max_queued_lines)
            job_id = submit_file(directory / input_file.id, settings, sessions, celery_app,
                                 completion_window=window, metadata=body.metadata, origin=origin)
    except keys.KeyBusy as error:
        raise ApiError(429, f"{error}; try again", code="key_busy", kind="requests",
                       headers={"retry-after": "5"}) from None
    return batch_response(session, session.get(Job, job_id), directory)


@router.get("/{batch_id}")
def retrieve_batch(job: OwnedBatch, session: Db, directory: FilesDirectory) -> dict[str, Any]:
    return batch_response(session, job, directory)


@router.get("")
def list_batches(owner: Caller, session: Db, directory: FilesDirectory,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None) -> dict[str, Any]:
    jobs = store.list_jobs(session, owner, limit + 1, after)
    return list_object([batch_response(session, job, directory) for job in jobs[:limit]], len(jobs) > limit)


@router.post("/{batch_id}/cancel")
def cancel_batch(owner: Caller, session: Db, directory: FilesDirectory, batch_id: str) -> dict[str, Any]:
    if (job := cancel(session, batch_id, owner, actor=f"api:{owner}")) is None:
        raise not_found("batch", batch_id)
    return batch_response(session, job, directory)
