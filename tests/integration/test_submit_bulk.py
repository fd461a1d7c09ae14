"""Bulk submission through the real CLI, Postgres and broker: chunks staged by COPY, slices published.

The file puts duplicate custom_ids and bad lines on both sides of chunk boundaries (chunks of 7 lines).
Its rows must be what the reader says each line is, whatever the chunk size: the expectation is worked
out here line by line with `validate_line`, and the same file submitted as one chunk must give the
same rows. The queue must hold ceil(valid lines / slice size) messages carrying every queued id once.
"""

from __future__ import annotations

import json
from pathlib import Path
from socket import timeout as SocketTimeout

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from producer.reader import validate_line
from schema.audit import verify_chain
from schema.cache import CLI_OWNER, result_cache_key
from schema.settings import Settings
from tests.conftest import deepbatch, wait_until
from worker.app import make_celery_app, queue_length, work_queue

pytestmark = pytest.mark.integration

MODEL = "tiny-deepseek-v3"
CHUNK_SIZE, SLICE_SIZE = 7, 4
QUOTED_ID = "it's \"quoted\"\t\\ é"  # COPY must escape it; a duplicate's error shows Python's repr of it


def batch_line(custom_id: str, prompt: str, **sampling: object) -> bytes:
    body = {"model": MODEL, "prompt": prompt, **sampling}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}).encode()


def chat_line(custom_id: str, content: str, **sampling: object) -> bytes:
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
            **sampling}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()


LINES: list[bytes] = [
    b'{"custom_id": "a", "prompt": "first a", "temperature": 0}',                # 1
    chat_line("b", "first b", max_tokens=3, stop=["\n"]),                          # 2
    b'{"custom_id": "a", "prompt": "a again, same chunk"}',                       # 3: duplicate of 1
    b'{"prompt": "no id: custom_id is the line number", "top_k": 1}',             # 4: custom_id "4"
    b'{"prompt": "unterminated',                                                  # 5: invalid JSON
    batch_line(QUOTED_ID, "quoted id", temperature=0.5),                          # 6
    b"",                                                                          # 7: empty, last of chunk 1
    chat_line("b", "b again, next chunk"),                                        # 8: duplicate of 2
    b'{"custom_id": "4", "prompt": "takes the id line 4 got by default"}',        # 9: duplicate of 4
    batch_line("m", "unknown model", model="gpt-4o"),                             # 10: unknown model
    b'{"custom_id": "m", "prompt": "m, first valid use"}',                        # 11: accepted (10 was rejected)
    b'{"custom_id": "x\\u0000y", "prompt": "NUL in the id"}',                    # 12: NUL
    b'{"prompt": "caf\xe9"}',                                                     # 13: invalid UTF-8
    b'{"prompt": "lone surrogate \\ud800"}',                                      # 14: unpaired surrogate
    batch_line(QUOTED_ID, "quoted id again"),                                     # 15: duplicate of 6
    b'[1, 2]',                                                                    # 16: not an object
    b'{"custom_id": "a", "prompt": "a a third time, two chunks later"}',          # 17: duplicate of 1
    b'{"custom_id": "m", "prompt": "m again"}',                                   # 18: duplicate of 11
    b'{"prompt": 42}',                                                            # 19: wrong type
    b'{"custom_id": "e", "messages": [{"role": "user", "content": "\xc3\xa9t\xc3\xa9"}], "seed": 7}',  # 20
] + [json.dumps({"prompt": f"filler {n}", "max_tokens": 2, "temperature": 0}).encode() for n in range(21, 31)]


def expected_rows(lines: list[bytes], served_models: frozenset[str]) -> dict[int, dict]:
    """What each line becomes, worked out line by line: the oracle the database path must agree with."""
    first_use: dict[str, int] = {}
    rows = {}
    for line_no, raw in enumerate(lines, start=1):
        read = validate_line(raw, line_no, served_models)
        if read.error is not None:
            custom_id = read.error.custom_id and read.error.custom_id.replace("\x00", "\\u0000")  # as written
            rows[line_no] = {"state": "failed", "custom_id": custom_id, "error_code": read.error.code,
                             "error_message": f"line {line_no}: {read.error.message}"}
            continue
        custom_id = read.request.custom_id
        if custom_id in first_use:
            message = f"duplicate custom_id {custom_id!r} (first used on line {first_use[custom_id]})"
            rows[line_no] = {"state": "failed", "custom_id": custom_id, "error_code": "duplicate_custom_id",
                             "error_message": f"line {line_no}: {message}"}
            continue
        first_use[custom_id] = line_no
        body = read.request.body_json()
        rows[line_no] = {"state": "queued", "custom_id": custom_id, "url": read.request.url, "body": body,
                         "cache_key": result_cache_key(MODEL, read.request.url, read.request.body, CLI_OWNER),
                         "error_code": None}
    return rows


def stored_rows(db_engine: Engine, job_id: str) -> dict[int, dict]:
    with db_engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT line_no, id, custom_id, url, body, state, error_code, error_message, cache_key, max_attempts, "
            "priority, queue, attempt FROM requests WHERE job_id = :j"), {"j": job_id}).mappings()
        return {row["line_no"]: dict(row) for row in rows}


def drain(app, settings: Settings) -> list[list[int]]:
    """Take every message off the queue (then delete it): the slices of request ids they carry."""
    slices: list[list[int]] = []
    queue = work_queue(settings, settings.broker_url)
    with app.connection_for_write() as connection:
        with connection.Consumer(queue, accept=["json"], no_ack=True,
                                 callbacks=[lambda body, message: slices.append(body[0][0])]):
            try:
                while True:
                    connection.drain_events(timeout=1)
            except SocketTimeout:
                pass
        queue(connection.default_channel).delete()
    return slices


def submit(path: Path, env: dict, chunk_size: int, process_min_bytes: int | None = None) -> str:
    env = {**env, "DEEPBATCH_INSERT_CHUNK_SIZE": str(chunk_size), "DEEPBATCH_SLICE_SIZE": str(SLICE_SIZE),
           "DEEPBATCH_MAX_ATTEMPTS": "5"}
    if process_min_bytes is not None:
        env["DEEPBATCH_SUBMIT_PROCESS_MIN_BYTES"] = str(process_min_bytes)
    return deepbatch("submit", str(path), "--priority", "3", env=env).stdout.strip()


def test_chunks_settle_duplicates_and_bad_lines_and_publish_full_slices(
    tmp_path: Path, service_env: dict, broker_url: str, queue_name: str, db_engine: Engine
) -> None:
    path = tmp_path / "bulk.jsonl"
    path.write_bytes(b"\n".join(LINES) + b"\n")
    job_id = submit(path, service_env, CHUNK_SIZE)

    expected = expected_rows(LINES, Settings(model=MODEL, model_aliases="").served_model_names)
    stored = stored_rows(db_engine, job_id)
    assert set(stored) == set(expected) == set(range(1, len(LINES) + 1))
    for line_no, row in expected.items():
        assert {key: stored[line_no][key] for key in row} == row, line_no
        assert (stored[line_no]["max_attempts"], stored[line_no]["priority"], stored[line_no]["queue"],
                stored[line_no]["attempt"]) == (5, 3, queue_name, 0)
    assert stored[3]["error_message"] == "line 3: duplicate custom_id 'a' (first used on line 1)"
    assert stored[15]["error_message"] == f"line 15: duplicate custom_id {QUOTED_ID!r} (first used on line 6)"
    assert stored[12]["custom_id"] == "x\\u0000y"  # Postgres text cannot hold NUL
    assert "unpaired surrogate" in stored[14]["error_message"]

    queued = sorted(row["id"] for row in stored.values() if row["state"] == "queued")
    app = make_celery_app(Settings(broker_url=broker_url, queue_name=queue_name))
    wait_until(lambda: queue_length(app, queue_name) == -(-len(queued) // SLICE_SIZE), timeout=30,
               message=f"{-(-len(queued) // SLICE_SIZE)} messages of {SLICE_SIZE} ids")
    slices = drain(app, Settings(broker_url=broker_url, queue_name=queue_name))
    assert sorted(request_id for ids in slices for request_id in ids) == queued
    assert all(len(ids) == SLICE_SIZE for ids in slices[:-1])

    with db_engine.connect() as connection:
        events = connection.execute(text(
            "SELECT e.event, e.to_state, e.detail, r.state, r.error_message FROM audit_events e "
            "LEFT JOIN requests r ON r.id = e.request_id WHERE e.job_id = :j"), {"j": job_id}).all()
        total_lines = connection.scalar(text("SELECT total_lines FROM jobs WHERE id = :j"), {"j": job_id})
    assert total_lines == len(LINES)
    assert sorted(event for event, *_ in events) == sorted(
        ["job_created", "job_submitted"] + ["submitted" if row["state"] == "queued" else "rejected"
                                            for row in expected.values()])
    for event, to_state, detail, state, error_message in events:
        if event in ("submitted", "rejected"):
            assert (to_state, detail) == ((state, None) if state == "queued" else (state, error_message))
    with Session(db_engine) as session:
        assert verify_chain(session).intact


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_the_rows_do_not_depend_on_the_chunk_size(tmp_path: Path, service_env: dict, db_engine: Engine) -> None:
    path = tmp_path / "bulk.jsonl"
    path.write_bytes(b"\n".join(LINES) + b"\n")
    by_chunk_size = {}
    for chunk_size in (1, CHUNK_SIZE, 1000):
        rows = stored_rows(db_engine, submit(path, service_env, chunk_size))
        by_chunk_size[chunk_size] = {line_no: {key: value for key, value in row.items() if key != "id"}
                                     for line_no, row in rows.items()}
    assert by_chunk_size[1] == by_chunk_size[CHUNK_SIZE] == by_chunk_size[1000]


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_a_file_read_in_a_process_of_its_own_stores_the_same_rows(tmp_path: Path, service_env: dict,
                                                                   db_engine: Engine) -> None:
    """DEEPBATCH_SUBMIT_PROCESS_MIN_BYTES=0 reads and encodes the file in a child process: the rows, the
    job's model label and the stored file prefix's sha256 are those of the helper-thread path."""
    path = tmp_path / "bulk.jsonl"
    path.write_bytes(b"\n".join(LINES) + b"\n")
    by_path = {}
    for process_min_bytes in (0, 1 << 40):
        job_id = submit(path, service_env, CHUNK_SIZE, process_min_bytes)
        rows = stored_rows(db_engine, job_id)
        with db_engine.connect() as connection:
            job = connection.execute(text("SELECT model, submitted_sha256, submitted_bytes, total_lines FROM jobs "
                                          "WHERE id = :j"), {"j": job_id}).one()
        by_path[process_min_bytes] = ({line_no: {key: value for key, value in row.items() if key != "id"}
                                       for line_no, row in rows.items()}, tuple(job))
    assert by_path[0] == by_path[1 << 40]
    assert by_path[0][1][2:] == (path.stat().st_size, len(LINES))
