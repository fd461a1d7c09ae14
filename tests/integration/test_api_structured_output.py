"""Structured output through the HTTP API: a file of json_schema lines sent with the official `openai` client to
`deepbatch serve`, run by a worker serving the packaged SmolLM2-135M-Instruct; every output in the batch's
output file parses and validates against its line's schema (jsonschema), greedy and sampled lines alike, and
a line that also asks for log-probabilities gets them in OpenAI's shape beside its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from openai.types.chat import ChatCompletion

from tests.integration.api_server import new_key
from tests.integration.test_api import wait_for_batch

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["person", "company", "city"]},
        "country": {"type": "string", "maxLength": 30},
        "year": {"type": "integer"},
    },
    "required": ["name", "kind", "country"],
    "additionalProperties": False,
}
FLAGS = {"type": "object", "properties": {"is_city": {"type": "boolean"}, "tags": {
    "type": "array", "items": {"enum": ["old", "large", "coastal"]}, "maxItems": 3}},
    "required": ["is_city", "tags"], "additionalProperties": False}
TEXTS = [
    "Marie Curie was a physicist born in Poland in 1867.",
    "Apple is a company founded in the United States in 1976.",
    "Paris is the capital city of France.",
    "Toyota is a car company from Japan, founded in 1937.",
]


def line(custom_id: str, content: str, schema: dict, **body) -> str:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": MODEL, "messages": [{"role": "user", "content": content}],
                                "max_tokens": 96, "response_format": response_format, **body}})


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_json_schema_lines_through_the_api_validate(tmp_path: Path, api_env: dict, start_server,
                                                     start_worker) -> None:
    client = start_server(DEEPBATCH_MODEL=MODEL).client(new_key(api_env))
    start_worker(DEEPBATCH_MODEL=MODEL)
    instruction = "Extract the entity as JSON with name, kind, country and year.\n\n"
    lines = [line(f"greedy-{n}", instruction + text, SCHEMA, temperature=0) for n, text in enumerate(TEXTS)]
    lines += [line(f"sampled-{n}", instruction + text, SCHEMA, temperature=0.8, seed=n)
              for n, text in enumerate(TEXTS[:2])]
    lines.append(line("flags", "Describe Sydney as JSON.", FLAGS, temperature=0, logprobs=True, top_logprobs=2))
    schemas = {json.loads(text)["custom_id"]: json.loads(text)["body"]["response_format"]["json_schema"]["schema"]
               for text in lines}
    prompts = tmp_path / "structured.jsonl"
    prompts.write_text("\n".join(lines) + "\n")

    uploaded = client.files.create(file=prompts.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = wait_for_batch(client, batch.id, timeout=300)
    assert batch.request_counts.completed == len(lines) and batch.request_counts.failed == 0
    assert batch.error_file_id is None

    output = [json.loads(text) for text in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(item["custom_id"] for item in output) == sorted(schemas)
    for item in output:
        completion = ChatCompletion.model_validate(item["response"]["body"])
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (item["custom_id"], choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schemas[item["custom_id"]])
        if item["custom_id"] == "flags":
            tokens = choice.logprobs.content
            assert "".join(token.token for token in tokens) == choice.message.content
            # Greedy: the chosen token heads its list; where the grammar allows one token, the list is that one.
            assert all(1 <= len(token.top_logprobs) <= 2 and token.top_logprobs[0].token == token.token
                       for token in tokens)
            assert any(len(token.top_logprobs) == 1 and token.logprob == 0 for token in tokens)
        else:
            assert choice.logprobs is None
