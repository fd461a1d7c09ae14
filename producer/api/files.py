"""Files of the Batch API: uploads stored on disk, and the output and error files of finished batches.

An upload streams to disk in chunks, counted and limited as it goes; its row says what the API reports.
A batch's output and error files are written once the batch is over (completed, failed, expired or
cancelled — partial then), from the same export `deepbatch results` uses; their ids derive from the
batch's, so any server process finds or makes them, and a second writer only rewrites the same bytes.
Their rows keep the fingerprint of the results they were written from (counts by state and the last
change): a requeue, a retry or a late success changes it, and the next look at the batch rewrites them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from producer import queries
from producer.api.pages import newest_first
from producer.export import write_errors, write_results
from producer.queries import JobProgress
from schema.tables import AuditEvent, Job, StoredFile

CHUNK_BYTES = 1 << 20
BATCH_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"


class FileTooLarge(ValueError):
    pass


@dataclass(frozen=True)
class Upload:
    id: str
    bytes: int
    lines: int


async def store_upload(chunks: AsyncIterator[bytes], directory: Path, max_bytes: int, max_lines: int) -> Upload:
    """Write an upload to `directory` under a new file id, counting bytes and lines; over a limit, nothing
    is kept and FileTooLarge names the limit."""
    directory.mkdir(parents=True, exist_ok=True)
    file_id = f"file-{uuid.uuid4().hex}"
    partial = directory / f"{file_id}.partial"
    size = newlines = 0
    last = b"\n"
    try:
        with partial.open("wb") as stream:
            async for chunk in chunks:
                size, newlines = size + len(chunk), newlines + chunk.count(b"\n")
                check_limits(size, newlines, max_bytes, max_lines)
                stream.write(chunk)
                last = chunk[-1:] or last
        lines = newlines + (last != b"\n")  # a last line without its newline is a line too
        check_limits(size, lines, max_bytes, max_lines)
        os.replace(partial, directory / file_id)
    finally:
        partial.unlink(missing_ok=True)
    return Upload(file_id, size, lines)


def check_limits(size: int, lines: int, max_bytes: int, max_lines: int) -> None:
    if size > max_bytes:
        raise FileTooLarge(f"the file is larger than {max_bytes} bytes (DEEPBATCH_API_MAX_FILE_BYTES)")
    if lines > max_lines:
        raise FileTooLarge(f"the file has more than {max_lines} lines (DEEPBATCH_API_MAX_FILE_LINES)")


def file_object(row: StoredFile) -> dict[str, Any]:
    """A file as OpenAI's API shows it."""
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": int(row.created_at.timestamp()),
            "filename": row.filename, "purpose": row.purpose, "status": "processed", "status_details": None}


def record_upload(session: Session, upload: Upload, filename: str, owner_key_id: str | None) -> StoredFile:
    row = StoredFile(id=upload.id, owner_key_id=owner_key_id, filename=filename, purpose=BATCH_PURPOSE,
                     bytes=upload.bytes, lines=upload.lines)
    session.add(row)
    session.add(AuditEvent(job_id=upload.id, event="file_uploaded", worker=owner_key_id,
                           detail=f"{filename}: {upload.bytes} bytes, {upload.lines} lines"))
    session.flush()
    session.refresh(row)
    return row


def owned_file(session: Session, file_id: str, owner_key_id: str | None) -> StoredFile | None:
    """The file, if it exists, is not deleted and belongs to this key (with auth off: any file)."""
    query = select(StoredFile).where(StoredFile.id == file_id, StoredFile.deleted_at.is_(None))
    if owner_key_id is not None:
        query = query.where(StoredFile.owner_key_id == owner_key_id)
    return session.scalar(query)


def list_files(session: Session, owner_key_id: str | None, purpose: str | None, limit: int,
               after: str | None) -> list[StoredFile]:
    owned = select(StoredFile)
    if owner_key_id is not None:
        owned = owned.where(StoredFile.owner_key_id == owner_key_id)
    listed = owned.where(StoredFile.deleted_at.is_(None))
    if purpose:
        listed = listed.where(StoredFile.purpose == purpose)
    return newest_first(session, listed, owned, StoredFile, limit, after)


def delete_file(session: Session, row: StoredFile, directory: Path, actor: str | None) -> None:
    session.execute(update(StoredFile).where(StoredFile.id == row.id).values(deleted_at=func.now()))
    session.add(AuditEvent(job_id=row.id, event="file_deleted", worker=actor))
    (directory / row.id).unlink(missing_ok=True)


def output_file_ids(job_id: str) -> tuple[str, str]:
    """The ids of a batch's output and error files."""
    stem = job_id.removeprefix("batch_")
    return f"file-{stem}-output", f"file-{stem}-errors"


def batch_of_output_file(file_id: str) -> str:
    """The id of the batch whose output or error file this is (output_file_ids, reversed)."""
    return "batch_" + file_id.removeprefix("file-").rsplit("-", 1)[0]


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
    return write_batch_files(session, job.id, job.owner_key_id, directory, results_fingerprint(progress))


def write_batch_files(session: Session, job_id: str, owner_key_id: str | None, directory: Path,
                      fingerprint: str) -> tuple[str, str | None]:
    """Write the batch's output and error files unless those stored were written from `fingerprint`; a file
    its owner deleted stays deleted."""
    output_id, errors_id = output_file_ids(job_id)
    stored = {row.id: row for row in session.scalars(
        select(StoredFile).where(StoredFile.id.in_((output_id, errors_id))).execution_options(populate_existing=True))}
    if output_id not in stored or stored[output_id].results_fingerprint != fingerprint:
        directory.mkdir(parents=True, exist_ok=True)
        for file_id, writer in ((output_id, write_results), (errors_id, write_errors)):
            if file_id not in stored or stored[file_id].deleted_at is None:
                write_batch_file(session, job_id, file_id, writer, owner_key_id, directory, fingerprint)
    has_errors = session.scalar(select(func.count()).select_from(StoredFile).where(StoredFile.id == errors_id))
    return output_id, errors_id if has_errors else None


def write_batch_file(session: Session, job_id: str, file_id: str, writer: Callable[[Session, str, IO[str]], int],
                     owner_key_id: str | None, directory: Path, fingerprint: str) -> None:
    """Write one of a batch's files in place of the one stored (an error file without lines is removed)."""
    partial = directory / f"{file_id}.{uuid.uuid4().hex}.partial"
    try:
        with partial.open("w", encoding="utf-8") as stream:
            lines = writer(session, job_id, stream)
        if lines == 0 and writer is write_errors:
            session.execute(delete(StoredFile).where(StoredFile.id == file_id))
            (directory / file_id).unlink(missing_ok=True)
            return
        os.replace(partial, directory / file_id)
    finally:
        partial.unlink(missing_ok=True)
    size = (directory / file_id).stat().st_size
    row = dict(bytes=size, lines=lines, results_fingerprint=fingerprint)
    session.execute(insert(StoredFile).values(
        id=file_id, owner_key_id=owner_key_id, filename=f"{job_id}_{file_id.rsplit('-', 1)[1]}.jsonl",
        purpose=OUTPUT_PURPOSE, **row).on_conflict_do_update(index_elements=[StoredFile.id], set_=row))


def refresh_batch_file(session: Session, row: StoredFile, directory: Path) -> None:
    """Before a batch's output or error file is read: rewrite it if the batch's results changed."""
    if row.purpose == OUTPUT_PURPOSE and (job := session.get(Job, batch_of_output_file(row.id))) is not None:
        if (progress := queries.job_progress(session, job.id)) is not None:
            batch_files(session, job, progress, directory)
