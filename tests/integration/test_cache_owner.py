"""The result cache is scoped to its owner: through `deepbatch serve`, key B's greedy request is never
answered from key A's result (a hit would tell B what A asked), A's own repeat is; with
DEEPBATCH_RESULT_CACHE_SCOPE=deployment the operator shares it, and B is served from A's."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from producer.api.keys import create_key

pytestmark = pytest.mark.integration


def new_keys(db_engine: Engine, *names: str) -> list[str]:
    """Keys as `deepbatch keys create` makes them, made here: a CLI process each would cost seconds."""
    with Session(db_engine) as session, session.begin():
        return [create_key(session, name, actor="tests")[1] for name in names]


def greedy_batch_file(path: Path) -> Path:
    lines = [{"custom_id": f"q{n}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny-deepseek-v3", "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": f"a private question {n}"}]}} for n in range(2)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_batch(client: openai.OpenAI, prompts: Path) -> str:
    uploaded = client.files.create(file=prompts.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert batch.status in ("validating", "in_progress") and time.monotonic() < deadline, batch
        time.sleep(0.3)
    assert batch.request_counts.completed == 2
    return batch.id


def sources(db_engine: Engine, job_id: str) -> list[str | None]:
    """Per line, the job whose stored result answered it (None: the engine ran it)."""
    with db_engine.connect() as connection:
        return list(connection.execute(text(
            "SELECT source.job_id FROM requests r JOIN results s ON s.request_id = r.id "
            "LEFT JOIN requests source ON source.id = s.cached_from WHERE r.job_id = :j ORDER BY r.line_no"),
            {"j": job_id}).scalars())


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_one_key_is_never_served_another_keys_cached_result(tmp_path: Path, api_env: dict, start_server,
                                                            start_worker, db_engine: Engine) -> None:
    prompts = greedy_batch_file(tmp_path / "greedy.jsonl")
    owner_scoped, shared = start_server(), start_server(DEEPBATCH_RESULT_CACHE_SCOPE="deployment")
    start_worker(DEEPBATCH_ENGINE="null")  # the cache is the worker's, whatever its engine: the quickest
    key_a, key_b = new_keys(db_engine, "tenant-a", "tenant-b")

    first_a = run_batch(owner_scoped.client(key_a), prompts)
    first_b = run_batch(owner_scoped.client(key_b), prompts)
    second_a = run_batch(owner_scoped.client(key_a), prompts)
    assert sources(db_engine, first_a) == [None, None]
    assert sources(db_engine, first_b) == [None, None]  # B learns nothing of A's requests
    assert sources(db_engine, second_a) == [first_a, first_a]  # A's own repeat is a hit

    shared_a = run_batch(shared.client(key_a), prompts)
    shared_b = run_batch(shared.client(key_b), prompts)
    assert sources(db_engine, shared_a) == [None, None]  # nothing was stored in the shared scope before
    assert sources(db_engine, shared_b) == [shared_a, shared_a]
