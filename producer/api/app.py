"""`deepbatch serve`: OpenAI's Batch API (files and batches) over DeepBatch's jobs, and the job dashboard.

Stateless: files live in DEEPBATCH_FILES_DIR, everything else in PostgreSQL, so any number of server
processes can serve the same batches. Errors take OpenAI's shape (`{"error": {"message", "type", "param",
"code"}}`) and status codes, so OpenAI's clients report them as they would OpenAI's own; a bad input is
a 4xx whatever it holds (inputs.py), and a refused upload leaves nothing on disk.
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException

from producer import queries
from producer.api import batches, files, keys
from producer.api.auth import ApiError, Caller
from producer.api.browsers import BrowserGuard
from producer.api.inputs import CreateBatch, check_storable, storable_parameters, unstorable_reason
from producer.api.pages import list_object
from producer.submit import parse_duration, submit_file
from schema.db import session_factory
from schema.settings import Settings
from schema.tables import Job


def not_found(what: str, identifier: str) -> ApiError:
    return ApiError(404, f"No such {what}: {identifier!r}", code="not_found", param="id")


def parse_window(window: str) -> timedelta:
    try:
        return parse_duration(window)
    except ValueError as error:
        raise ApiError(400, f"completion_window: {error}", param="completion_window") from None


def error_location(location: tuple) -> str | None:
    """Where in the request a validation error is (`metadata.<key>`), spelled so any key can be shown."""
    parts = [part if isinstance(part, str) and not unstorable_reason(part) and len(part) <= 64 else ascii(part)[:64]
             for part in location[1:]]
    return ".".join(str(part) for part in parts) or None


def create_app(settings: Settings) -> FastAPI:
    from worker.app import make_celery_app

    app = FastAPI(title="DeepBatch", docs_url=None, redoc_url=None, dependencies=[Depends(storable_parameters)])
    app.add_middleware(BrowserGuard)
    sessions: sessionmaker[Session] = session_factory(settings.sqlalchemy_url)
    app.state.settings, app.state.sessions = settings, sessions
    celery_app = make_celery_app(settings)
    directory = settings.stored_files_dir

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        problem = error.errors()[0]
        param = error_location(problem["loc"])
        return ApiError(400, f"{param}: {problem['msg']}" if param else problem["msg"], param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        """Starlette's own answers (no such route, a body that is not JSON) in OpenAI's shape too."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return ApiError(error.status_code, str(error.detail), code=code, headers=error.headers).response()

    @app.post("/v1/files")
    async def upload_file(owner: Caller, file: Annotated[UploadFile, File()],
                          purpose: Annotated[str, Form()]) -> dict[str, Any]:
        if purpose != files.BATCH_PURPOSE:
            raise ApiError(400, f"purpose {purpose[:40]!r} is not supported; DeepBatch takes 'batch' files",
                           param="purpose")
        filename = check_storable(file.filename or "", "filename")  # before anything is written

        async def chunks():
            while chunk := await file.read(files.CHUNK_BYTES):
                yield chunk

        try:
            upload = await files.store_upload(chunks(), directory, settings.api_max_file_bytes,
                                              settings.api_max_file_lines)
        except files.FileTooLarge as error:
            raise ApiError(413 if "bytes" in str(error) else 400, str(error), param="file") from None
        try:
            with sessions.begin() as session:
                return files.file_object(files.record_upload(session, upload, filename or upload.id, owner))
        except BaseException:
            (directory / upload.id).unlink(missing_ok=True)  # no row, no file
            raise

    @app.get("/v1/files")
    def list_files(owner: Caller, purpose: str | None = None, limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
                   after: str | None = None) -> dict[str, Any]:
        with sessions() as session:
            rows = files.list_files(session, owner, purpose, limit + 1, after)
        return list_object([files.file_object(row) for row in rows[:limit]], len(rows) > limit)

    def file_row(session: Session, file_id: str, owner: str | None):
        row = files.owned_file(session, file_id, owner)
        if row is None:
            raise not_found("file", file_id)
        return row

    @app.get("/v1/files/{file_id}")
    def retrieve_file(owner: Caller, file_id: str) -> dict[str, Any]:
        with sessions() as session:
            return files.file_object(file_row(session, file_id, owner))

    @app.get("/v1/files/{file_id}/content")
    def file_content(owner: Caller, file_id: str) -> FileResponse:
        with sessions.begin() as session:
            files.refresh_batch_file(session, file_row(session, file_id, owner), directory)
        with sessions() as session:
            row = file_row(session, file_id, owner)
        path = directory / row.id
        if not path.is_file():
            raise ApiError(404, f"The content of file '{file_id}' is missing from {directory}", code="not_found")
        return FileResponse(path, media_type="application/jsonl", filename=row.filename)

    @app.delete("/v1/files/{file_id}")
    def delete_file(owner: Caller, file_id: str) -> dict[str, Any]:
        with sessions.begin() as session:
            files.delete_file(session, file_row(session, file_id, owner), directory, owner)
        return {"id": file_id, "object": "file", "deleted": True}

    def batch_response(session: Session, job) -> dict[str, Any]:
        progress = batches.progress_of(session, job.id)
        output_id, error_id = files.batch_files(session, job, progress, directory)
        errors = queries.failed_lines(session, job.id)[:10] if progress.status == "failed" else None
        return batches.batch_object(job, progress, output_id, error_id, errors)

    @app.post("/v1/batches")
    def create_batch(owner: Caller, body: CreateBatch) -> dict[str, Any]:
        if body.endpoint not in batches.ENDPOINTS:
            raise ApiError(400, f"endpoint {body.endpoint!r} is not supported; DeepBatch runs "
                           f"{' and '.join(batches.ENDPOINTS)}", param="endpoint")
        window = parse_window(body.completion_window)
        with sessions() as session:
            input_file = file_row(session, body.input_file_id, owner)
            if input_file.purpose != files.BATCH_PURPOSE:
                raise ApiError(400, f"file '{input_file.id}' has purpose {input_file.purpose!r}, not 'batch'",
                               param="input_file_id")
        origin = queries.ApiOrigin(owner, input_file.id, body.endpoint)
        try:
            with keys.queued_lines_lock(sessions, owner) if owner is not None else nullcontext(0) as waiting:
                if owner is not None and waiting + input_file.lines > settings.api_max_queued_lines:
                    raise ApiError(429, f"{owner} has {waiting} requests queued or running; {input_file.lines} "
                                   f"more would pass its limit of {settings.api_max_queued_lines} "
                                   "(DEEPBATCH_API_MAX_QUEUED_LINES)", code="queued_lines_limit_exceeded",
                                   kind="tokens", headers={"retry-after": "60"})
                job_id = submit_file(directory / input_file.id, settings, sessions, celery_app,
                                     completion_window=window, metadata=body.metadata, origin=origin)
        except keys.KeyBusy as error:
            raise ApiError(429, f"{error}; try again", code="key_busy", kind="requests",
                           headers={"retry-after": "5"}) from None
        with sessions.begin() as session:
            return batch_response(session, session.get(Job, job_id))

    def job_row(session: Session, batch_id: str, owner: str | None):
        job = batches.owned_job(session, batch_id, owner)
        if job is None:
            raise not_found("batch", batch_id)
        return job

    @app.get("/v1/batches/{batch_id}")
    def retrieve_batch(owner: Caller, batch_id: str) -> dict[str, Any]:
        with sessions.begin() as session:
            return batch_response(session, job_row(session, batch_id, owner))

    @app.get("/v1/batches")
    def list_batches(owner: Caller, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                     after: str | None = None) -> dict[str, Any]:
        with sessions.begin() as session:
            jobs = batches.list_jobs(session, owner, limit + 1, after)
            return list_object([batch_response(session, job) for job in jobs[:limit]], len(jobs) > limit)

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(owner: Caller, batch_id: str) -> dict[str, Any]:
        with sessions.begin() as session:
            job = job_row(session, batch_id, owner)
            queries.cancel_job(session, job.id, actor=f"api:{owner}")
        with sessions.begin() as session:
            return batch_response(session, job_row(session, batch_id, owner))

    from producer.api.dashboard import add_dashboard

    add_dashboard(app, settings, sessions)
    return app

