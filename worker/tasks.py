"""The Celery task: a thin adapter. A message carries only a request id; Postgres holds the request,
and `WorkerRuntime.process` does the claim → engine → record (see worker/runtime.py)."""

from __future__ import annotations

from celery.signals import worker_init, worker_shutdown

from worker.app import PROCESS_REQUEST_TASK, celery_app
from worker.runtime import get_runtime, shutdown_runtime


@celery_app.task(name=PROCESS_REQUEST_TASK)
def process_request(request_id: int) -> str:
    return get_runtime().process(request_id)


@worker_init.connect
def load_engine_at_start(**_: object) -> None:
    """Load the model before the first message, so a bad model setting stops the worker at once."""
    get_runtime()


@worker_shutdown.connect
def stop_engine(**_: object) -> None:
    shutdown_runtime()
