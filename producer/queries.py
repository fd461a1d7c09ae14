"""All of the producer's SQL: creating jobs, inserting request rows, progress, result export, and the
job-level operations of the CLI (cancel, dead letters)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic_core import to_json
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from producer.reader import ReadLine
from schema.cache import CacheScope
from schema.lines import CHAT_URL
from schema.tables import AuditEvent, DeadLetter, Job, Request, RequestState
from worker.job_counts import counted
from worker.transitions import move


def new_job_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ApiOrigin:
    """Where a batch created through the HTTP API came from."""

    owner_key_id: str | None
    input_file_id: str
    endpoint: str


def create_job(session: Session, input_file: str, model: str, metadata: dict[str, Any] | None = None,
               completion_window: timedelta | None = None, use_result_cache: bool = True, priority: int = 0,
               queue: str = "deepbatch", origin: ApiOrigin | None = None) -> str:
    job_id = new_job_id()
    expires_at = func.now() + completion_window if completion_window else None
    session.add(Job(id=job_id, input_file=input_file, model=model, metadata_json=metadata or {},
                    expires_at=expires_at, use_result_cache=use_result_cache, priority=priority, queue=queue,
                    owner_key_id=origin and origin.owner_key_id, input_file_id=origin and origin.input_file_id,
                    endpoint=origin and origin.endpoint))
    session.flush()  # the job row first: the audit event refers to it
    session.add(AuditEvent(job_id=job_id, event="job_created", detail=input_file))
    session.flush()
    return job_id


@dataclass
class ChunkOutcome:
    queued_request_ids: list[int]
    rejected_lines: int
    queues: list[str] = field(default_factory=list)  # of each queued request, in the same order


@dataclass(frozen=True)
class JobOptions:
    """What every request row of a job inherits."""

    max_attempts: int
    cache_scope: CacheScope | None = None  # model and owner of its cache keys, when the job uses the result cache
    priority: int = 0
    queue: str = "deepbatch"  # of a row routed nowhere else (a rejected line's, a default model's before routing)


@dataclass(frozen=True)
class StagedRoute:
    """Where a line was routed (worker/registry.py's Route): its model keys its cache, its queue takes it."""

    model: str
    queue: str


# COPY is the fast way in, but one duplicate custom_id would abort a COPY straight into `requests`: so a
# chunk is staged in a temporary table and moved over by INSERT_STAGED, which settles duplicates in Postgres.
CREATE_STAGING = """
    CREATE TEMP TABLE submit_staging (
        line_no integer, custom_id text, custom_id_repr text, url text, body jsonb, cache_key text,
        error_code text, line_error text, queue text
    ) ON COMMIT DROP;
    -- No statistics on a table filled a moment ago: the planner over-estimates INSERT_STAGED and
    -- JIT-compiles it, which cost ~80 ms a chunk (measured), more than running it.
    SET LOCAL jit = off
"""
# The columns of a staged row: custom_id_repr words a duplicate's error as Python words it, a rejected
# line brings its error_code and line_error, a routed one its model's queue. `copy_line` encodes them; UTF-8
# whatever the client encoding.
COPY_STAGING = ("COPY submit_staging (line_no, custom_id, custom_id_repr, url, body, cache_key, error_code, "
                "line_error, queue) FROM STDIN WITH (ENCODING 'UTF8')")
DROP_STAGING = "DROP TABLE submit_staging"  # so a second chunk in the same transaction can stage too

# One statement per chunk: the accepted rows, the rejected ones, and all their audit events in ONE insert
# (the audit chain seals each INSERT statement as one batch). A valid line whose custom_id the job already
# holds (ON CONFLICT) or an earlier line of this chunk holds (NOT EXISTS) is rejected, naming the first use.
# That first use is looked up with the job id behind a sub-select, which hides its value from the planner:
# shown the value of a job that ANALYZE never saw (one being submitted), it estimates one row for the job
# and may scan ix_requests_job_id_state (the whole job so far, per duplicate: submit fell from 8,000 to
# 1,500 lines/s over 500,000 lines, bench/results/scale-redis-1m.json); priced as an average job, only
# uq_requests_job_id_custom_id, one entry, is cheap.
INSERT_STAGED = text(f"""
    WITH inserted AS (
        INSERT INTO requests (job_id, line_no, custom_id, url, body, state, attempt, max_attempts, priority,
                              queue, cache_key)
        SELECT :job_id, line_no, custom_id, url, body, 'queued', 0, :max_attempts, :priority,
               coalesce(queue, :queue), cache_key
        FROM submit_staging AS staged
        WHERE error_code IS NULL AND NOT EXISTS (
            SELECT FROM submit_staging AS earlier
            WHERE earlier.custom_id = staged.custom_id AND earlier.line_no < staged.line_no
              AND earlier.error_code IS NULL)
        ON CONFLICT (job_id, custom_id) WHERE line_error IS NULL DO NOTHING
        RETURNING id, line_no, custom_id, queue
    ), rejections AS (
        SELECT staged.line_no, staged.custom_id, coalesce(staged.error_code, 'duplicate_custom_id') AS error_code,
               coalesce(staged.line_error, format('duplicate custom_id %s (first used on line %s)',
                   staged.custom_id_repr,
                   coalesce(first_use.line_no, (SELECT line_no FROM requests WHERE job_id = (SELECT :job_id)
                                                AND custom_id = staged.custom_id AND line_error IS NULL))))
               AS line_error
        FROM submit_staging AS staged
        LEFT JOIN inserted ON inserted.line_no = staged.line_no
        LEFT JOIN inserted AS first_use ON staged.error_code IS NULL AND first_use.custom_id = staged.custom_id
        WHERE inserted.line_no IS NULL
    ), rejected AS (
        INSERT INTO requests (job_id, line_no, custom_id, state, attempt, max_attempts, priority, queue,
                              line_error, error_code, error_message)
        SELECT :job_id, line_no, custom_id, 'failed', 0, :max_attempts, :priority, :queue,
               line_error, error_code, 'line ' || line_no || ': ' || line_error
        FROM rejections
        RETURNING id, line_no, error_code, error_message
    ), audited AS (
        INSERT INTO audit_events (job_id, request_id, event, to_state, attempt, detail)
        SELECT :job_id, id, event, to_state, 0, detail FROM (
            SELECT id, line_no, 'submitted' AS event, 'queued' AS to_state, NULL AS detail FROM inserted
            UNION ALL
            SELECT id, line_no, 'rejected', 'failed', error_message FROM rejected
        ) AS events
        ORDER BY line_no
    ), moves AS (
        SELECT :job_id AS job_id, NULL AS from_state, '' AS from_label, 'queued' AS to_state, '' AS to_label,
               count(*) AS requests, 0 AS rejected, 0 AS cache_hit, 0 AS prompt_tokens, 0 AS completion_tokens
        FROM inserted HAVING count(*) > 0
        UNION ALL
        SELECT :job_id, NULL, '', 'failed', coalesce(error_code, ''), count(*), count(*), 0, 0, 0
        FROM rejected GROUP BY error_code
    ), {counted("moves")}
    SELECT id, queue FROM inserted ORDER BY line_no
""")


@dataclass
class StagedChunk:
    """A chunk of read lines as COPY data: encoded off the writing thread, sent in one piece."""

    copy_data: bytes
    lines: int
    last_line_no: int = 0
    end_offset: int = 0  # the file's byte offset after the chunk's last line
    prefix_sha256: str = ""  # of the file's bytes up to end_offset (submit.py fills it in)


def copy_text(value: str | None) -> bytes:
    """A value as COPY's text format spells it: NULL is \\N; backslash, tab, newline and CR are escaped."""
    if value is None:
        return b"\\N"
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r").encode()


def copy_line(line: ReadLine, cache_scope: CacheScope | None, route: StagedRoute | None = None) -> bytes:
    """One staged row in COPY text format; `route`: the model (of its cache key) and queue it was routed to. Hand-written rather than psycopg's `write_row`: here it runs in
    the read-ahead thread, and the writing thread sends a whole chunk in one call instead of waiting (and
    queueing for the GIL) every 32 kB; the body is dumped to JSON once, by pydantic, straight to bytes."""
    request = line.request
    if request is None:
        assert line.error is not None
        custom_id = line.error.custom_id
        if custom_id is not None:  # as written in the file: Postgres text cannot hold NUL
            custom_id = custom_id.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode()
        fields = (copy_text(custom_id), b"\\N", b"\\N", b"\\N", b"\\N", copy_text(line.error.code),
                  copy_text(line.error.message), b"\\N")
        return b"\t".join((str(line.line_no).encode(), *fields)) + b"\n"
    body = request.body
    if cache_scope is not None and route is not None and route.model != cache_scope.served_model:
        cache_scope = CacheScope(route.model, cache_scope.owner)  # the model that will run it, not the default
    cache_key = cache_scope.key(request.url, body) if cache_scope else None
    # JSON text never holds a raw tab, newline or CR (they are escaped): only its backslashes need doubling.
    body_json = to_json(body, exclude_none=True).replace(b"\\", b"\\\\")
    fields = (copy_text(request.custom_id), copy_text(repr(request.custom_id)), copy_text(request.url), body_json,
              copy_text(cache_key), b"\\N", b"\\N", copy_text(route.queue if route else None))
    return b"\t".join((str(line.line_no).encode(), *fields)) + b"\n"


def stage_chunk(lines: Iterable[ReadLine], cache_scope: CacheScope | None,
                router: Callable[[ReadLine], tuple[ReadLine, StagedRoute | None]] | None = None) -> StagedChunk:
    """Encode `lines` as they come: only their COPY text is kept, never the chunk's parsed lines. `router`
    gives each line its route, or turns it into an error (a model nobody serves)."""
    rows, line = [], None
    for line in lines:
        route = None
        if router is not None:
            line, route = router(line)
        rows.append(copy_line(line, cache_scope, route))
    if line is None:
        return StagedChunk(b"", 0)
    return StagedChunk(b"".join(rows), len(rows), line.line_no, line.end_offset)


def insert_staged(session: Session, job_id: str, chunk: StagedChunk, options: JobOptions) -> ChunkOutcome:
    """Insert one staged chunk as request rows with their audit events (no commit)."""
    if not chunk.lines:
        return ChunkOutcome(queued_request_ids=[], rejected_lines=0)
    # The psycopg connection under the session's, in the same transaction: SQLAlchemy has no COPY.
    driver_connection = session.connection().connection.driver_connection
    with driver_connection.cursor() as cursor:
        cursor.execute(CREATE_STAGING)
        with cursor.copy(COPY_STAGING) as copy:
            copy.write(chunk.copy_data)
    queued = session.execute(INSERT_STAGED, {"job_id": job_id, "max_attempts": options.max_attempts,
                                             "priority": options.priority, "queue": options.queue}).all()
    with driver_connection.cursor() as cursor:
        cursor.execute(DROP_STAGING)
    return ChunkOutcome(queued_request_ids=[row.id for row in queued], rejected_lines=chunk.lines - len(queued),
                        queues=[row.queue for row in queued])


RECORD_SUBMISSION_PROGRESS = text("""
    UPDATE jobs SET submitted_lines = :lines, submitted_bytes = :bytes, submitted_sha256 = :sha256,
                    submission_heartbeat_at = now()
    WHERE id = :job_id
    RETURNING cancel_requested_at IS NOT NULL AS cancelled
""")


def record_submission_progress(session: Session, job_id: str, chunk: StagedChunk) -> bool:
    """Note, with the chunk's rows, how far the file is stored; returns whether the job was cancelled
    meanwhile (then the submission stops)."""
    return session.execute(RECORD_SUBMISSION_PROGRESS, {
        "job_id": job_id, "lines": chunk.last_line_no, "bytes": chunk.end_offset, "sha256": chunk.prefix_sha256,
    }).scalar_one()


# The process submitting a job holds a session advisory lock on it (namespace, hashtext(job id)) for as
# long as it runs: Postgres drops it when that process dies, however it dies, so a submission nobody holds
# stopped. Resuming takes the same lock, so two processes never write one job.
SUBMISSION_LOCK_NAMESPACE = 0x0DB
TRY_SUBMISSION_LOCK = text("SELECT pg_try_advisory_lock(:namespace, hashtext(:job_id))")
RELEASE_SUBMISSION_LOCK = text("SELECT pg_advisory_unlock(:namespace, hashtext(:job_id))")
SUBMISSION_STATE = text("""
    SELECT input_file, submitted_lines AS lines, submitted_at IS NULL AND NOT EXISTS (
        SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = :namespace
          AND objid::text::bigint = (hashtext(:job_id)::bigint & 4294967295)) AS stopped
    FROM jobs WHERE id = :job_id
""")


@dataclass(frozen=True)
class Submission:
    """How far a job's submission got, for `status` and `jobs` to tell a stopped one."""

    input_file: str
    lines: int
    stopped: bool  # not finished, and no process is submitting it


def submission_of(session: Session, job_id: str) -> Submission | None:
    row = session.execute(SUBMISSION_STATE, {"job_id": job_id, "namespace": SUBMISSION_LOCK_NAMESPACE}).first()
    return Submission(*row) if row else None


def try_submission_lock(session: Session, job_id: str) -> bool:
    return session.execute(TRY_SUBMISSION_LOCK, {"job_id": job_id, "namespace": SUBMISSION_LOCK_NAMESPACE}).scalar_one()


def release_submission_lock(session: Session, job_id: str) -> None:
    session.execute(RELEASE_SUBMISSION_LOCK, {"job_id": job_id, "namespace": SUBMISSION_LOCK_NAMESPACE})


# A job's label: the models its lines were routed to (DEEPBATCH_MODEL's until any line is stored).
LABEL_JOB_MODELS = text("""
    UPDATE jobs SET model = coalesce((
        SELECT string_agg(DISTINCT model, ', ' ORDER BY model) FROM (
            SELECT unnest(string_to_array(model, ', ')) AS model FROM jobs WHERE id = :job_id AND :resumed
            UNION SELECT unnest(CAST(:models AS text[]))) AS models), model)
    WHERE id = :job_id
""")
# The queues a job's queued requests wait in (several when its lines name several models).
JOB_QUEUES = text("SELECT DISTINCT queue FROM requests WHERE job_id = :job_id AND state = 'queued' ORDER BY 1")


def label_job_models(session: Session, job_id: str, models: Iterable[str], resumed: bool) -> None:
    """Name the job after the models its lines were routed to (with those of its first part, `resumed`)."""
    if models := sorted(set(models)):
        session.execute(LABEL_JOB_MODELS, {"job_id": job_id, "models": models, "resumed": resumed})


def job_queues(session: Session, job_id: str) -> list[str]:
    return list(session.scalars(JOB_QUEUES, {"job_id": job_id}))


def finish_submission(session: Session, job_id: str, total_lines: int) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(total_lines=total_lines, submitted_at=func.now())
    )
    session.add(AuditEvent(job_id=job_id, event="job_submitted", detail=f"{total_lines} lines"))


@dataclass(frozen=True)
class FailedLines:
    """The lines of a job that failed for one reason (one error code): how many, and the first of them."""

    code: str
    count: int
    first_line: int
    first_message: str


FAILED_LINES = text("""
    SELECT DISTINCT ON (error_code) error_code AS code, count(*) OVER (PARTITION BY error_code) AS count,
           line_no AS first_line, coalesce(line_error, error_message) AS first_message
    FROM requests
    WHERE job_id = :job_id AND state IN ('failed', 'dead') AND error_code IS NOT NULL
      AND (line_error IS NOT NULL OR NOT :rejected_only)
    ORDER BY error_code, line_no
""")
# The names in `unknown_model` errors (producer/reader.py words them `unknown model 'name': ...`).
UNKNOWN_MODEL_NAMES = text("""
    SELECT substring(line_error FROM '^unknown model [''"](.*)[''"]: this deployment') AS name, count(*) AS count
    FROM requests WHERE job_id = :job_id AND state = 'failed' AND error_code = 'unknown_model'
    GROUP BY 1 ORDER BY 2 DESC, 1
""")


def failed_lines(session: Session, job_id: str, rejected_only: bool = False) -> list[FailedLines]:
    """Why a job's lines failed, by code, most frequent first: `rejected_only`, those refused at submission;
    else also those that failed or died running."""
    rows = session.execute(FAILED_LINES, {"job_id": job_id, "rejected_only": rejected_only}).mappings()
    return sorted((FailedLines(**row) for row in rows), key=lambda row: (-row.count, row.code))


def unknown_model_names(session: Session, job_id: str) -> list[tuple[str, int]]:
    """The model names a job's lines gave that this deployment does not serve, with their counts."""
    return [(row.name, row.count) for row in session.execute(UNKNOWN_MODEL_NAMES, {"job_id": job_id})]


@dataclass(frozen=True)
class JobProgress:
    """A row of the job_progress view (README: Polling from SQL)."""

    job_id: str
    status: str
    model: str
    input_file: str
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    dead: int
    cancelled: int
    expired: int
    finished: int
    completed_requests: int
    failed_requests: int
    created_at: datetime
    expires_at: datetime | None
    cancel_requested_at: datetime | None
    last_finished_at: datetime | None
    cache_hits: int

    @property
    def done(self) -> bool:
        """Nothing left to run: the job reached a final status."""
        return self.status in ("completed", "failed", "expired", "cancelled")


PROGRESS_COLUMNS = ", ".join(JobProgress.__dataclass_fields__)


def job_progress(session: Session, job_id: str) -> JobProgress | None:
    row = session.execute(
        text(f"SELECT {PROGRESS_COLUMNS} FROM job_progress WHERE job_id = :job_id"), {"job_id": job_id}
    ).mappings().first()
    return JobProgress(**row) if row else None


# The newest jobs are chosen first (ix_jobs_created_at), then only theirs are counted.
RECENT_JOBS = text(f"""
    SELECT {PROGRESS_COLUMNS} FROM job_progress
    WHERE job_id IN (SELECT id FROM jobs ORDER BY created_at DESC LIMIT :limit)
    ORDER BY created_at DESC
""")


def recent_jobs(session: Session, limit: int = 20) -> list[JobProgress]:
    rows = session.execute(RECENT_JOBS, {"limit": limit}).mappings()
    return [JobProgress(**row) for row in rows]


# A job's output and error files are written as Postgres makes their lines, and sent by COPY ... TO STDOUT
# straight into the file, never decoded: building a dict and dumping it in Python per line capped export at
# ~29,000 lines/s, rows fetched through a cursor and encoded again at ~48,000. Each piece is spelled as
# Python's json.dumps spells it (", " and ": " between items; to_json escapes strings as
# json.dumps(ensure_ascii=False) does), so the bytes are those of schema/lines.py's output_line and
# error_line. A result whose line needs Python — log-probabilities, further choices, or text holding
# stored_text's escape — comes as a JSON array of its columns instead (PYTHON_COLUMNS), for
# producer/export.py to write in its place: a line starts with `{`, such a row with `[`.
JSON_TEXT = "coalesce(to_json({})::text, 'null')"
# The line's `created`: whole seconds, as int() cuts. date_part is a float; extract's numeric costs more.
CREATED = "floor(date_part('epoch', s.created_at))::bigint"
CHAT = "r.url = :chat_url"


def concatenated(*pieces: str) -> str:
    """One concat() of SQL pieces: a chain of `||` copies the line built so far at every step, the result's
    whole text again for each piece after it; concat() writes each piece once."""
    return "concat(" + ", ".join(pieces) + ")"


RESULT_LINE = concatenated(
    """'{"id": "batch_req_'""", "r.id", """'", "custom_id": '""", JSON_TEXT.format("r.custom_id"),
    """', "response": {"status_code": 200, "request_id": "req_'""", "r.id", """'", "body": {"id": "'""",
    f"""CASE WHEN {CHAT} THEN 'chatcmpl-' ELSE 'cmpl-' END""", "r.id",
    f"""CASE WHEN {CHAT} THEN '", "object": "chat.completion"' ELSE '", "object": "text_completion"' END""",
    """', "created": '""", CREATED, """', "model": '""", JSON_TEXT.format("s.model"),
    """', "choices": [{"index": 0, '""",
    f"""CASE WHEN {CHAT} THEN '"message": {{"role": "assistant", "content": ' ELSE '"text": ' END""",
    JSON_TEXT.format("s.text"), f"CASE WHEN {CHAT} THEN '}}' END",
    """', "logprobs": null, "finish_reason": '""", JSON_TEXT.format("s.finish_reason"),
    """'}], "usage": {"prompt_tokens": '""", "s.prompt_tokens", """', "completion_tokens": '""",
    "s.completion_tokens", """', "total_tokens": '""", "s.prompt_tokens + s.completion_tokens",
    """'}}}, "error": null}'""",
)
# The arguments of producer/export.py's python_result_line, in order.
PYTHON_COLUMNS = f"""json_build_array(r.id, r.custom_id, r.url, s.model, {CREATED}, s.text, s.finish_reason,
                                     s.prompt_tokens, s.completion_tokens, s.logprobs, s.choices)::text"""
EXPORT_RESULTS = f"""
    SELECT CASE WHEN s.logprobs IS NULL AND s.choices IS NULL AND strpos(s.text, chr(65535)) = 0
                THEN {RESULT_LINE} ELSE {PYTHON_COLUMNS} END
    FROM requests AS r JOIN results AS s ON s.request_id = r.id
    WHERE r.job_id = :job_id AND r.state = 'succeeded'
    ORDER BY r.line_no
"""
# OpenAI Batch's codes for requests a job never ran; else the request's error code, else its state.
UNRUN_CODES = {RequestState.cancelled: "batch_cancelled", RequestState.expired: "batch_expired"}
UNRUN_CODE_SQL = "CASE r.state " + " ".join(f"WHEN '{state.value}' THEN '{code}'" for state, code in UNRUN_CODES.items())
ERROR_LINE = concatenated(
    """'{"id": "batch_req_'""", "r.id", """'", "custom_id": '""", JSON_TEXT.format("r.custom_id"),
    """', "response": null, "error": {"code": '""",
    JSON_TEXT.format(UNRUN_CODE_SQL + " ELSE coalesce(nullif(r.error_code, ''), r.state::text) END"),
    """', "message": '""",
    JSON_TEXT.format("coalesce(nullif(r.error_message, ''), 'the job was ' || r.state || ' before this request ran')"),
    """', "line": '""", "r.line_no", """'}}'""",
)
# What the error file holds: every request that ended without a result.
ERROR_STATES = (RequestState.failed, RequestState.dead, RequestState.cancelled, RequestState.expired)
EXPORT_ERRORS = f"""
    SELECT {ERROR_LINE} AS line FROM requests AS r
    WHERE r.job_id = :job_id AND r.state IN ({", ".join(f"'{state.value}'" for state in ERROR_STATES)})
    ORDER BY r.line_no
"""
# CSV, not COPY's text format, which would double every backslash of the JSON. CSV quotes a value only when
# it holds the delimiter, the quote character, CR or LF; with U+0001 and U+0002 as delimiter and quote, none
# of which a JSON text holds raw (JSON escapes every character below U+0020), each row is its line and "\n".
EXPORT_COPY = "COPY ({statement}) TO STDOUT WITH (FORMAT csv, DELIMITER E'\\x01', QUOTE E'\\x02', ENCODING 'UTF8')"
# For the export's statement only: COPY plans for its last row, and a job's export is priced high enough that
# Postgres JIT-compiles it, which cost more than it saved (300,000 lines: 5.9 against 4.6 s, medians of
# three on one 2-core machine). Its parallel plan stays: the workers build the lines.
EXPORT_PLAN = "SET LOCAL jit = off"


def export_lines(session: Session, statement: str, job_id: str) -> Iterator[memoryview]:
    """The rows of EXPORT_RESULTS or EXPORT_ERRORS for the job as COPY sends them, each its line's UTF-8 bytes
    and a newline, in the session's transaction (psycopg's own COPY: SQLAlchemy has none). The planner
    settings are rolled back with a savepoint, so the rest of the transaction plans as before."""
    driver_connection = session.connection().connection.driver_connection
    with driver_connection.transaction(force_rollback=True), driver_connection.cursor() as cursor:
        cursor.execute(EXPORT_PLAN)
        statement = statement.replace(":chat_url", "%(chat_url)s").replace(":job_id", "%(job_id)s")
        with cursor.copy(EXPORT_COPY.format(statement=statement), {"job_id": job_id, "chat_url": CHAT_URL}) as copy:
            yield from copy


# ---- job-level operations: cancel, dead letters (the CLI's admin SQL) ----
# Request states change only through worker.transitions.move: a guarded UPDATE plus its audit events.
# Expiry and the lost-message scan are the worker's maintenance, in worker/transitions.py.


def cancel_job(session: Session, job_id: str, actor: str) -> int | None:
    """Mark the job cancelled and move its queued requests to cancelled; running ones finish.

    Returns how many requests were cancelled, or None if there is no such job.
    """
    # A submission still running stops at its next chunk; one that stopped ends here, with what it stored.
    found = session.execute(update(Job).where(Job.id == job_id).values(
        cancel_requested_at=func.coalesce(Job.cancel_requested_at, func.now()),
        submitted_at=func.coalesce(Job.submitted_at, func.now()),
        total_lines=func.coalesce(func.nullif(Job.total_lines, 0), Job.submitted_lines))).rowcount
    if not found:
        return None
    reason = "the job was cancelled"
    return len(move(session, Request.job_id == job_id, RequestState.queued, RequestState.cancelled, "cancelled",
                    actor, reason, error_message=reason))


def dead_letters(session: Session, job_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    statement = (
        select(DeadLetter.request_id, DeadLetter.job_id, Request.line_no, Request.custom_id,
               DeadLetter.attempts, DeadLetter.last_error, DeadLetter.created_at)
        .join(Request, Request.id == DeadLetter.request_id)
        .order_by(DeadLetter.created_at).limit(limit)
    )
    if job_id is not None:
        statement = statement.where(DeadLetter.job_id == job_id)
    return [dict(row) for row in session.execute(statement).mappings()]


def requeue_dead(session: Session, queue: str, actor: str, request_ids: Sequence[int] | None = None,
                 job_id: str | None = None) -> list[int]:
    """dead → queued with a fresh set of attempts; the dead-letter record goes, its history stays audited."""
    which = Request.queue == queue
    if request_ids is not None:
        which = which & Request.id.in_(request_ids)
    if job_id is not None:
        which = which & (Request.job_id == job_id)
    rows = move(session, which, RequestState.dead, RequestState.queued, "requeued", actor,
                "from the dead-letter queue", attempt=0, retry_after=None, isolation_group=None)
    requeued = [row.id for row in rows]
    if requeued:
        session.execute(delete(DeadLetter).where(DeadLetter.request_id.in_(requeued)))
    return requeued


def purge_dead_letters(session: Session, job_id: str | None = None) -> int:
    """Forget dead-letter records (the requests stay dead, their history audited)."""
    statement = delete(DeadLetter)
    if job_id is not None:
        statement = statement.where(DeadLetter.job_id == job_id)
    return session.execute(statement).rowcount


# ---- what the CLI shows beside a job's counts ----

REJECTED_LINES = text("SELECT coalesce(sum(rejected), 0)::bigint FROM job_counts WHERE job_id = :job_id")


def rejected_line_count(session: Session, job_id: str) -> int:
    """The job's lines refused at submission (failed without running): reported apart from requests run."""
    return session.execute(REJECTED_LINES, {"job_id": job_id}).scalar_one()


# A succeeded request's count is labelled with the model of its result (schema/tables.py: JobCount).
RESULT_MODELS = text("""
    SELECT label AS model, sum(requests)::bigint AS count FROM job_counts WHERE job_id = :job_id AND state = 'succeeded'
    GROUP BY label HAVING sum(requests) > 0 ORDER BY 2 DESC, 1
""")


def result_models(session: Session, job_id: str) -> list[tuple[str, int]]:
    """The models that answered the job's requests so far, with how many each."""
    return [(row.model, row.count) for row in session.execute(RESULT_MODELS, {"job_id": job_id})]


# A batch of the HTTP API stores its input under the file's id; the name it was uploaded as is the file's.
FILE_NAMES = text("""
    SELECT j.id, coalesce(f.filename, j.input_file) AS name
    FROM jobs AS j LEFT JOIN files AS f ON f.id = j.input_file_id
    WHERE j.id = ANY(:job_ids)
""")


def input_file_names(session: Session, job_ids: Sequence[str]) -> dict[str, str]:
    """Each job's input as its user named it: the uploaded file's name for an API batch, else the path given."""
    return {row.id: row.name for row in session.execute(FILE_NAMES, {"job_ids": list(job_ids)})}


@dataclass(frozen=True)
class UnfinishedJob:
    """A job with requests still to run or lines still to submit: what an interrupted `run` leaves."""

    job_id: str
    input_file: str
    queue: str
    status: str
    total: int
    finished: int
    submitted: bool
    submitted_bytes: int
    submitted_sha256: str | None


UNFINISHED_JOBS = text("""
    SELECT p.job_id, j.input_file, j.queue, p.status, p.total, p.finished, j.submitted_at IS NOT NULL AS submitted,
           j.submitted_bytes, j.submitted_sha256
    FROM job_progress AS p JOIN jobs AS j ON j.id = p.job_id
    WHERE p.status NOT IN ('completed', 'failed', 'expired', 'cancelled') AND j.cancel_requested_at IS NULL
      AND j.input_file_id IS NULL AND starts_with(j.queue, :queue_prefix)
    ORDER BY j.created_at DESC
""")


def unfinished_jobs(session: Session, queue_prefix: str) -> list[UnfinishedJob]:
    """The CLI's jobs on queues named `queue_prefix`… (the runs') not yet done nor cancelled, newest first."""
    return [UnfinishedJob(**row) for row in session.execute(UNFINISHED_JOBS, {"queue_prefix": queue_prefix}).mappings()]
