"""Streams an input file line by line and validates each line.

Memory stays constant whatever the file size: one line at a time, each at most `max_line_bytes`
(a longer line is skipped to its end and reported, not loaded). Every problem becomes a `LineError`
for that line; nothing here aborts the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from schema.lines import LineError, RequestSpec, parse_line_fast, parse_line_reference


@dataclass(slots=True)
class ReadLine:
    """One input line: either a valid request or the error that rejects it."""

    line_no: int
    request: RequestSpec | None = None
    error: LineError | None = None
    end_offset: int = 0  # the file's byte offset just after this line (where a resumed submit reads on)


def any_string(value: Any, test: Callable[[str], bool]) -> bool:
    """Whether `test` holds for a string anywhere in a JSON-like value."""
    if isinstance(value, str):
        return test(value)
    if isinstance(value, dict):
        return any(any_string(item, test) for item in value.values())
    if isinstance(value, list):
        return any(any_string(item, test) for item in value)
    return False


def contains_nul(value: Any) -> bool:
    """Postgres text cannot hold NUL characters, so a request carrying one is rejected up front."""
    return any_string(value, lambda text: "\x00" in text)


def is_unencodable(text: str) -> bool:
    """An unpaired surrogate escape (`\\ud800`) decodes to a character UTF-8 cannot encode, nor Postgres store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def skip_to_line_end(stream: BinaryIO, chunk_bytes: int = 1 << 20) -> int:
    """Read past the rest of the line; returns how many bytes that was."""
    skipped = 0
    while True:
        chunk = stream.readline(chunk_bytes)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def unknown_model(request: RequestSpec, served_models: frozenset[str] | None) -> LineError | None:
    model = request.body.model
    if served_models is None or model is None or model in served_models:
        return None
    names = ", ".join(sorted(repr(name) for name in served_models))
    message = f"unknown model {model!r}: this deployment serves {names} (DEEPBATCH_MODEL_ALIASES adds names)"
    return LineError("unknown_model", message, request.custom_id)


def validate_line(raw: bytes, line_no: int, served_models: frozenset[str] | None = None) -> ReadLine:
    """One line → a request, or the error that rejects it. `served_models`: the names a line's `model`
    may give (None accepts any)."""
    request = parse_line_fast(raw, line_no)
    if request is None:
        outcome = diagnose_line(raw, line_no)
        if isinstance(outcome, ReadLine):
            return outcome
        request = outcome
    # NUL can only be written `\u0000` in valid JSON: a line without that text needs no search for it.
    if b"\\u0000" in raw and (contains_nul(request.body_json()) or "\x00" in request.custom_id):
        error = LineError("invalid_request", "NUL characters (\\u0000) are not supported", request.custom_id)
        return ReadLine(line_no, error=error)
    model_error = unknown_model(request, served_models)
    if model_error is not None:
        return ReadLine(line_no, error=model_error)
    return ReadLine(line_no, request=request)


def diagnose_line(raw: bytes, line_no: int) -> RequestSpec | ReadLine:
    """The lines the fast path does not take: the reference path's request, or the error naming the fault."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        reason = f"invalid UTF-8 at byte {error.start}"
        return ReadLine(line_no, error=LineError("invalid_encoding", reason))
    if not text.strip():
        return ReadLine(line_no, error=LineError("invalid_request", "empty line"))
    try:
        request = parse_line_reference(text, line_no)
    except LineError as error:
        return ReadLine(line_no, error=error)
    # Only `json.loads` lets these through (pydantic's parser refuses them), so only this path looks.
    if any_string(request.body_json(), is_unencodable) or is_unencodable(request.custom_id):
        reason = "unpaired surrogate escapes (\\ud800-\\udfff) are not valid text"
        return ReadLine(line_no, error=LineError("invalid_request", reason, request.custom_id))
    return request


def read_lines(stream: BinaryIO, max_line_bytes: int, served_models: frozenset[str] | None = None,
               first_line_no: int = 1, offset: int = 0) -> Iterator[ReadLine]:
    """Yield every line of `stream` (numbered from `first_line_no`; the stream at byte `offset`) as a
    request or an error, each with the offset after it."""
    line_no = first_line_no - 1
    while True:
        raw = stream.readline(max_line_bytes + 1)
        if not raw:
            return
        line_no += 1
        offset += len(raw)
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            offset += skip_to_line_end(stream)
            reason = f"line is longer than {max_line_bytes} bytes (DEEPBATCH_MAX_LINE_BYTES)"
            yield ReadLine(line_no, error=LineError("line_too_long", reason), end_offset=offset)
            continue
        read = validate_line(raw.rstrip(b"\r\n"), line_no, served_models)
        read.end_offset = offset  # set, not passed down: validate_line has many ways to make a ReadLine
        yield read


def read_file(path: Path, max_line_bytes: int, served_models: frozenset[str] | None = None,
              first_line_no: int = 1, offset: int = 0) -> Iterator[ReadLine]:
    """The file's lines from byte `offset`, where line `first_line_no` starts (a resumed submit)."""
    with path.open("rb") as stream:
        stream.seek(offset)
        yield from read_lines(stream, max_line_bytes, served_models, first_line_no, offset)
