"""Submitting a file: create the job, insert its lines in chunks, publish their request ids in slices.

Each line is routed by its `model` to the queue of the live workers serving it (worker/registry.py: the
registry as it stands when the submission starts); a model nobody serves is the line's error, naming those
served. One job may mix models: its slices go to each model's queue, and the job is labelled with them.

Rows are committed before their messages are published, so a message always finds its row; a crash
between the two leaves queued rows that `reconcile` re-publishes (Postgres is the source of truth).

The next chunk is read, validated and encoded (producer/staging.py: in a helper thread, or for a big
file in a process of its own) while the calling thread writes this one (COPY, one statement, commit,
publish). Each half costs about the same per line, Python's and Postgres's in its backend, so on two
cores they overlap (bench/submit.py measures the whole against the Python half alone).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from producer import queries
from producer.staging import (FilePrefix, LineRouter, ReaderProcess, SubmitError, read_ahead, staged_file_chunks,
                              with_file_prefix)
from schema.cache import CacheScope, cache_owner
from schema.settings import Settings
from schema.tables import Job
from worker.app import publish_groups, publish_slices
from worker.registry import routes
from worker.transitions import queued_request_ids

log = logging.getLogger(__name__)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION = re.compile(r"0*([0-9]+)([smhd])")  # ASCII digits only
MAX_DURATION = timedelta(days=365)  # a completion window longer than a year is a typo, and far ones overflow


def parse_duration(text: str) -> timedelta:
    """A completion window: `24h`, `90m`, `30s`, `2d` → a timedelta, from 1s to 365d; anything else is a
    ValueError whose message says what is wrong with it (the CLI and the API show it as it is)."""
    match = DURATION.fullmatch(text)
    if match is None or match[1] == "0":
        raise ValueError(f"{text[:40]!r} is not a duration like 24h, 90m, 30s or 2d")
    # Compared as seconds before any timedelta is made: a long enough number overflows one.
    if len(match[1]) > 12 or int(match[1]) * DURATION_UNITS[match[2]] > MAX_DURATION.total_seconds():
        raise ValueError(f"{text[:40]!r} is longer than the longest completion window, {MAX_DURATION.days}d")
    return timedelta(seconds=int(match[1]) * DURATION_UNITS[match[2]])


class SubmissionStopped(Exception):
    """The submission stopped, on request, after a committed chunk: what is stored stays, and runs."""


class SlicePublisher:
    """Publishes committed request ids in full slices, to their model's queue; the remainder waits for the
    next chunk's ids, so slices span chunks and a job of N valid lines of one model makes ceil(N / slice_size)
    messages.

    (Publishing from a helper thread instead, to overlap it with the next chunk's statement, made no
    measurable difference: the machine's two cores are already busy with Python and Postgres.)
    """

    def __init__(self, app: Celery, slice_size: int):
        self.app, self.slice_size = app, slice_size
        # Per queue: committed, not yet published; fewer than slice_size between chunks.
        self.waiting: dict[str | None, list[int]] = {}

    def add(self, request_ids: list[int], queues: list[str] | None = None) -> None:
        for request_id, queue in zip(request_ids, queues or [None] * len(request_ids), strict=True):
            self.waiting.setdefault(queue, []).append(request_id)
        for queue, waiting in self.waiting.items():
            full = len(waiting) - len(waiting) % self.slice_size
            if full:
                publish_slices(self.app, waiting[:full], self.slice_size, queue)
                del waiting[:full]

    def flush(self) -> None:
        for queue, waiting in self.waiting.items():
            publish_slices(self.app, waiting, self.slice_size, queue)
        self.waiting = {}


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
    on_job: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> str:
    """Create a job for `path` and queue every valid line; returns the job id.

    `on_chunk(lines)` is called in this thread after each chunk is committed, with the lines so far. Once
    `stop` is set, the submission ends after the chunk in hand (SubmissionStopped): an interrupt between
    chunks, never in the middle of a statement.
    """
    with sessions.begin() as session:
        job_id = queries.create_job(session, str(path), settings.model, metadata, completion_window,
                                    use_result_cache, priority, settings.queue_name, origin)
    if on_job:
        on_job(job_id)
    owner_key_id = origin.owner_key_id if origin else None
    cache_scope = CacheScope(settings.model, cache_owner(owner_key_id, settings.result_cache_scope))
    options = queries.JobOptions(settings.max_attempts, cache_scope if use_result_cache else None, priority,
                                 settings.queue_name)
    with submission_lock(sessions, job_id):
        submit_lines(path, job_id, options, settings, sessions, app, FilePrefix(), 0, on_chunk, stop)
    return job_id


@contextmanager
def submission_lock(sessions: sessionmaker[Session], job_id: str) -> Iterator[None]:
    """Hold the job's submission lock (queries.SUBMISSION_STATE) on a connection of its own."""
    with sessions() as session:
        if not queries.try_submission_lock(session, job_id):
            raise SubmitError(f"job {job_id} is being submitted by another process right now; let it finish, "
                              "or stop it and resume")
        try:
            yield
        finally:
            queries.release_submission_lock(session, job_id)


def resume_file(path: Path, job_id: str, settings: Settings, sessions: sessionmaker[Session], app: Celery,
                on_chunk: Callable[[int], None] | None = None, stop: threading.Event | None = None) -> int:
    """Go on submitting `path` into the interrupted job `job_id`, after its last stored line; returns the
    line it resumed at. The stored part of the file must be unchanged (its sha256 is checked), and what
    was stored but perhaps never published is published again (a slice is a right to claim, so a message
    too many claims nothing twice)."""
    with submission_lock(sessions, job_id):
        return resume_locked(path, job_id, settings, sessions, app, on_chunk, stop)


def resume_locked(path: Path, job_id: str, settings: Settings, sessions: sessionmaker[Session], app: Celery,
                  on_chunk: Callable[[int], None] | None, stop: threading.Event | None) -> int:
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise SubmitError(f"no job {job_id!r}")
        if job.cancel_requested_at is not None:
            raise SubmitError(f"job {job_id} was cancelled; submit the file as a new job instead")
        if job.submitted_at is not None:
            raise SubmitError(f"job {job_id} is fully submitted ({job.total_lines} lines); there is nothing to resume")
        stored_lines, stored_bytes, stored_sha256 = job.submitted_lines, job.submitted_bytes, job.submitted_sha256
        # Each line's key names the model it is routed to (producer/queries.py, copy_line).
        cache_scope = CacheScope(settings.model, cache_owner(job.owner_key_id, settings.result_cache_scope))
        options = queries.JobOptions(settings.max_attempts, cache_scope if job.use_result_cache else None,
                                     job.priority, job.queue)
        queued = {queue: queued_request_ids(session, queue, timedelta(0), job_id)
                  for queue in queries.job_queues(session, job_id)}
    prefix = FilePrefix()
    with path.open("rb") as stream:
        if stored_bytes and prefix.extend(stream, stored_bytes) != stored_sha256:
            raise SubmitError(f"the first {stored_lines} lines of {path} are not those job {job_id} stored: "
                              "resume only with the same file")
    for queue, (suspect_groups, others) in queued.items():
        publish_slices(app, others, settings.slice_size, queue)
        publish_groups(app, suspect_groups, queue)
    submit_lines(path, job_id, options, settings, sessions, app, prefix, stored_lines, on_chunk, stop)
    return stored_lines + 1


def submit_lines(path: Path, job_id: str, options: queries.JobOptions, settings: Settings,
                 sessions: sessionmaker[Session], app: Celery, prefix: FilePrefix, stored_lines: int,
                 on_chunk: Callable[[int], None] | None, stop: threading.Event | None = None) -> None:
    """Store and publish the file's lines after `stored_lines` (at byte `prefix.length`), then mark the job
    submitted; stops early, leaving it as it is, if the job is cancelled meanwhile."""
    with sessions() as session:
        router = LineRouter(routes(session, settings))
    reading = (path, settings.max_line_bytes, stored_lines + 1, prefix.length, settings.insert_chunk_size,
               options.cache_scope, router)
    staged: Iterator[queries.StagedChunk] | ReaderProcess
    if path.stat().st_size - prefix.length >= settings.submit_process_min_bytes:
        staged = ReaderProcess(*reading)
    else:
        staged = staged_file_chunks(*reading)
    prefixed = with_file_prefix(staged, path, prefix)
    # Closed innermost first, whatever ends the submission: the helper thread's pending chunk, the file, then
    # the reader (a child process is killed rather than left to the garbage collector).
    with closing(staged), closing(prefixed), closing(read_ahead(prefixed)) as chunks:
        try:
            with prompt_thread_switches():
                total_lines = write_chunks(chunks, job_id, options, sessions,
                                           SlicePublisher(app, settings.slice_size), on_chunk, stored_lines, stop)
        finally:
            label_job(sessions, job_id, router.models, resumed=stored_lines > 0)
    if total_lines is not None:
        with sessions.begin() as session:
            queries.finish_submission(session, job_id, total_lines)


def label_job(sessions: sessionmaker[Session], job_id: str, models: Iterable[str], resumed: bool) -> None:
    """Names the job by the models of what it stored, after a submission stopped or not; a failure here (the
    database gone) is logged, so that it never hides the error that stopped the submission."""
    try:
        with sessions.begin() as session:
            queries.label_job_models(session, job_id, models, resumed=resumed)
    except Exception:  # noqa: BLE001 - the submission's own error, if any, is the one to raise
        log.exception("could not label job %s with its models", job_id)


def write_chunks(chunks: Iterable[queries.StagedChunk], job_id: str, options: queries.JobOptions,
                 sessions: sessionmaker[Session], publisher: SlicePublisher,
                 on_chunk: Callable[[int], None] | None, stored_lines: int = 0,
                 stop: threading.Event | None = None) -> int | None:
    """Each chunk in its own transaction with the submission's progress, published once committed;
    returns the file's number of lines, or None if the job was cancelled meanwhile. Raises
    SubmissionStopped after the chunk in hand once `stop` is set."""
    total_lines = stored_lines
    for chunk in chunks:
        with sessions.begin() as session:
            outcome = queries.insert_staged(session, job_id, chunk, options)
            cancelled = queries.record_submission_progress(session, job_id, chunk)
        publisher.add(outcome.queued_request_ids, outcome.queues)
        total_lines += chunk.lines
        if on_chunk:
            on_chunk(total_lines)
        if cancelled:
            publisher.flush()
            return None
        if stop is not None and stop.is_set():
            publisher.flush()
            raise SubmissionStopped(f"stopped after line {total_lines}")
    publisher.flush()
    return total_lines
