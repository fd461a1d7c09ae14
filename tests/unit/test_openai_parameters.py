"""OpenAI parameters: each one DeepBatch takes reaches the engine's SamplingParams and the result cache key;
each one it does not take fails the line naming it (README "OpenAI parameters")."""

from __future__ import annotations

import json

import pytest

from schema.cache import result_cache_key
from schema.lines import REFUSED_PARAMETERS, LineError, parse_line
from worker.engine.types import GrammarRequest
from worker.sampling import sampling_params

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
          "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Where?"}]


def chat_line(**body) -> str:
    return json.dumps({"custom_id": "r", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": MESSAGES, **body}})


def test_penalties_bias_and_response_format_reach_the_engine():
    spec = parse_line(chat_line(presence_penalty=0.5, frequency_penalty=-1, logit_bias={"7": -100, "3": 2},
                                response_format=RESPONSE_FORMAT), 1)
    sampling = sampling_params(spec.body, None)
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.0)
    assert sampling.logit_bias == ((3, 2.0), (7, -100.0))
    assert sampling.grammar == GrammarRequest("json_schema", json.dumps(SCHEMA, sort_keys=True))
    assert spec.body_json()["response_format"] == RESPONSE_FORMAT  # stored as OpenAI spells it


@pytest.mark.parametrize("form", ["plain", "batch"])
def test_json_object_and_text_formats(form):
    for kind, grammar in (("json_object", GrammarRequest("json_object")), ("text", None)):
        line = (json.dumps({"messages": MESSAGES, "response_format": {"type": kind}}) if form == "plain"
                else chat_line(response_format={"type": kind}))
        assert sampling_params(parse_line(line, 1).body, None).grammar == grammar


@pytest.mark.parametrize("name", sorted(REFUSED_PARAMETERS))
def test_every_refused_parameter_is_refused_by_name(name):
    value = 2 if name == "n" else {"type": "json_object"} if name == "response_format" else True
    completion = json.dumps({"custom_id": "r", "method": "POST", "url": "/v1/completions",
                             "body": {"prompt": "a", name: value}})
    for line in (completion, json.dumps({"prompt": "a", name: value})):
        with pytest.raises(LineError) as raised:
            parse_line(line, 1)
        assert raised.value.code == "invalid_request"
        assert f"'{name}'" in raised.value.message or f"{name}=" in raised.value.message
        assert "not supported by DeepBatch" in raised.value.message


def test_an_unknown_key_is_refused_as_an_unknown_parameter():
    with pytest.raises(LineError, match="unknown parameter 'temprature'"):
        parse_line(json.dumps({"prompt": "a", "temprature": 0}), 1)


@pytest.mark.parametrize("body, fragment", [
    ({"logit_bias": {"x": 1}}, "token ids"),
    ({"logit_bias": {"1": -101}}, "logit_bias.1"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strnig"}}}},
     "cannot be compiled into a grammar: Unsupported type \"strnig\""),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_values_are_line_errors_at_submit(body, fragment):
    with pytest.raises(LineError) as raised:
        parse_line(chat_line(**body), 1)
    assert raised.value.code == "invalid_request" and fragment in raised.value.message


def test_the_cache_key_tells_the_new_parameters_apart():
    base = {"temperature": 0}
    variants = [{}, {"presence_penalty": 1}, {"frequency_penalty": 1}, {"logit_bias": {"5": 1}},
                {"logit_bias": {"5": 2}}, {"response_format": {"type": "json_object"}},
                {"response_format": RESPONSE_FORMAT}]
    keys = {result_cache_key("m", "/v1/chat/completions", parse_line(chat_line(**base, **v), 1).body, "cli")
            for v in variants}
    assert len(keys) == len(variants)
