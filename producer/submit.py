"""Submitting a file: create the job, insert its lines in chunks, publish each chunk's request ids.

Rows are committed before their messages are published, so a message always finds its row; a crash
between the two leaves queued rows that `reconcile` re-publishes (Postgres is the source of truth).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from producer import queries
from producer.reader import ReadLine, read_file
from schema.settings import Settings
from worker.app import publish_slices


def chunked(lines: Iterable[ReadLine], size: int) -> Iterator[list[ReadLine]]:
    iterator = iter(lines)
    while chunk := list(islice(iterator, size)):
        yield chunk


def submit_file(
    path: Path,
    settings: Settings,
    sessions: sessionmaker[Session],
    app: Celery,
    on_chunk: Callable[[int], None] | None = None,
    completion_window: timedelta | None = None,
    metadata: dict[str, Any] | None = None,
    use_result_cache: bool = True,
    priority: int = 0,
) -> str:
    """Create a job for `path` and queue every valid line; returns the job id."""
    with sessions.begin() as session:
        job_id = queries.create_job(session, str(path), settings.model, metadata, completion_window,
                                    use_result_cache, priority, settings.queue_name)
    options = queries.JobOptions(settings.max_attempts, settings.model if use_result_cache else None, priority,
                                 settings.queue_name)
    total_lines = 0
    lines = read_file(path, settings.max_line_bytes, settings.served_model_names)
    for chunk in chunked(lines, settings.insert_chunk_size):
        with sessions.begin() as session:
            outcome = queries.insert_chunk(session, job_id, chunk, options)
        publish_slices(app, outcome.queued_request_ids, settings.slice_size)
        total_lines += len(chunk)
        if on_chunk:
            on_chunk(total_lines)
    with sessions.begin() as session:
        queries.finish_submission(session, job_id, total_lines)
    return job_id
