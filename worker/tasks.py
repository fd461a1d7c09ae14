"""The Celery task: a thin adapter. A message carries a slice of request ids; Postgres holds the requests,
and the feeder (worker/feeder.py) claims, generates and records them."""

from __future__ import annotations

from celery import shared_task
from celery.signals import worker_init, worker_shutdown, worker_shutting_down

from worker.app import PROCESS_SLICE_TASK
from worker.runtime import get_feeder, shutdown, stop_claiming


# A shared task registers with whichever app imports this module (make_celery_app's `include`), so no app is
# built to define it.
@shared_task(name=PROCESS_SLICE_TASK)
def process_slice(request_ids: list[int], isolation_group: int | None = None) -> dict[str, int]:
    """Returns what became of the requests this slice claimed: {"succeeded": n, "retried": n, ...}.
    With `isolation_group`, the message holds that group of suspects (worker/transitions.py)."""
    return get_feeder().run_slice(request_ids, isolation_group)


@worker_init.connect
def load_engine_at_start(**_: object) -> None:
    """Load the model before the first message, so a bad model setting stops the worker at once."""
    get_feeder()


@worker_shutting_down.connect
def claim_nothing_more(**_: object) -> None:
    """Sent as the warm shutdown begins, before Celery waits for the running slices."""
    stop_claiming()


@worker_shutdown.connect
def stop_engine(**_: object) -> None:
    shutdown()
