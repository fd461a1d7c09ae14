"""Structured output with a real instruct model (the packaged SmolLM2-135M-Instruct, CPU): twenty extraction
lines with one json_schema (a nested object, an enum, an array, required fields, additionalProperties false)
go through the line parser and the worker's conversion into the engine, batched with unconstrained requests,
and every output parses and validates against the schema (jsonschema), finishing with `stop`; json_object
lines give JSON objects. The same file reaches the engine whether it came by the CLI or the HTTP API: both
read it through schema/lines.py."""

from __future__ import annotations

import json

import jsonschema
import pytest

from schema.lines import parse_line
from worker.engine.engine import LLMEngine
from worker.engine.tokenizer import PromptEncoder
from worker.engine.types import EngineConfig
from worker.sampling import sampling_params

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["person", "company", "city"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "location": {
            "type": "object",
            "properties": {"country": {"type": "string", "maxLength": 30}, "year": {"type": "integer"}},
            "required": ["country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "tags", "location"],
    "additionalProperties": False,
}
TEXTS = [
    "Marie Curie was a physicist born in Poland in 1867.",
    "Apple is a company founded in the United States in 1976.",
    "Paris is the capital city of France.",
    "Albert Einstein, a physicist, was born in Germany in 1879.",
    "Toyota is a car company from Japan, founded in 1937.",
    "Tokyo is a large city in Japan.",
    "Ada Lovelace was a mathematician born in England in 1815.",
    "Nokia is a telecom company from Finland founded in 1865.",
    "Cairo is a city in Egypt on the Nile.",
    "Frida Kahlo was a painter born in Mexico in 1907.",
    "Samsung is an electronics company from South Korea, founded in 1938.",
    "Sydney is a coastal city in Australia.",
    "Nelson Mandela was a leader born in South Africa in 1918.",
    "IKEA is a furniture company founded in Sweden in 1943.",
    "Rome is an ancient city in Italy.",
    "Pablo Picasso was an artist born in Spain in 1881.",
    "Nestle is a food company from Switzerland founded in 1866.",
    "Toronto is a city in Canada.",
    "Wolfgang Mozart was a composer born in Austria in 1756.",
    "Lego is a toy company founded in Denmark in 1932.",
]
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "entity", "schema": SCHEMA, "strict": True}}


def chat_line(custom_id: str, content: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": [{"role": "user", "content": content}], **body}})


@pytest.fixture(scope="module")
def engine():
    with LLMEngine(EngineConfig(model="smollm2-135m-instruct", device="cpu", max_wait_ms=20)) as engine:
        yield engine


def run_lines(engine: LLMEngine, lines: list[str]):
    specs = [parse_line(line, number) for number, line in enumerate(lines, 1)]
    encoder = PromptEncoder(engine.tokenizer)
    prompts = [encoder.encode_chat(spec.body.prompt_input()) for spec in specs]
    return engine.generate(prompts, [sampling_params(spec.body, None) for spec in specs])


def test_twenty_extractions_parse_and_validate_against_their_schema(engine):
    instruction = "Extract the entity as JSON with name, kind, tags and location (country, year).\n\n"
    lines = [chat_line(f"x{index}", instruction + text, temperature=0, max_tokens=120,
                       response_format=RESPONSE_FORMAT) for index, text in enumerate(TEXTS)]
    lines.append(chat_line("free", "Say hello.", temperature=0, max_tokens=8))  # unconstrained, same batch
    completions = run_lines(engine, lines)
    for text, completion in zip(TEXTS, completions[:-1]):
        assert completion.finish_reason == "stop", (text, completion.text)
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert not completions[-1].text.lstrip().startswith("{")
    # Extracted, not just shaped: most countries the model names are the text's own.
    countries = [json.loads(completion.text)["location"]["country"] for completion in completions[:-1]]
    assert sum(country in text for country, text in zip(countries, TEXTS)) >= 10, countries


def test_json_object_lines_give_json_objects(engine):
    asks = ['Reply with a JSON object with the keys "name" and "age" for Bob, aged 30.',
            'Reply with a JSON object with the keys "city" and "country" for Paris.']
    lines = [chat_line(f"o{index}", ask, temperature=0, max_tokens=64, response_format={"type": "json_object"})
             for index, ask in enumerate(asks)]
    for completion in run_lines(engine, lines):
        assert completion.finish_reason == "stop", completion.text
        assert isinstance(json.loads(completion.text), dict)


def test_a_constrained_output_cut_by_max_tokens_says_length(engine):
    (completion,) = run_lines(engine, [chat_line("cut", "Extract: " + TEXTS[0], temperature=0, max_tokens=5,
                                                 response_format=RESPONSE_FORMAT)])
    assert completion.finish_reason == "length" and completion.completion_tokens == 5
