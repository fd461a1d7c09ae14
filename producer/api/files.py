"""/v1/files of the Batch API: uploads streamed to disk, and listing, reading and deleting the caller's files.

An upload streams to disk in chunks, counted and limited as it goes; over a limit, or with a name that
cannot be stored, nothing is kept. Its row says what the API reports. A batch's output and error files
are files too (outputs.py writes them); reading one brings it up to date first.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from producer.api import outputs, store
from producer.api.auth import Caller
from producer.api.dependencies import Db, FilesDirectory, ServerSettings
from producer.api.errors import ApiError, not_found
from producer.api.inputs import check_storable
from producer.api.pages import list_object
from schema.tables import StoredFile

CHUNK_BYTES = 1 << 20
BATCH_PURPOSE = "batch"

router = APIRouter(prefix="/v1/files")


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


def owned_file(file_id: str, owner: Caller, session: Db) -> StoredFile:
    """The caller's file named in the path; a 404 for another key's, a deleted one and one that never was."""
    if (row := store.owned_file(session, file_id, owner)) is None:
        raise not_found("file", file_id)
    return row


OwnedFile = Annotated[StoredFile, Depends(owned_file)]


def readable_file(session: Session, file_id: str, owner: str | None, directory: Path) -> StoredFile | None:
    """The caller's file, a batch's output or error file brought up to date first (outputs.py)."""
    outputs.refresh_batch_file(session, file_id, owner, directory)
    session.commit()
    return store.owned_file(session, file_id, owner)


def content_response(row: StoredFile, directory: Path) -> FileResponse | None:
    """The file's content as a download; None when it is missing from the disk."""
    path = directory / row.id
    return FileResponse(path, media_type="application/jsonl", filename=row.filename) if path.is_file() else None


def record_upload(session: Session, upload: Upload, filename: str, owner: str | None) -> dict[str, Any]:
    row = StoredFile(id=upload.id, owner_key_id=owner, filename=filename, purpose=BATCH_PURPOSE,
                     bytes=upload.bytes, lines=upload.lines)
    created = file_object(store.insert_file(session, row))
    session.commit()
    return created


@router.post("")
async def upload_file(owner: Caller, session: Db, settings: ServerSettings, directory: FilesDirectory,
                      file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> dict[str, Any]:
    if purpose != BATCH_PURPOSE:
        raise ApiError(400, f"purpose {purpose[:40]!r} is not supported; DeepBatch takes 'batch' files",
                       param="purpose")
    filename = check_storable(file.filename or "", "filename")  # before anything is written

    async def chunks():
        while chunk := await file.read(CHUNK_BYTES):
            yield chunk

    try:
        upload = await store_upload(chunks(), directory, settings.api_max_file_bytes, settings.api_max_file_lines)
    except FileTooLarge as error:
        raise ApiError(413 if "bytes" in str(error) else 400, str(error), param="file") from None
    try:
        # In the event loop, as one short insert: a thread could still commit the row after a cancelled
        # request had removed the file.
        return record_upload(session, upload, filename or upload.id, owner)
    except BaseException:
        (directory / upload.id).unlink(missing_ok=True)  # no row, no file
        raise


@router.get("")
def list_files(owner: Caller, session: Db, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000, after: str | None = None) -> dict[str, Any]:
    rows = store.list_files(session, owner, purpose, limit + 1, after)
    return list_object([file_object(row) for row in rows[:limit]], len(rows) > limit)


@router.get("/{file_id}")
def retrieve_file(row: OwnedFile) -> dict[str, Any]:
    return file_object(row)


@router.get("/{file_id}/content")
def file_content(owner: Caller, session: Db, directory: FilesDirectory, file_id: str) -> FileResponse:
    if (row := readable_file(session, file_id, owner, directory)) is None:
        raise not_found("file", file_id)
    if (response := content_response(row, directory)) is None:
        raise ApiError(404, f"The content of file '{file_id}' is missing from {directory}", code="not_found")
    return response


@router.delete("/{file_id}")
def delete_file(row: OwnedFile, owner: Caller, session: Db, directory: FilesDirectory) -> dict[str, Any]:
    store.mark_file_deleted(session, row.id, owner)
    session.commit()
    (directory / row.id).unlink(missing_ok=True)
    return {"id": row.id, "object": "file", "deleted": True}
