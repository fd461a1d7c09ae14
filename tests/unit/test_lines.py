"""Input line parsing and output line shapes (pure logic)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schema.lines import CHAT_URL, COMPLETIONS_URL, LineError, error_line, output_line, parse_line


def test_plain_prompt_defaults_custom_id_to_the_line_number() -> None:
    spec = parse_line('{"prompt": "hello", "max_tokens": 3}', line_no=42)
    assert (spec.custom_id, spec.url, spec.body_json()) == ("42", COMPLETIONS_URL, {"prompt": "hello", "max_tokens": 3})


def test_plain_messages_become_a_chat_request() -> None:
    spec = parse_line('{"custom_id": "a", "messages": [{"role": "user", "content": "hi"}]}', 1)
    assert spec.url == CHAT_URL and spec.custom_id == "a"


def test_openai_batch_line() -> None:
    line = {"custom_id": "r1", "method": "POST", "url": CHAT_URL,
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                     "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["\n"]}}
    spec = parse_line(json.dumps(line), 1)
    assert spec.body_json()["stop"] == ["\n"] and spec.body.stop_strings == ["\n"]


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("{", "invalid_json", "invalid JSON"),
        ("[1, 2]", "invalid_request", "JSON object"),
        ('{"custom_id": "x"}', "invalid_request", "exactly one of 'prompt' or 'messages'"),
        ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "invalid_request", "exactly one"),
        ('{"prompt": 5}', "invalid_request", "prompt"),
        ('{"prompt": "a", "temperature": 3}', "invalid_request", "temperature"),
        ('{"prompt": "a", "max_tokens": 0}', "invalid_request", "max_tokens"),
        ('{"prompt": "a", "tools": []}', "invalid_request", "'tools' is not supported"),
        ('{"prompt": "a", "n": 17}', "invalid_request", "n"),
        ('{"custom_id": "r", "method": "POST", "url": "/v1/embeddings", "body": {}}', "invalid_request", "url"),
        ('{"custom_id": "r", "method": "GET", "url": "/v1/completions", "body": {"prompt": "a"}}',
         "invalid_request", "method"),
        ('{"custom_id": "r", "method": "POST", "url": "/v1/completions", "body": {"prompt": ["a"]}}',
         "invalid_request", "body.prompt"),
    ],
)
def test_invalid_lines_name_their_fault(text: str, code: str, fragment: str) -> None:
    with pytest.raises(LineError) as raised:
        parse_line(text, 1)
    assert raised.value.code == code and fragment in raised.value.message


def test_error_keeps_the_custom_id_it_could_read() -> None:
    with pytest.raises(LineError) as raised:
        parse_line('{"custom_id": "keep-me", "method": "POST", "url": "/v1/completions", "body": {}}', 1)
    assert raised.value.custom_id == "keep-me"


@given(st.text(max_size=300))
def test_any_text_is_a_request_or_a_line_error(text: str) -> None:
    try:
        parse_line(text, 1)
    except LineError:
        pass


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(
                        st.sampled_from(["prompt", "messages", "custom_id", "body", "url", "method", "max_tokens",
                                         "role", "content", "temperature"]), children, max_size=4),
                    max_leaves=12))
def test_any_json_document_is_a_request_or_a_line_error(document: object) -> None:
    try:
        parse_line(json.dumps(document), 1)
    except LineError:
        pass


def test_output_line_follows_the_openai_batch_format() -> None:
    line = output_line(7, "c", CHAT_URL, "m", 0, "Hi.", "stop", 10, 2)
    body = line["response"]["body"]
    assert line["custom_id"] == "c" and line["error"] is None
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi."}
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    completion = output_line(7, "c", COMPLETIONS_URL, "m", 0, "Hi.", "length", 1, 1)["response"]["body"]
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == "Hi."


def test_error_line_names_the_input_line() -> None:
    line = error_line(3, None, 17, "invalid_json", "line 17: invalid JSON")
    assert line["response"] is None and line["error"]["line"] == 17
