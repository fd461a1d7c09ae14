"""Writes a job's results and errors as OpenAI Batch output and error files, streamed in line order.

Result text, and the token texts of log-probabilities, come back exactly as the engine produced them
(schema/stored_text.py restores what PostgreSQL could not hold: NUL, lone surrogates); JSON escapes those
characters, so every line stays valid JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from sqlalchemy.orm import Session

from producer.queries import export_rows
from schema.lines import error_line, output_line
from schema.logprobs import choices_hold_escapes, from_stored_logprobs, holds_escapes, restored_choices
from schema.stored_text import ESCAPE, from_stored
from schema.tables import RequestState

ERROR_STATES = (RequestState.failed, RequestState.dead, RequestState.cancelled, RequestState.expired)
# OpenAI Batch's codes for requests a job never ran.
UNRUN_CODES = {RequestState.cancelled: "batch_cancelled", RequestState.expired: "batch_expired"}


def write_results(session: Session, job_id: str, stream: IO[str]) -> int:
    count = 0
    for row in export_rows(session, job_id, [RequestState.succeeded]):
        stored = row["text"]
        line = output_line(
            request_id=row["id"], custom_id=row["custom_id"], url=row["url"], model=row["model"],
            created=int(row["created_at"].timestamp()), text=from_stored(stored), finish_reason=row["finish_reason"],
            prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"],
            logprobs=from_stored_logprobs(row["logprobs"]), more_choices=restored_choices(row["choices"]),
        )
        # A restored lone surrogate cannot be written as UTF-8: such a line spells it as a JSON escape.
        escaped = ESCAPE in stored or holds_escapes(row["logprobs"]) or choices_hold_escapes(row["choices"])
        stream.write(json.dumps(line, ensure_ascii=escaped) + "\n")
        count += 1
    return count


def write_errors(session: Session, job_id: str, stream: IO[str]) -> int:
    count = 0
    for row in export_rows(session, job_id, ERROR_STATES):
        code = UNRUN_CODES.get(row["state"]) or row["error_code"] or row["state"].value
        message = row["error_message"] or f"the job was {row['state'].value} before this request ran"
        line = error_line(row["id"], row["custom_id"], row["line_no"], code, message)
        stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        count += 1
    return count


def export_job(session: Session, job_id: str, results_path: Path, errors_path: Path | None) -> tuple[int, int]:
    """Write both files; returns (results written, errors written). The errors file is only made if needed."""
    with results_path.open("w", encoding="utf-8") as stream:
        results = write_results(session, job_id, stream)
    errors = 0
    if errors_path is not None:
        with errors_path.open("w", encoding="utf-8") as stream:
            errors = write_errors(session, job_id, stream)
        if errors == 0:
            errors_path.unlink()
    return results, errors
