"""n > 1 end to end: a real worker answers each line with n choices (stored in results.choices beside the
first), the output file lists them in OpenAI's shape with usage counting every choice, seeded choices sample
on their own, and a greedy line's cache hit returns all its choices."""

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
    {"custom_id": "sampled", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 8, "temperature": 1.0,
              "seed": 3, "n": 4, "logprobs": True, "top_logprobs": 1}},
    {"custom_id": "greedy", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "n": 3, "logprobs": 1}},
]


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_n_choices_through_a_worker(tmp_path: Path, service_env: dict, start_worker, db_engine: Engine) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    worker = start_worker()

    def run() -> tuple[str, dict[str, dict]]:
        job_id = deepbatch("submit", str(prompts), env=service_env).stdout.strip()
        wait_until(lambda: job_progress(db_engine, job_id)["status"] == "completed", timeout=240,
                   message=f"job {job_id}; worker log:\n{worker.log_text()[-3000:]}")
        output = tmp_path / f"{job_id}.jsonl"
        deepbatch("results", job_id, "-o", str(output), env=service_env)
        return job_id, {line["custom_id"]: line["response"]["body"]
                        for line in map(json.loads, output.read_text().splitlines())}

    job_id, first = run()
    sampled = ChatCompletion.model_validate(first["sampled"])
    assert [choice.index for choice in sampled.choices] == [0, 1, 2, 3]
    assert len({choice.message.content for choice in sampled.choices}) > 1  # each sampled on its own
    tokens = [len(choice.logprobs.content) for choice in sampled.choices]
    assert sampled.usage.completion_tokens == sum(tokens) and all(0 < count <= 8 for count in tokens)
    for choice in sampled.choices:
        assert "".join(item.token for item in choice.logprobs.content) == choice.message.content

    greedy = Completion.model_validate(first["greedy"])
    assert [choice.index for choice in greedy.choices] == [0, 1, 2]
    assert len({choice.text for choice in greedy.choices}) == 1  # greedy: the same answer each time
    assert greedy.usage.completion_tokens == sum(len(choice.logprobs.tokens) for choice in greedy.choices)
    assert greedy.usage.prompt_tokens == first["greedy"]["usage"]["prompt_tokens"] > 0  # the prompt once

    with db_engine.connect() as connection:
        stored = dict(connection.execute(text(
            "SELECT r.custom_id, jsonb_array_length(s.choices) FROM results s JOIN requests r "
            "ON r.id = s.request_id WHERE r.job_id = :j"), {"j": job_id}).all())
    assert stored == {"sampled": 3, "greedy": 2}

    second_id, second = run()  # the greedy line from the cache, every choice with it
    assert job_progress(db_engine, second_id)["cache_hits"] == 1
    assert second["greedy"]["choices"] == first["greedy"]["choices"]
    assert second["greedy"]["usage"] == first["greedy"]["usage"]
