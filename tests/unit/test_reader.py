"""Streaming and validating input files (pure logic)."""

from __future__ import annotations

import io

from producer.reader import read_lines


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
