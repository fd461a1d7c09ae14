"""`deepbatch serve`: OpenAI's Batch API (files and batches) over DeepBatch's jobs, and the job dashboard.

Stateless: files live in DEEPBATCH_FILES_DIR, everything else in PostgreSQL, so any number of server
processes can serve the same batches. A router per resource (files.py, batches.py, dashboard.py); every
route gets its caller's key, rate-limited (auth.py), and a database session (dependencies.py). Errors
take OpenAI's shape and status codes (errors.py); a bad input is a 4xx whatever it holds (inputs.py), and
a refused upload leaves nothing on disk.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from producer.api import batches, dashboard, errors, files, inputs
from producer.api.browsers import BrowserGuard
from schema.db import session_factory
from schema.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    from worker.app import make_celery_app  # the producer publishes through the worker's Celery app

    app = FastAPI(title="DeepBatch", docs_url=None, redoc_url=None,
                  dependencies=[Depends(inputs.storable_parameters)])
    app.add_middleware(BrowserGuard)
    app.add_exception_handler(errors.ApiError, errors.api_error)
    app.add_exception_handler(RequestValidationError, inputs.invalid_request)
    app.add_exception_handler(HTTPException, errors.http_error)
    app.state.settings = settings
    app.state.sessions = session_factory(settings.sqlalchemy_url)
    app.state.celery = make_celery_app(settings)
    for router in (files.router, batches.router, dashboard.router):
        app.include_router(router)
    return app
