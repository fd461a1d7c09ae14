"""Streaming and validating input files (pure logic)."""

from __future__ import annotations

import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from producer.reader import read_lines
from schema.lines import CHAT_URL, COMPLETIONS_URL, parse_line_fast, parse_line_reference


def read(data: bytes, max_line_bytes: int = 1000) -> list:
    return list(read_lines(io.BytesIO(data), max_line_bytes))


def test_lines_are_numbered_from_one_and_validated() -> None:
    lines = read(b'{"prompt": "a"}\n{bad\n{"prompt": "c"}')
    assert [line.line_no for line in lines] == [1, 2, 3]
    assert lines[0].request and lines[1].error and lines[2].request
    assert lines[2].request.custom_id == "3"


def test_empty_lines_and_crlf() -> None:
    lines = read(b'{"prompt": "a"}\r\n\n   \n')
    assert lines[0].request is not None
    assert [line.error.message for line in lines[1:]] == ["empty line", "empty line"]


def test_invalid_utf8_is_reported_with_its_byte() -> None:
    (line,) = read(b'{"prompt": "\xff"}\n')
    assert line.error.code == "invalid_encoding" and "byte 12" in line.error.message


def test_nul_characters_are_rejected() -> None:
    (line,) = read(b'{"prompt": "a\\u0000b"}\n')
    assert line.error is not None and "NUL" in line.error.message


def test_a_line_over_the_limit_is_skipped_whole_and_the_next_line_still_read() -> None:
    long_line = b'{"prompt": "' + b"x" * 5000 + b'"}\n'
    lines = read(long_line + b'{"prompt": "after"}\n', max_line_bytes=100)
    assert lines[0].error.code == "line_too_long" and lines[0].line_no == 1
    assert lines[1].request is not None and lines[1].line_no == 2


def test_an_empty_file_has_no_lines() -> None:
    assert read(b"") == []


def test_a_model_the_deployment_does_not_serve_is_named() -> None:
    served = frozenset({"tiny-deepseek-v3", "deepseek-chat"})
    lines = list(read_lines(io.BytesIO(b'{"prompt": "a", "model": "deepseek-chat"}\n{"prompt": "b", "model": "gpt-4o"}\n'
                                       b'{"prompt": "c"}\n'), 1000, served))
    assert lines[0].request is not None and lines[2].request is not None
    assert lines[1].error.code == "unknown_model" and "'gpt-4o'" in lines[1].error.message


def test_an_unpaired_surrogate_escape_is_rejected_not_stored() -> None:
    (line,) = read(b'{"custom_id": "s", "prompt": "a\\ud800b"}\n')
    assert line.error.code == "invalid_request" and "surrogate" in line.error.message
    assert line.error.custom_id == "s"
    (paired,) = read(b'{"prompt": "\\ud83d\\ude00"}\n')  # a pair is one character, and fine
    assert paired.request.body.prompt == "\U0001F600"


def test_the_text_backslash_u0000_is_not_a_nul() -> None:
    (line,) = read(b'{"prompt": "C:\\\\u0000\\\\path"}\n')
    assert line.request is not None and line.request.body.prompt == "C:\\u0000\\path"


# The fast path (pydantic's JSON parser, one model per form) must accept only what the reference path
# (json.loads, then the models) accepts, as the same request; anything else it leaves to the reference.
ANY_VALUE = st.sampled_from(["POST", "GET", CHAT_URL, COMPLETIONS_URL, "/v1/embeddings", "user", "bot", "",
                             "\x00", 0, 1, 2, -1, 0.5, 1.0, 3.5, True, False, None, [], {}, ["\n"]])


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` seven times in eight, else a value of the wrong type or out of range."""
    return st.one_of(*[valid] * 7, ANY_VALUE)


MESSAGE = st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "system", "assistant"])),
                                 "content": mostly(st.text(max_size=5))}, optional={"name": mostly(st.text())})
SAMPLING = {"model": mostly(st.text(max_size=3)), "max_tokens": mostly(st.integers(0, 9)),
            "temperature": mostly(st.integers(0, 2) | st.floats(0, 2)), "top_p": mostly(st.floats(0, 1)),
            "top_k": mostly(st.integers(0, 2)), "seed": mostly(st.integers()), "n": mostly(st.just(1)),
            "stream": mostly(st.just(False)), "user": mostly(st.text(max_size=3)),
            "stop": mostly(st.text(max_size=3) | st.lists(st.text(max_size=2), max_size=5))}
CUSTOM_ID = mostly(st.text(min_size=1, max_size=3))


def body_with(field: str, value: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries({field: mostly(value)}, optional=SAMPLING)


PROMPT_BODY, CHAT_BODY = body_with("prompt", st.text(max_size=5)), body_with("messages", st.lists(MESSAGE, max_size=2))
PLAIN_LINE = st.builds(lambda body, custom_id: {**body, **custom_id}, PROMPT_BODY | CHAT_BODY,
                       st.fixed_dictionaries({}, optional={"custom_id": CUSTOM_ID}))
BATCH_LINE = st.one_of(*[
    st.fixed_dictionaries({"custom_id": CUSTOM_ID, "method": mostly(st.just("POST")), "url": mostly(st.just(url)),
                           "body": mostly(body)})
    for url, body in ((CHAT_URL, CHAT_BODY), (COMPLETIONS_URL, PROMPT_BODY))])


@settings(max_examples=500)
@given(PLAIN_LINE | BATCH_LINE, st.booleans())
def test_the_fast_path_agrees_with_the_reference_path(document: dict, ensure_ascii: bool) -> None:
    text = json.dumps(document, ensure_ascii=ensure_ascii)
    fast = parse_line_fast(text.encode(), 3)
    if fast is None:
        return
    reference = parse_line_reference(text, 3)
    assert fast == reference and fast.body_json() == reference.body_json()
    assert type(fast.body) is type(reference.body) and fast.body.model_fields_set == reference.body.model_fields_set
