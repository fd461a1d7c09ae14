"""The submit's reader process (producer/submit.py, `staged_in_process`): its chunks are the helper
thread's, the models it routed to reach the submitting process, an error in it is raised there, and a
reader that dies is named rather than waited for. No database: staging is pure."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from producer.reader import read_file
from producer.submit import LineRouter, SubmitError, staged_chunks, staged_in_process
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


def test_the_process_stages_the_chunks_the_thread_stages(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "lines.jsonl", 40)
    thread_router, process_router = LineRouter(ROUTES), LineRouter(ROUTES)
    in_thread = list(staged_chunks(read_file(path, 1 << 20), 6, SCOPE, thread_router))
    in_process = list(staged_in_process(path, 1 << 20, 1, 0, 6, SCOPE, process_router))
    assert in_process == in_thread and len(in_thread) == 7
    assert process_router.models == thread_router.models == {"m", "n"}


def test_the_process_starts_at_the_stored_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "lines.jsonl", 40)
    chunks = list(staged_chunks(read_file(path, 1 << 20), 10, SCOPE, LineRouter(ROUTES)))
    resumed = list(staged_in_process(path, 1 << 20, 11, chunks[0].end_offset, 10, SCOPE, LineRouter(ROUTES)))
    assert resumed == chunks[1:]


def test_an_error_in_the_reader_process_is_raised_in_the_submitting_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(staged_in_process(tmp_path / "gone.jsonl", 1 << 20, 1, 0, 10, SCOPE, LineRouter(ROUTES)))


def test_a_reader_process_that_dies_is_named(tmp_path: Path) -> None:
    """Chunks of one line fill the pipe long before the file ends, so the child is still there to kill."""
    path = write_lines(tmp_path / "lines.jsonl", 5000)
    chunks = staged_in_process(path, 1 << 20, 1, 0, 1, SCOPE, LineRouter(ROUTES))
    next(chunks)
    (reader,) = [child for child in multiprocessing.active_children() if child.name == "deepbatch-submit-reader"]
    reader.kill()
    with pytest.raises(SubmitError, match="ended without finishing it"):
        list(chunks)
    assert not [child for child in multiprocessing.active_children() if child.name == "deepbatch-submit-reader"]
