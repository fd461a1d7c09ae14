"""The output and error files of a batch: written once the batch is over (completed, failed, expired or
cancelled — partial then), from the same export `deepbatch results` uses.

Their ids derive from the batch's, so any server process finds or makes them, and a second writer only
rewrites the same bytes. Their rows keep the fingerprint of the results they were written from (counts by
state and the last change): a requeue, a retry or a late success changes it, and the next look at the
batch or read of a file rewrites them. A file its owner deleted stays deleted.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from sqlalchemy.orm import Session

from producer import queries
from producer.api import store
from producer.export import write_errors, write_results
from producer.queries import JobProgress
from schema.tables import Job

OUTPUT_PURPOSE = "batch_output"


def output_file_ids(job_id: str) -> tuple[str, str]:
    """The ids of a batch's output and error files."""
    stem = job_id.removeprefix("batch_")
    return f"file-{stem}-output", f"file-{stem}-errors"


def batch_of_output_file(file_id: str) -> str | None:
    """The id of the batch whose output or error file this is (output_file_ids, reversed); None for an id
    that is no such file's."""
    stem, _, kind = file_id.removeprefix("file-").rpartition("-")
    return f"batch_{stem}" if file_id.startswith("file-") and stem and kind in ("output", "errors") else None


def results_fingerprint(progress: JobProgress) -> str:
    """What a batch's output and error files are written from: its counts of finished requests by state
    and the time of the last change to one."""
    last_change = progress.last_finished_at.isoformat() if progress.last_finished_at else "-"
    return (f"{progress.succeeded} succeeded, {progress.failed} failed, {progress.dead} dead, "
            f"{progress.cancelled} cancelled, {progress.expired} expired, last at {last_change}")


def batch_files(session: Session, job: Job, progress: JobProgress, directory: Path) -> tuple[str | None, str | None]:
    """The ids of a batch's output and error files: none while it runs; once it has ended, written — or
    rewritten, if its results changed since they were — with the error file's None when no request
    failed (as OpenAI gives it)."""
    if not progress.done:
        return None, None
    output_id, errors_id = output_file_ids(job.id)
    stored = store.stored_files(session, (output_id, errors_id))
    present = set(stored)  # deleted ones too: a batch's error file deleted by its owner is still named
    fingerprint = results_fingerprint(progress)
    if output_id not in stored or stored[output_id].results_fingerprint != fingerprint:
        directory.mkdir(parents=True, exist_ok=True)
        for file_id, writer in ((output_id, write_results), (errors_id, write_errors)):
            if file_id not in stored or stored[file_id].deleted_at is None:
                written = write_batch_file(session, job, file_id, writer, directory, fingerprint)
                (present.add if written else present.discard)(file_id)
    return output_id, errors_id if errors_id in present else None


def write_batch_file(session: Session, job: Job, file_id: str, writer: Callable[[Session, str, IO[bytes]], int],
                     directory: Path, fingerprint: str) -> bool:
    """Write one of a batch's files in place of the one stored; an error file without lines is removed
    (returns False)."""
    partial = directory / f"{file_id}.{uuid.uuid4().hex}.partial"
    try:
        with partial.open("wb") as stream:
            lines = writer(session, job.id, stream)
        if lines == 0 and writer is write_errors:
            store.forget_file(session, file_id)
            (directory / file_id).unlink(missing_ok=True)
            return False
        os.replace(partial, directory / file_id)
    finally:
        partial.unlink(missing_ok=True)
    filename = f"{job.id}_{file_id.rsplit('-', 1)[1]}.jsonl"
    store.upsert_batch_file(session, file_id, job.owner_key_id, filename, OUTPUT_PURPOSE,
                            (directory / file_id).stat().st_size, lines, fingerprint)
    return True


def refresh_batch_file(session: Session, file_id: str, owner_key_id: str | None, directory: Path) -> None:
    """Before a batch's output or error file is read: write it if the batch ended since, rewrite it if the
    batch's results changed. Only the caller's own batches are looked at."""
    if (job_id := batch_of_output_file(file_id)) is None:
        return
    if (job := store.owned_job(session, job_id, owner_key_id)) is not None:
        if (progress := queries.job_progress(session, job.id)) is not None:
            batch_files(session, job, progress, directory)
