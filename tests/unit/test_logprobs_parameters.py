"""Log-probabilities as lines ask for them (chat's logprobs/top_logprobs, completions' logprobs), as the engine's
SamplingParams, in the result cache key, as results.logprobs stores them and in OpenAI's output shapes."""

from __future__ import annotations

import json

import pytest

from schema.cache import result_cache_key
from schema.lines import LineError, output_line, parse_line
from schema.logprobs import from_stored_logprobs, holds_escapes, to_stored_logprobs
from worker.sampling import sampling_params
from worker.token_texts import TokenTexts

MESSAGES = [{"role": "user", "content": "Hi"}]


def chat_line(**body) -> str:
    return json.dumps({"custom_id": "r", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": MESSAGES, "temperature": 0, **body}})


def completion_line(**body) -> str:
    return json.dumps({"custom_id": "r", "method": "POST", "url": "/v1/completions",
                       "body": {"prompt": "Hi", "temperature": 0, **body}})


@pytest.mark.parametrize("line, expected", [
    (chat_line(), None),
    (chat_line(logprobs=False), None),
    (chat_line(logprobs=True), 0),
    (chat_line(logprobs=True, top_logprobs=3), 3),
    (chat_line(logprobs=True, top_logprobs=20), 20),
    (json.dumps({"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}), 2),
    (completion_line(), None),
    (completion_line(logprobs=0), 0),
    (completion_line(logprobs=5), 5),
    (json.dumps({"prompt": "Hi", "logprobs": 4}), 4),
])
def test_logprobs_reach_the_engine(line, expected):
    assert sampling_params(parse_line(line, 1).body, None).logprobs == expected


@pytest.mark.parametrize("line, fragment", [
    (chat_line(top_logprobs=3), "top_logprobs requires logprobs: true"),
    (chat_line(logprobs=False, top_logprobs=3), "top_logprobs requires logprobs: true"),
    (chat_line(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat_line(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (chat_line(logprobs=3), "logprobs"),
    (json.dumps({"messages": MESSAGES, "top_logprobs": 2}), "top_logprobs requires logprobs: true"),
    (completion_line(logprobs=6), "logprobs"),
    (completion_line(logprobs=True), "logprobs"),
    (completion_line(top_logprobs=2), "unknown parameter 'top_logprobs'"),
    (json.dumps({"prompt": "Hi", "logprobs": True}), "logprobs"),
    (json.dumps({"prompt": "Hi", "top_logprobs": 1}), "unknown parameter 'top_logprobs'"),
])
def test_bad_logprobs_are_line_errors(line, fragment):
    with pytest.raises(LineError) as raised:
        parse_line(line, 1)
    assert raised.value.code == "invalid_request" and fragment in raised.value.message


def test_the_cache_key_tells_logprobs_apart():
    lines = [chat_line(), chat_line(logprobs=True), chat_line(logprobs=True, top_logprobs=2),
             chat_line(logprobs=True, top_logprobs=3)]
    keys = {result_cache_key("m", "/v1/chat/completions", parse_line(line, 1).body, "cli") for line in lines}
    completions = [completion_line(), completion_line(logprobs=0), completion_line(logprobs=2)]
    keys |= {result_cache_key("m", "/v1/completions", parse_line(line, 1).body, "cli") for line in completions}
    assert None not in keys and len(keys) == len(lines) + len(completions)


class FakeEncoder:
    PIECES = {1: b"Hel", 2: b"lo", 3: b"\x00", 4: b"\xe2\x82", 5: b"\xac", 6: b" world"}

    def token_bytes(self, token_id: int) -> bytes:
        return self.PIECES.get(token_id, b"")


ENGINE_LOGPROBS = [
    (1, -0.1, [(1, -0.1), (2, -2.5)]),
    (3, -0.5, [(3, -0.5), (6, float("-inf"))]),
    (4, -1.0, [(4, -1.0)]),
    (5, -0.2, [(5, -0.2), (1, -3.0)]),
    (2, -4.0, [(1, -0.3), (6, -1.5)]),  # sampled outside its top list
]


def test_entries_are_stored_escaped_and_read_back_exact():
    entries = TokenTexts(FakeEncoder()).entries(ENGINE_LOGPROBS)
    assert entries[0] == ["Hel", -0.1, None, [["Hel", -0.1, None], ["lo", -2.5, None]]]
    assert entries[1][3][1] == [" world", -9999.0, None]  # JSON has no infinity: OpenAI's value
    assert entries[2][:3] == ["\ufffd", -1.0, [0xE2, 0x82]]  # a partial character keeps its bytes
    stored = to_stored_logprobs(entries)
    assert "\x00" not in json.dumps(stored, ensure_ascii=False) and holds_escapes(stored)
    assert from_stored_logprobs(json.loads(json.dumps(stored))) == entries
    assert not holds_escapes(to_stored_logprobs([entries[0]])) and not holds_escapes(None)


def choice(url: str, logprobs) -> dict:
    line = output_line(7, "r", url, "m", 0, "Hel\x00€lo", "length", 3, 5, logprobs)
    return line["response"]["body"]["choices"][0]


def test_chat_output_shape():
    entries = TokenTexts(FakeEncoder()).entries(ENGINE_LOGPROBS)
    content = choice("/v1/chat/completions", entries)["logprobs"]["content"]
    assert [item["token"] for item in content] == ["Hel", "\x00", "\ufffd", "\ufffd", "lo"]
    assert content[0] == {"token": "Hel", "logprob": -0.1, "bytes": [72, 101, 108], "top_logprobs": [
        {"token": "Hel", "logprob": -0.1, "bytes": [72, 101, 108]}, {"token": "lo", "logprob": -2.5, "bytes": [108, 111]}]}
    assert content[1]["bytes"] == [0] and content[2]["bytes"] == [0xE2, 0x82] and content[3]["bytes"] == [0xAC]
    assert b"".join(bytes(item["bytes"]) for item in content).decode() == "Hel\x00€lo"
    assert choice("/v1/chat/completions", None)["logprobs"] is None


def test_completions_output_shape():
    entries = TokenTexts(FakeEncoder()).entries(ENGINE_LOGPROBS)
    logprobs = choice("/v1/completions", entries)["logprobs"]
    assert logprobs["tokens"] == ["Hel", "\x00", "\ufffd", "\ufffd", "lo"]
    assert logprobs["token_logprobs"] == [-0.1, -0.5, -1.0, -0.2, -4.0]
    assert logprobs["top_logprobs"][0] == {"Hel": -0.1, "lo": -2.5}
    assert logprobs["top_logprobs"][4] == {"Hel": -0.3, " world": -1.5, "lo": -4.0}  # the chosen one added
    assert logprobs["text_offset"] == [0, 3, 4, 4, 5]  # "€" counts once whole
    assert choice("/v1/completions", None)["logprobs"] is None
