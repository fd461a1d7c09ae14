"""The workers registry: each worker announces in Postgres what it serves and where, and beats its heart.

A worker upserts its row (table `workers`) once its engine is ready: the model and the other names a line
may give for it, architecture, format, quantization, devices, dtype, tensor-parallel size, max batch,
KV-cache tokens, queue, host, pid, version, start time. Its maintenance thread renews `heartbeat_at`; a
clean stop sets `stopped_at`. A worker is live while its heartbeat is younger than DEEPBATCH_LEASE_S — the
time after which its requests' leases expire too — and stale after.

The producer reads the registry to route lines (`routes`): a line's `model` goes to the queue of the live
workers serving it; a line without one to the deployment's default model (DEEPBATCH_MODEL). The default
model's names are always accepted and go to DEEPBATCH_QUEUE_NAME, whether or not its workers are live now
(restarting, not yet started). A deployment is the queues under one DEEPBATCH_QUEUE_NAME: itself and
`<queue_name>.<model>` (worker/app.py, model_queue_name); the queues of `deepbatch run` are outside it.

The registry's SQL is here rather than in transitions.py: it touches no request.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from schema.settings import Settings
from schema.tables import Worker


def deepbatch_version() -> str | None:
    try:
        return version("deepbatch")
    except PackageNotFoundError:
        return None


@dataclass
class Announcement:
    """What a worker says of itself: the registry row's columns, bar the heartbeat."""

    id: str
    model: str
    aliases: list[str]
    queue: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    architecture: str | None = None
    model_format: str | None = None
    quantization: str | None = None
    devices: list[str] = field(default_factory=list)
    dtype: str | None = None
    tensor_parallel_size: int = 1
    max_batch_size: int | None = None
    kv_cache_tokens: int | None = None
    version: str | None = field(default_factory=deepbatch_version)
    started_at: datetime | None = None


def announce(sessions: sessionmaker[Session], announcement: Announcement) -> None:
    """Insert this worker's row, or replace the one a former process of the same host and pid left."""
    values: dict[str, Any] = {**announcement.__dict__, "heartbeat_at": text("now()"), "stopped_at": None}
    values["started_at"] = announcement.started_at or text("now()")
    statement = insert(Worker).values(**values)
    statement = statement.on_conflict_do_update(index_elements=[Worker.id],
                                                set_={name: statement.excluded[name] for name in values if name != "id"})
    with sessions.begin() as session:
        session.execute(statement)


HEARTBEAT = text("UPDATE workers SET heartbeat_at = now(), stopped_at = NULL WHERE id = :id")
SIGN_OFF = text("UPDATE workers SET stopped_at = now() WHERE id = :id")


def heartbeat(sessions: sessionmaker[Session], worker_id: str) -> None:
    with sessions.begin() as session:
        session.execute(HEARTBEAT, {"id": worker_id})


def sign_off(sessions: sessionmaker[Session], worker_id: str) -> None:
    """A clean stop: the row stays, as stopped, so `deepbatch workers` tells it from a lost worker."""
    with sessions.begin() as session:
        session.execute(SIGN_OFF, {"id": worker_id})


# The workers of one deployment (its queue and `<queue>.<model>`), live ones first; `live` as the module says.
WORKERS = text("""
    SELECT *, stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => :stale_after_s) AS live,
           extract(epoch FROM now() - heartbeat_at) AS heartbeat_age_s
    FROM workers
    WHERE :everywhere OR queue = :queue_name OR starts_with(queue, :queue_name || '.')
    ORDER BY (stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => :stale_after_s)) DESC,
             stopped_at IS NOT NULL, model, started_at, id
""")


@dataclass(frozen=True)
class RegisteredWorker:
    """A row of the registry as `deepbatch workers` and the dashboard show it."""

    row: Any  # the row's columns as attributes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.row, name)

    @property
    def status(self) -> str:
        if self.row.live:
            return "live"
        return "stopped" if self.row.stopped_at is not None else "stale"

    @property
    def names(self) -> list[str]:
        return [self.row.model, *self.row.aliases]


def registered_workers(session: Session, settings: Settings, everywhere: bool = False) -> list[RegisteredWorker]:
    """The deployment's workers (every worker in the database with `everywhere`), live ones first."""
    rows = session.execute(WORKERS, {"queue_name": settings.queue_name, "stale_after_s": settings.lease_s,
                                     "everywhere": everywhere})
    return [RegisteredWorker(row) for row in rows]


# A live worker of another model on the queue a worker is about to consume: the two would run each
# other's requests, and their results would name the wrong model.
OTHER_MODELS_ON_QUEUE = text("""
    SELECT id, model FROM workers
    WHERE queue = :queue AND model <> :model AND id <> :id AND stopped_at IS NULL
      AND heartbeat_at > now() - make_interval(secs => :stale_after_s)
    ORDER BY started_at
""")


class QueueTaken(RuntimeError):
    """The queue a worker would consume is served by live workers of another model."""


def check_queue_free(sessions: sessionmaker[Session], worker_id: str, model: str, queue: str,
                     stale_after_s: float) -> None:
    with sessions() as session:
        others = session.execute(OTHER_MODELS_ON_QUEUE, {"queue": queue, "model": model, "id": worker_id,
                                                         "stale_after_s": stale_after_s}).all()
    if others:
        served = ", ".join(f"{row.model!r} ({row.id})" for row in others)
        raise QueueTaken(f"queue {queue!r} is served by live workers of another model: {served}; a worker of "
                         f"{model!r} needs a queue of its own (DEEPBATCH_QUEUE_NAME)")


# ---- routing: what the producer does with a line's `model` ----


@dataclass(frozen=True)
class Route:
    model: str  # the model setting of the workers that will run the line: its results and cache key name it
    queue: str


class RoutingError(ValueError):
    """A line whose model no live worker serves; `code` and the message are the line's error."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Routes:
    """Where each model name a line may give goes, as the registry said when the submission started."""

    by_name: dict[str, Route]
    default: Route  # for a line that names no model: the default model's

    def route(self, model: str | None) -> Route:
        if model is None:
            return self.default
        found = self.by_name.get(model)
        if found is None:
            # producer/queries.py's UNKNOWN_MODEL_NAMES reads the name back from these words.
            raise RoutingError("unknown_model", f"unknown model {model!r}: this deployment serves {self.served()} "
                               "(DEEPBATCH_MODEL_ALIASES adds names)")
        return found

    def served(self) -> str:
        """Each model served, with its other names: 'smollm2-135m-instruct', 'tiny-deepseek-v3' (or 'x')."""
        names: dict[Route, list[str]] = {}
        for name, route in self.by_name.items():
            names.setdefault(route, []).append(name)
        described = []
        for route, route_names in sorted(names.items(), key=lambda item: item[0].model):
            others = sorted(name for name in route_names if name != route.model)
            described.append(repr(route.model) + (f" (or {', '.join(map(repr, others))})" if others else ""))
        return ", ".join(described)


def routes(session: Session, settings: Settings) -> Routes:
    """The routes of the deployment's live workers, and always the default model's (DEEPBATCH_MODEL and its
    aliases) to its queue, which its workers consume whenever they run: they may be restarting, or not yet
    started, and their lines must neither fail nor go to another model. A line that names no model is the
    default model's."""
    live = [worker for worker in registered_workers(session, settings) if worker.status == "live"]
    by_name: dict[str, Route] = {}
    for worker in sorted(live, key=lambda worker: (worker.started_at, worker.id)):  # the first to start wins a name
        route = Route(worker.model, worker.queue)
        for name in worker.names:
            by_name.setdefault(name, route)
    for name in settings.served_model_names:
        by_name.setdefault(name, Route(settings.model, settings.queue_name))
    return Routes(by_name, by_name[settings.model])
