"""Submitting a file: create the job, insert its lines in chunks, publish their request ids in slices.

Rows are committed before their messages are published, so a message always finds its row; a crash
between the two leaves queued rows that `reconcile` re-publishes (Postgres is the source of truth).

Two threads share the work: a helper reads, validates and encodes the next chunk (`read_ahead`) while
the calling thread writes this one (COPY, one statement, commit, publish). Each half costs about the
same per line, Python's in this process and Postgres's in its backend, so on two cores they overlap
(bench/submit.py measures the whole against the Python half alone).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from producer import queries
from producer.reader import ReadLine, read_file
from schema.settings import Settings
from worker.app import publish_slices

T = TypeVar("T")


def staged_chunks(lines: Iterator[ReadLine], size: int, cache_model: str | None) -> Iterator[queries.StagedChunk]:
    """`lines` in chunks of `size`, each encoded for COPY."""
    while (chunk := queries.stage_chunk(islice(lines, size), cache_model)).lines:
        yield chunk


def read_ahead(chunks: Iterator[T]) -> Iterator[T]:
    """Yield `chunks`, computing the next one in a helper thread while the caller works on this one.

    One chunk ahead, no more, so memory stays two chunks whatever the file's length. An error in the
    helper is raised here, at the chunk it stopped.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepbatch-read-ahead") as executor:
        upcoming = executor.submit(next, chunks, None)
        while (chunk := upcoming.result()) is not None:
            upcoming = executor.submit(next, chunks, None)
            yield chunk


class SlicePublisher:
    """Publishes committed request ids in full slices; the remainder waits for the next chunk's ids, so
    slices span chunks and a job of N valid lines makes ceil(N / slice_size) messages.

    (Publishing from a helper thread instead, to overlap it with the next chunk's statement, made no
    measurable difference: the machine's two cores are already busy with Python and Postgres.)
    """

    def __init__(self, app: Celery, slice_size: int):
        self.app, self.slice_size = app, slice_size
        self.waiting: list[int] = []  # committed, not yet published; fewer than slice_size between chunks

    def add(self, request_ids: list[int]) -> None:
        self.waiting.extend(request_ids)
        full = len(self.waiting) - len(self.waiting) % self.slice_size
        if full:
            publish_slices(self.app, self.waiting[:full], self.slice_size)
            del self.waiting[:full]

    def flush(self) -> None:
        publish_slices(self.app, self.waiting, self.slice_size)
        self.waiting = []


@contextmanager
def prompt_thread_switches(interval_s: float = 0.0005) -> Iterator[None]:
    """Let a thread that has waited on Postgres or the broker take the GIL back within `interval_s`.

    With the default 5 ms, the writing thread queued behind the read-ahead thread after every wait (COPY
    blocks on the socket dozens of times a chunk), and Postgres idled meanwhile: 100,000 lines took
    12.2 s, and 9.9 s at 0.5 ms (means of three, 2 cores). Process-wide, so it is restored afterwards.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


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
    origin: queries.ApiOrigin | None = None,
) -> str:
    """Create a job for `path` and queue every valid line; returns the job id.

    `on_chunk(lines)` is called in this thread after each chunk is committed, with the lines so far.
    """
    with sessions.begin() as session:
        job_id = queries.create_job(session, str(path), settings.model, metadata, completion_window,
                                    use_result_cache, priority, settings.queue_name, origin)
    options = queries.JobOptions(settings.max_attempts, settings.model if use_result_cache else None, priority,
                                 settings.queue_name)
    lines = read_file(path, settings.max_line_bytes, settings.served_model_names)
    chunks = read_ahead(staged_chunks(lines, settings.insert_chunk_size, options.cache_model))
    with prompt_thread_switches():
        total_lines = write_chunks(chunks, job_id, options, sessions, SlicePublisher(app, settings.slice_size),
                                   on_chunk)
    with sessions.begin() as session:
        queries.finish_submission(session, job_id, total_lines)
    return job_id


def write_chunks(chunks: Iterable[queries.StagedChunk], job_id: str, options: queries.JobOptions,
                 sessions: sessionmaker[Session], publisher: SlicePublisher,
                 on_chunk: Callable[[int], None] | None) -> int:
    """Each chunk in its own transaction, published once committed; returns the number of lines."""
    total_lines = 0
    for chunk in chunks:
        with sessions.begin() as session:
            outcome = queries.insert_staged(session, job_id, chunk, options)
        publisher.add(outcome.queued_request_ids)
        total_lines += chunk.lines
        if on_chunk:
            on_chunk(total_lines)
    publisher.flush()
    return total_lines
