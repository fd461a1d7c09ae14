"""The export's lines, written by Postgres (producer/queries.py: EXPORT_RESULTS, EXPORT_ERRORS) and sent by COPY,
are byte for byte what schema/lines.py's output_line and error_line give through json.dumps, for texts that
test JSON's escaping and COPY's CSV quoting: quotes, backslashes, every control character (COPY's delimiter
and quote among them), DEL, U+2028, non-BMP characters, NUL and a lone surrogate (stored escaped: written by
Python), log-probabilities and further choices (Python too), each in its place among the lines Postgres
writes."""

from __future__ import annotations

import io
import json

import pytest
from sqlalchemy import Engine, insert, text
from sqlalchemy.orm import sessionmaker

from producer.export import write_errors, write_results
from producer.queries import create_job
from schema.lines import CHAT_URL, COMPLETIONS_URL, error_line, output_line
from schema.logprobs import stored_choice, to_stored_logprobs
from schema.stored_text import to_stored
from schema.tables import Request, RequestState, Result

pytestmark = pytest.mark.integration

TEXTS = [
    "plain", "", 'quote " and backslash \\ and slash /', "".join(chr(code) for code in range(32)) + "\x7f",
    "é 中文 \u2028 \u2029 😀 \U0010fffd", "NUL \x00 inside", "lone \ud800 surrogate", "\uffff escape itself",
    "tab\tnew\nline\rcr", "\x01delimiter\x02quote\x01", "\n", '"', "\\.",
]
LOGPROBS_AT = len(TEXTS)  # of the results: the one with log-probabilities
CHOICES_AT = len(TEXTS) + 1  # and the one with a further choice (n = 2), holding a NUL
ERRORS = [  # state, error_code, error_message
    (RequestState.failed, "invalid_json", 'line 3: bad "json" \\ \x01'),
    (RequestState.dead, "engine_error", "é 😀 \u2028"),
    (RequestState.cancelled, None, "the job was cancelled"),
    (RequestState.expired, None, None),
    (RequestState.failed, "", ""),
]


def test_postgres_writes_the_lines_python_would(db_engine: Engine) -> None:
    sessions = sessionmaker(db_engine, expire_on_commit=False)
    expected_results, expected_errors = [], []
    with sessions.begin() as session:
        job_id = create_job(session, "export.jsonl", "m")
        rows = []
        for n, output in enumerate(TEXTS * 2):
            rows.append({"job_id": job_id, "line_no": n + 1, "custom_id": f'id "{n}" \\ é',
                         "url": CHAT_URL if n % 2 else COMPLETIONS_URL, "state": RequestState.succeeded})
        for n, (state, code, message) in enumerate(ERRORS, len(rows) + 1):
            rows.append({"job_id": job_id, "line_no": n, "custom_id": None if n % 2 else f"e{n}", "state": state,
                         "error_code": code, "error_message": message})
        ids = list(session.scalars(insert(Request).returning(Request.id), rows))
        for n, (request_id, output) in enumerate(zip(ids, TEXTS * 2)):
            logprobs = [["a", -0.5, [97], []]] if n == LOGPROBS_AT else None
            choices = [stored_choice(to_stored("second \x00 é"), "stop", 3, None)] if n == CHOICES_AT else None
            session.add(Result(request_id=request_id, job_id=job_id, text=to_stored(output),
                               finish_reason="stop" if n % 3 else "length", prompt_tokens=n, completion_tokens=2 * n,
                               model="model \"x\" é", worker="w", logprobs=to_stored_logprobs(logprobs),
                               choices=choices))
        session.flush()
        created = dict(session.execute(text("SELECT request_id, created_at FROM results WHERE job_id = :j"),
                                       {"j": job_id}).all())
        for n, (request_id, output) in enumerate(zip(ids, TEXTS * 2)):
            logprobs = [["a", -0.5, [97], []]] if n == LOGPROBS_AT else None
            choices = [{"text": "second \x00 é", "finish_reason": "stop",
                        "logprobs": None}] if n == CHOICES_AT else None
            line = output_line(request_id, rows[n]["custom_id"], rows[n]["url"], "model \"x\" é",
                               int(created[request_id].timestamp()), output, "stop" if n % 3 else "length", n, 2 * n,
                               logprobs=logprobs, more_choices=choices)
            escaped = output != to_stored(output) or choices is not None
            expected_results.append(json.dumps(line, ensure_ascii=escaped) + "\n")
        for n, (state, code, message) in enumerate(ERRORS):
            row = rows[len(TEXTS) * 2 + n]
            unrun = {RequestState.cancelled: "batch_cancelled", RequestState.expired: "batch_expired"}.get(state)
            line = error_line(ids[len(TEXTS) * 2 + n], row["custom_id"], row["line_no"],
                              unrun or code or state.value, message or f"the job was {state.value} before this request ran")
            expected_errors.append(json.dumps(line, ensure_ascii=False) + "\n")

    with sessions() as session:
        jit = session.execute(text("SHOW jit")).scalar_one()
        results, errors = io.BytesIO(), io.BytesIO()
        assert write_results(session, job_id, results) == len(TEXTS) * 2
        assert write_errors(session, job_id, errors) == len(ERRORS)
        assert session.execute(text("SHOW jit")).scalar_one() == jit  # the export's planner setting is its own
    assert results.getvalue().split(b"\n") == "".join(expected_results).encode().split(b"\n")  # U+2028 stays
    assert errors.getvalue().split(b"\n") == "".join(expected_errors).encode().split(b"\n")


def test_a_job_without_results_or_errors_writes_nothing(db_engine: Engine) -> None:
    sessions = sessionmaker(db_engine, expire_on_commit=False)
    with sessions.begin() as session:
        job_id = create_job(session, "empty.jsonl", "m")
    with sessions() as session:
        results, errors = io.BytesIO(), io.BytesIO()
        assert (write_results(session, job_id, results), write_errors(session, job_id, errors)) == (0, 0)
    assert results.getvalue() == errors.getvalue() == b""
