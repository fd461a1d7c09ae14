"""A file's lines read, validated and encoded for COPY, chunk by chunk, ahead of the chunk being written.

`submit` (producer/submit.py) writes chunk N while the next one is staged here: by a helper thread
(`read_ahead` over `staged_chunks`), or, for a big file, by a process of its own (`ReaderProcess`) whose
chunks the helper thread only receives. The helper thread also hashes the file up to each chunk's end
(`FilePrefix`), so that a resumed submit can check it is the same file. Why a process: the submitting
process's two threads share one GIL, and on two cores they left about 40% of the CPU idle
(bench/results/submit-redis-reader-process-ab.json).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import signal
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from producer import queries
from producer.reader import ReadLine, read_file
from schema.cache import CacheScope
from schema.lines import LineError
from worker.registry import Routes, RoutingError

T = TypeVar("T")


class SubmitError(Exception):
    """A submission that cannot start or go on; the message says why and what to do."""


class LineRouter:
    """Gives each valid line the route of its model, or turns it into the error that no worker serves it;
    keeps the models it routed to, to label the job with."""

    def __init__(self, routes: Routes):
        self.routes = routes
        self.models: set[str] = set()

    def __call__(self, line: ReadLine) -> tuple[ReadLine, queries.StagedRoute | None]:
        if line.request is None:
            return line, None
        try:
            route = self.routes.route(line.request.body.model)
        except RoutingError as error:
            return ReadLine(line.line_no, error=LineError(error.code, str(error), line.request.custom_id),
                            end_offset=line.end_offset), None
        self.models.add(route.model)
        return line, queries.StagedRoute(route.model, route.queue)


def staged_chunks(lines: Iterator[ReadLine], size: int, cache_scope: CacheScope | None,
                  router: LineRouter | None = None) -> Iterator[queries.StagedChunk]:
    """`lines` in chunks of `size`, each encoded for COPY."""
    while (chunk := queries.stage_chunk(islice(lines, size), cache_scope, router)).lines:
        yield chunk


def staged_file_chunks(path: Path, max_line_bytes: int, first_line_no: int, offset: int, size: int,
                       cache_scope: CacheScope | None, router: LineRouter) -> Iterator[queries.StagedChunk]:
    """`staged_chunks` of the file's lines from byte `offset`, where line `first_line_no` starts. The router
    checks each line's model (against the registry), not the reader."""
    return staged_chunks(read_file(path, max_line_bytes, None, first_line_no, offset), size, cache_scope, router)


def with_file_prefix(chunks: Iterable[queries.StagedChunk], path: Path,
                     prefix: FilePrefix) -> Iterator[queries.StagedChunk]:
    """Each chunk carrying the sha256 of the file up to its end."""
    with path.open("rb") as stream:
        for chunk in chunks:
            chunk.prefix_sha256 = prefix.extend(stream, chunk.end_offset)
            yield chunk


def stage_in_child(sending: Any, path: Path, max_line_bytes: int, first_line_no: int, offset: int, size: int,
                   cache_scope: CacheScope | None, routes: Routes) -> None:
    """The child of `ReaderProcess`: sends ("chunk", (chunk, models routed to so far)) per chunk, then None;
    or ("error", what stopped it), as text: an exception object might not unpickle in the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's: it stops after the chunk in hand
    router = LineRouter(routes)
    try:
        for chunk in staged_file_chunks(path, max_line_bytes, first_line_no, offset, size, cache_scope, router):
            sending.send(("chunk", (chunk, sorted(router.models))))
        sending.send(None)
    except BrokenPipeError:
        return  # the submitting process is gone
    except Exception as error:  # noqa: BLE001 - reported in the parent, at the chunk it stopped
        sending.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        sending.close()


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a child is spawned: an ignored disposition survives exec and Python keeps it, so
    a terminal's Ctrl-C (sent to the whole process group) cannot kill the child during its imports, before
    `stage_in_child` ignores it itself. Only the main thread may change it; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ReaderProcess:
    """`staged_file_chunks`, computed in a spawned process (not forked: this one
    has threads) started at once, at most about a chunk ahead (the pipe blocks; with the one being written
    and the one received, three chunks are in flight); the models it routed to are added to
    `router.models`. `close()` kills the child, however the submission ends."""

    def __init__(self, path: Path, max_line_bytes: int, first_line_no: int, offset: int, size: int,
                 cache_scope: CacheScope | None, router: LineRouter):
        context = multiprocessing.get_context("spawn")
        self.receiving, sending = context.Pipe(duplex=False)
        self.child = context.Process(target=stage_in_child, name="deepbatch-submit-reader", daemon=True,
                                     args=(sending, path, max_line_bytes, first_line_no, offset, size, cache_scope,
                                           router.routes))
        with sigint_ignored():
            self.child.start()
        sending.close()
        self.path, self.router = path, router

    def __iter__(self) -> Iterator[queries.StagedChunk]:
        while True:
            try:
                message = self.receiving.recv()
            except (EOFError, OSError):  # OSError: the child died in the middle of a message
                self.child.join(5)
                raise SubmitError(f"the process reading {self.path} ended without finishing it (exit code "
                                  f"{self.child.exitcode})") from None
            if message is None:
                return
            kind, payload = message
            if kind == "error":
                raise SubmitError(f"reading {self.path} failed: {payload}")
            chunk, models = payload
            self.router.models.update(models)
            yield chunk

    def close(self) -> None:
        if self.child.is_alive():
            self.child.kill()
        self.child.join()
        self.receiving.close()


class FilePrefix:
    """The sha256 of a file's first bytes, extended chunk by chunk as they are stored (read again from the
    page cache, in the read-ahead thread: about 2 s for the benchmark's 750 MB file), so a resumed submit
    can check it is the same file."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.length = 0

    def extend(self, stream: BinaryIO, end: int) -> str:
        stream.seek(self.length)
        while self.length < end:
            block = stream.read(min(1 << 20, end - self.length))
            if not block:
                raise SubmitError(f"the file ended at byte {self.length} while being submitted")
            self.hasher.update(block)
            self.length += len(block)
        return self.hasher.hexdigest()


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
