"""Batches of the Batch API: jobs as OpenAI's batch object shows them, listed and looked up per key.

A batch is a job: one the CLI submitted is a batch too (with auth off, or to the key that owns it), and
the `job_progress` view supplies status and counts, so API, CLI and SQL agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from producer import queries
from producer.api.pages import newest_first
from schema.tables import Job

CHAT_ENDPOINT, COMPLETIONS_ENDPOINT = "/v1/chat/completions", "/v1/completions"
ENDPOINTS = (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT)


def owned_job(session: Session, job_id: str, owner_key_id: str | None) -> Job | None:
    query = select(Job).where(Job.id == job_id)
    if owner_key_id is not None:
        query = query.where(Job.owner_key_id == owner_key_id)
    return session.scalar(query)


def list_jobs(session: Session, owner_key_id: str | None, limit: int, after: str | None) -> list[Job]:
    """Newest first; `after` is the id of the last batch of the previous page."""
    owned = select(Job)
    if owner_key_id is not None:
        owned = owned.where(Job.owner_key_id == owner_key_id)
    return newest_first(session, owned, owned, Job, limit, after)


def progress_of(session: Session, job_id: str) -> queries.JobProgress:
    progress = queries.job_progress(session, job_id)
    assert progress is not None  # the job row exists: the view has it
    return progress


def timestamp(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def completion_window(job: Job) -> str:
    if job.expires_at is None:
        return "24h"
    return f"{round((job.expires_at - job.created_at).total_seconds() / 3600)}h"


def batch_object(job: Job, progress: queries.JobProgress, output_file_id: str | None, error_file_id: str | None,
                 errors: list[queries.FailedLines] | None = None) -> dict[str, Any]:
    """A job as OpenAI's batch object, with its fields and their meanings."""
    status = progress.status
    ended = timestamp(progress.last_finished_at or job.submitted_at or job.created_at)
    return {
        "id": job.id, "object": "batch", "endpoint": job.endpoint or CHAT_ENDPOINT,
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
        "request_counts": {"total": progress.total, "completed": progress.completed_requests,
                           "failed": progress.failed_requests},
        "metadata": job.metadata_json or None,
        "model": job.model,
    }

