"""The submit's reader process (producer/staging.py, `ReaderProcess`): its chunks are the helper thread's,
the models it routed to reach the submitting process, an error in it is reported there, a reader that dies
is named rather than waited for, and closing it leaves no child behind. No database: staging is pure."""

from __future__ import annotations

import json
import multiprocessing
from contextlib import closing
from pathlib import Path

import pytest

from producer.reader import read_file
from producer.staging import LineRouter, ReaderProcess, SubmitError, staged_chunks
from schema.cache import CacheScope
from worker.registry import Route, Routes

ROUTES = Routes(by_name={"m": Route("m", "q-m"), "n": Route("n", "q-n")}, default=Route("m", "q-m"))
SCOPE = CacheScope("m", "cli")


def write_lines(path: Path, count: int) -> Path:
    with path.open("w") as stream:
        for n in range(1, count + 1):
            if n % 7 == 0:
                stream.write("{not json\n")
            else:
                body = {"custom_id": f"c{n}", "prompt": f"line {n}", "model": "n" if n % 5 == 0 else "m"}
                stream.write(json.dumps(body) + "\n")
    return path


def readers() -> list[multiprocessing.Process]:
    return [child for child in multiprocessing.active_children() if child.name == "deepbatch-submit-reader"]


def test_the_process_stages_the_chunks_the_thread_stages(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "lines.jsonl", 40)
    thread_router, process_router = LineRouter(ROUTES), LineRouter(ROUTES)
    in_thread = list(staged_chunks(read_file(path, 1 << 20), 6, SCOPE, thread_router))
    with closing(ReaderProcess(path, 1 << 20, 1, 0, 6, SCOPE, process_router)) as reader:
        in_process = list(reader)
    assert in_process == in_thread and len(in_thread) == 7
    assert process_router.models == thread_router.models == {"m", "n"}


def test_the_process_starts_at_the_stored_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "lines.jsonl", 40)
    chunks = list(staged_chunks(read_file(path, 1 << 20), 10, SCOPE, LineRouter(ROUTES)))
    with closing(ReaderProcess(path, 1 << 20, 11, chunks[0].end_offset, 10, SCOPE, LineRouter(ROUTES))) as reader:
        assert list(reader) == chunks[1:]


def test_an_error_in_the_reader_process_is_reported_in_the_submitting_one(tmp_path: Path) -> None:
    with closing(ReaderProcess(tmp_path / "gone.jsonl", 1 << 20, 1, 0, 10, SCOPE, LineRouter(ROUTES))) as reader:
        with pytest.raises(SubmitError, match="gone.jsonl failed: FileNotFoundError"):
            list(reader)


def test_a_reader_process_that_dies_is_named(tmp_path: Path) -> None:
    """Chunks of one line fill the pipe long before the file ends, so the child is still there to kill."""
    path = write_lines(tmp_path / "lines.jsonl", 5000)
    with closing(ReaderProcess(path, 1 << 20, 1, 0, 1, SCOPE, LineRouter(ROUTES))) as reader:
        chunks = iter(reader)
        next(chunks)
        (child,) = readers()
        child.kill()
        with pytest.raises(SubmitError, match="ended without finishing it"):
            list(chunks)
    assert not readers()


def test_closing_a_reader_midway_kills_its_child(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "lines.jsonl", 5000)
    with closing(ReaderProcess(path, 1 << 20, 1, 0, 1, SCOPE, LineRouter(ROUTES))) as reader:
        next(iter(reader))
        assert readers()
    assert not readers()
