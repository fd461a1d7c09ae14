"""Writes a job's results and errors as OpenAI Batch output and error files, streamed in line order.

The files are binary streams: Postgres writes almost every line, and COPY's UTF-8 bytes are written as they
come (queries.export_lines), never decoded. Result text, and the token texts of log-probabilities, come back
exactly as the engine produced them (schema/stored_text.py restores what PostgreSQL could not hold: NUL, lone
surrogates); JSON escapes those characters, so every line stays valid JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from sqlalchemy.orm import Session

from producer.queries import EXPORT_ERRORS, EXPORT_RESULTS, export_lines
from schema.lines import output_line
from schema.logprobs import choices_hold_escapes, from_stored_logprobs, holds_escapes, restored_choices
from schema.stored_text import ESCAPE, from_stored


def write_results(session: Session, job_id: str, stream: IO[bytes]) -> int:
    """The output file: Postgres writes almost every line (queries.EXPORT_RESULTS); those that need
    Python (log-probabilities, further choices, escaped text) come as their columns, and are written here."""
    count = 0
    for row in export_lines(session, EXPORT_RESULTS, job_id):
        stream.write(row if row[0] == LINE_START else python_result_line(*json.loads(bytes(row))))
        count += 1
    return count


LINE_START = ord("{")  # of a line Postgres wrote; the columns for python_result_line are an array, "["


def python_result_line(request_id: int, custom_id: str, url: str, model: str, created: int, stored: str,
                       finish_reason: str, prompt_tokens: int, completion_tokens: int, logprobs: list[Any] | None,
                       choices: list[Any] | None) -> bytes:
    line = output_line(
        request_id=request_id, custom_id=custom_id, url=url, model=model, created=created,
        text=from_stored(stored), finish_reason=finish_reason, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, logprobs=from_stored_logprobs(logprobs),
        more_choices=restored_choices(choices),
    )
    # A restored lone surrogate cannot be written as UTF-8: such a line spells it as a JSON escape.
    escaped = ESCAPE in stored or holds_escapes(logprobs) or choices_hold_escapes(choices)
    return (json.dumps(line, ensure_ascii=escaped) + "\n").encode()


def write_errors(session: Session, job_id: str, stream: IO[bytes]) -> int:
    """The error file, every line as Postgres writes it (queries.EXPORT_ERRORS)."""
    count = 0
    for row in export_lines(session, EXPORT_ERRORS, job_id):
        stream.write(row)
        count += 1
    return count


def export_job(session: Session, job_id: str, results_path: Path, errors_path: Path | None) -> tuple[int, int]:
    """Write both files; returns (results written, errors written). The errors file is only made if needed."""
    with results_path.open("wb") as stream:
        results = write_results(session, job_id, stream)
    errors = 0
    if errors_path is not None:
        with errors_path.open("wb") as stream:
            errors = write_errors(session, job_id, stream)
        if errors == 0:
            errors_path.unlink()
    return results, errors
