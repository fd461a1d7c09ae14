"""Files of the Batch API: uploads stored on disk, and the output and error files of finished batches.

An upload streams to disk in chunks, counted and limited as it goes; its row says what the API reports.
A batch's output and error files are written once the batch is over (completed, failed, expired or
cancelled — partial then), from the same export `deepbatch results` uses; their ids derive from the
batch's, so any server process finds or makes them, and a second writer only rewrites the same bytes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from producer.api.pages import newest_first
from producer.export import write_errors, write_results
from schema.tables import AuditEvent, StoredFile

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
    size = lines = 0
    last = b"\n"
    try:
        with partial.open("wb") as stream:
            async for chunk in chunks:
                size += len(chunk)
                lines += chunk.count(b"\n")
                if size > max_bytes:
                    raise FileTooLarge(f"the file is larger than {max_bytes} bytes (DEEPBATCH_API_MAX_FILE_BYTES)")
                if lines > max_lines:
                    raise FileTooLarge(f"the file has more than {max_lines} lines (DEEPBATCH_API_MAX_FILE_LINES)")
                stream.write(chunk)
                last = chunk[-1:] or last
        os.replace(partial, directory / file_id)
    finally:
        partial.unlink(missing_ok=True)
    return Upload(file_id, size, lines + (last != b"\n"))


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
    query = select(StoredFile).where(StoredFile.deleted_at.is_(None))
    if owner_key_id is not None:
        query = query.where(StoredFile.owner_key_id == owner_key_id)
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    return newest_first(session, query, StoredFile, limit, after)


def delete_file(session: Session, row: StoredFile, directory: Path, actor: str | None) -> None:
    session.execute(update(StoredFile).where(StoredFile.id == row.id).values(deleted_at=func.now()))
    session.add(AuditEvent(job_id=row.id, event="file_deleted", worker=actor))
    (directory / row.id).unlink(missing_ok=True)


def output_file_ids(job_id: str) -> tuple[str, str]:
    """The ids of a batch's output and error files."""
    stem = job_id.removeprefix("batch_")
    return f"file-{stem}-output", f"file-{stem}-errors"


def write_batch_files(session: Session, job_id: str, owner_key_id: str | None, directory: Path) -> tuple[str, str | None]:
    """Write (or find) a finished batch's output and error files; returns their ids, the error file's
    None when no request failed (as OpenAI gives it)."""
    output_id, errors_id = output_file_ids(job_id)
    if session.get(StoredFile, output_id) is not None:
        return output_id, errors_id if session.get(StoredFile, errors_id) is not None else None
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for file_id, writer in ((output_id, write_results), (errors_id, write_errors)):
        partial = directory / f"{file_id}.{uuid.uuid4().hex}.partial"
        with partial.open("w", encoding="utf-8") as stream:
            lines = writer(session, job_id, stream)
        if file_id == errors_id and lines == 0:
            partial.unlink()
            continue
        os.replace(partial, directory / file_id)
        written[file_id] = (lines, (directory / file_id).stat().st_size)
    for file_id, (lines, size) in written.items():
        session.execute(insert(StoredFile).values(
            id=file_id, owner_key_id=owner_key_id, filename=f"{job_id}_{file_id.rsplit('-', 1)[1]}.jsonl",
            purpose=OUTPUT_PURPOSE, bytes=size, lines=lines).on_conflict_do_nothing())
    return output_id, errors_id if errors_id in written else None
