"""Log-probabilities end to end: lines that ask for them, run by a real worker, stored in results.logprobs and
written in OpenAI's output shapes (the openai client's own types validate them); a cache hit returns them too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from sqlalchemy import Engine, text

from tests.conftest import deepbatch, job_progress, wait_until

pytestmark = pytest.mark.integration

LINES = [
    {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0,
              "logprobs": True, "top_logprobs": 3}},
    {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "logprobs": 2}},
    {"custom_id": "plain", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}},
]


def check_chat(body: dict) -> None:
    choice = ChatCompletion.model_validate(body).choices[0]
    content = choice.logprobs.content
    assert len(content) == body["usage"]["completion_tokens"] > 0
    assert "".join(item.token for item in content) == choice.message.content
    for item in content:
        values = [top.logprob for top in item.top_logprobs]
        assert len(item.top_logprobs) == 3 and values == sorted(values, reverse=True)
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == item.logprob  # greedy
        assert item.bytes == list(item.token.encode()) and item.logprob <= 0


def check_completion(body: dict) -> None:
    choice = Completion.model_validate(body).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == body["usage"]["completion_tokens"] > 0
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 3 and top[token] == logprob  # the 2 likeliest, and the chosen one
        assert max(top.values()) == logprob  # greedy: the chosen token is the likeliest
        assert list(top.values()) == sorted(top.values(), reverse=True)


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_logprobs_through_a_worker(tmp_path: Path, service_env: dict, start_worker, db_engine: Engine) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    worker = start_worker()

    def run() -> dict[str, dict]:
        job_id = deepbatch("submit", str(prompts), env=service_env).stdout.strip()
        wait_until(lambda: job_progress(db_engine, job_id)["status"] == "completed", timeout=240,
                   message=f"job {job_id}; worker log:\n{worker.log_text()[-3000:]}")
        output = tmp_path / f"{job_id}.jsonl"
        deepbatch("results", job_id, "-o", str(output), env=service_env)
        return {line["custom_id"]: line["response"]["body"] | {"job_id": job_id}
                for line in map(json.loads, output.read_text().splitlines())}

    first = run()
    check_chat(first["chat"])
    check_completion(first["completion"])
    assert first["plain"]["choices"][0]["logprobs"] is None
    with db_engine.connect() as connection:
        stored = dict(connection.execute(text(
            "SELECT r.custom_id, s.logprobs IS NOT NULL FROM results s JOIN requests r ON r.id = s.request_id "
            "WHERE r.job_id = :j"), {"j": first["chat"]["job_id"]}).all())
    assert stored == {"chat": True, "completion": True, "plain": False}

    second = run()  # every line greedy: all three answered from the cache, log-probabilities included
    assert job_progress(db_engine, second["chat"]["job_id"])["cache_hits"] == 3
    for custom_id in ("chat", "completion", "plain"):
        assert second[custom_id]["choices"] == first[custom_id]["choices"]
