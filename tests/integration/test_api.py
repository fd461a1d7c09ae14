"""`deepbatch serve` against the official `openai` client: real server processes, worker, PostgreSQL and
each broker. The README's walk-through, cancel, pagination, broken lines, unknown ids, keys that see only
their own batches, rate limits, two servers sharing one database, and output files that follow a requeue."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import sessionmaker

from schema.tables import RequestState
from tests.conftest import deepbatch
from tests.integration.api_server import created_key, new_key, write_batch_file
from worker.transitions import Failure, Success, Transitions

pytestmark = pytest.mark.integration


def wait_for_batch(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...] = ("completed",),
                   timeout: float = 180):
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}"
        time.sleep(0.5)
    return batch


@pytest.mark.parametrize("broker_url", ["redis", "rabbitmq"], indirect=True)
def test_the_openai_client_runs_a_batch_end_to_end(tmp_path: Path, api_env: dict, start_server, start_worker,
                                                   db_engine: Engine) -> None:
    """The README's walk-through, as written, with a broken line that ends in the error file."""
    client = start_server().client(new_key(api_env))
    start_worker()
    uploaded = client.files.create(file=write_batch_file(tmp_path / "prompts.jsonl", 30, broken_at=7).open("rb"),
                                   purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0 and uploaded.filename == "prompts.jsonl"
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"team": "search"})
    assert batch.status in ("in_progress", "completed") and batch.input_file_id == uploaded.id
    batch = wait_for_batch(client, batch.id)
    assert batch.request_counts.total == 30 and batch.request_counts.completed == 29
    assert batch.request_counts.failed == 1 and batch.metadata == {"team": "search"}

    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in output) == sorted(f"r{n}" for n in range(1, 31) if n != 7)
    assert all(line["response"]["status_code"] == 200 for line in output)
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert [(error["error"]["line"], error["error"]["code"]) for error in errors] == [(7, "invalid_json")]
    # A job of the API is a job of the CLI too.
    status = json.loads(deepbatch("status", batch.id, "--json", env=api_env).stdout)
    assert status["succeeded"] == 29


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_cancel_pagination_and_unknown_ids(tmp_path: Path, api_env: dict, start_server) -> None:
    client = start_server().client(new_key(api_env))
    uploaded = client.files.create(file=write_batch_file(tmp_path / "p.jsonl", 5).open("rb"), purpose="batch")
    created = [client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id for _ in range(3)]  # no worker: they wait

    cancelled = client.batches.cancel(created[0])
    assert cancelled.status in ("cancelling", "cancelled")
    cancelled = wait_for_batch(client, created[0], ("cancelled",), timeout=30)
    errors = client.files.content(cancelled.error_file_id).text.splitlines()
    assert {json.loads(line)["error"]["code"] for line in errors} == {"batch_cancelled"} and len(errors) == 5

    first = client.batches.list(limit=2)
    assert [batch.id for batch in first.data] == created[:0:-1] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert [batch.id for batch in second.data] == [created[0]] and not second.has_more

    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-does-not-exist")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_does_not_exist")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(uploaded.id)


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_keys_see_only_their_own_and_are_required(tmp_path: Path, api_env: dict, start_server,
                                                  db_engine: Engine) -> None:
    server = start_server()
    bob_key_id, bob_secret = created_key(api_env, "bob")
    alice, bob = server.client(new_key(api_env, "alice")), server.client(bob_secret)
    uploaded = alice.files.create(file=write_batch_file(tmp_path / "p.jsonl", 2).open("rb"), purpose="batch")
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    assert bob.batches.list().data == [] and [f.id for f in alice.files.list().data] == [uploaded.id]
    with pytest.raises(openai.AuthenticationError):
        server.client(None).batches.list()

    assert bob_key_id in deepbatch("keys", "list", env=api_env).stdout
    deepbatch("keys", "revoke", bob_key_id, env=api_env)
    with pytest.raises(openai.AuthenticationError):
        bob.batches.list()
    with db_engine.connect() as connection:
        events = set(connection.execute(text(
            "SELECT event FROM audit_events WHERE job_id IN (:k, :f)"), {"k": bob_key_id, "f": uploaded.id}).scalars())
    assert events == {"api_key_created", "api_key_revoked", "file_uploaded"}


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_rate_limits_answer_429_with_retry_after(tmp_path: Path, api_env: dict, start_server) -> None:
    server = start_server(DEEPBATCH_API_REQUESTS_PER_S="0.5", DEEPBATCH_API_BURST="3",
                          DEEPBATCH_API_MAX_QUEUED_LINES="8")
    key = new_key(api_env)
    headers = {"Authorization": f"Bearer {key}"}
    answers = [httpx.get(server.url + "/v1/batches", headers=headers) for _ in range(4)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
    assert int(answers[3].headers["retry-after"]) >= 1
    assert answers[3].json()["error"]["code"] == "rate_limit_exceeded"

    time.sleep(4)  # two tokens back
    client = server.client(key)
    uploaded = client.files.create(file=write_batch_file(tmp_path / "p.jsonl", 5).open("rb"), purpose="batch")
    client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(2)
    with pytest.raises(openai.RateLimitError, match="DEEPBATCH_API_MAX_QUEUED_LINES"):  # 5 queued + 5 > 8
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_two_servers_serve_the_same_batches(tmp_path: Path, api_env: dict, start_server, start_worker) -> None:
    key = new_key(api_env)
    first, second = start_server().client(key), start_server().client(key)
    start_worker()
    uploaded = first.files.create(file=write_batch_file(tmp_path / "p.jsonl", 4).open("rb"), purpose="batch")
    batch = first.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_for_batch(second, batch.id)
    assert second.files.content(done.output_file_id).text == first.files.content(done.output_file_id).text
    assert len(second.files.content(done.output_file_id).text.splitlines()) == 4


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_batch_files_follow_a_requeue_and_its_success(tmp_path: Path, api_env: dict, start_server, db_engine: Engine,
                                                      queue_name: str) -> None:
    """A dead request is in the error file; once requeued (`deepbatch dlq requeue`) and run, the same file
    ids hold the results as the database has them: the output file has its line, the error file is gone."""
    client = start_server().client(new_key(api_env))
    uploaded = client.files.create(file=write_batch_file(tmp_path / "p.jsonl", 2).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    worker = Transitions(sessionmaker(db_engine), "tests:1", timedelta(seconds=60), queue_name)  # as a worker would
    first, second = sorted(worker.claim_next(2), key=lambda claim: claim.line_no)
    worker.record([Success(first, "one", "stop", 3, 1)],
                  [Failure(second, RequestState.dead, "engine_unavailable", "device lost")], "tiny-deepseek-v3")

    ended = wait_for_batch(client, batch.id, ("completed", "failed"))
    assert (ended.request_counts.completed, ended.request_counts.failed) == (1, 1)
    output_id, error_id = ended.output_file_id, ended.error_file_id
    assert [json.loads(line)["custom_id"] for line in client.files.content(output_id).text.splitlines()] == ["r1"]
    assert [json.loads(line)["custom_id"] for line in client.files.content(error_id).text.splitlines()] == ["r2"]

    deepbatch("dlq", "requeue", "--job", batch.id, env=api_env)
    [again] = worker.claim_next(1)
    worker.record([Success(again, "two", "stop", 3, 1)], [], "tiny-deepseek-v3")
    # The output file is read before the batch is: reading it is enough to bring it up to date.
    output = [json.loads(line) for line in client.files.content(output_id).text.splitlines()]
    assert [(line["custom_id"], line["response"]["body"]["choices"][0]["message"]["content"]) for line in output] \
        == [("r1", "one"), ("r2", "two")]
    rerun = client.batches.retrieve(batch.id)
    assert (rerun.request_counts.completed, rerun.request_counts.failed) == (2, 0)
    assert rerun.output_file_id == output_id and rerun.error_file_id is None
    with pytest.raises(openai.NotFoundError):
        client.files.content(error_id)
