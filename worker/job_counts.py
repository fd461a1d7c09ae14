"""Progress counts kept per job (schema/tables.py: JobCount) by the statements that move requests.

Every statement that changes requests' states adds what it did to `job_counts` in the same statement, as
a CTE built here, so a job's progress is read from a few rows instead of counted over its requests. The
rows are sharded by the writing backend's pid: no two writers ever wait on the same count. This module
only builds SQL; worker/transitions.py (and producer/queries.py for submit) put it in their statements.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from schema.tables import RequestState


def counted(moves: str) -> str:
    """The CTE `counted`: adds to job_counts (schema/tables.py: JobCount) what the rows of `moves` did, one
    row per (job, state, label) per statement. `moves` names a CTE of job_id, from_state (NULL for a new
    row), from_label, to_state, to_label, requests (how many moved so: 1 for a row moved), rejected,
    cache_hit, prompt_tokens, completion_tokens (a label is the model for succeeded, the error code for failed
    and dead, else ''). The rows are written in key order under this backend's shard, so the statement waits
    on no other writer's counts."""
    return f"""
    counted AS (
        INSERT INTO job_counts AS c (job_id, state, label, shard, requests, rejected, cache_hits, prompt_tokens,
                                     completion_tokens, last_finished_at)
        SELECT job_id, state, label, pg_backend_pid(), sum(requests), sum(rejected), sum(cache_hits),
               sum(prompt_tokens), sum(completion_tokens),
               CASE WHEN state NOT IN ('queued', 'running') AND max(requests) > 0 THEN now() END
        FROM (
            SELECT job_id, CAST(to_state AS request_state) AS state, to_label AS label, requests, rejected,
                   cache_hit AS cache_hits, prompt_tokens, completion_tokens
            FROM {moves}
            UNION ALL
            SELECT job_id, CAST(from_state AS request_state), from_label, -requests, 0, 0, 0, 0
            FROM {moves} WHERE from_state IS NOT NULL
        ) AS deltas
        GROUP BY job_id, state, label
        ORDER BY job_id, state, label
        ON CONFLICT (job_id, state, label, shard) DO UPDATE
        SET requests = c.requests + excluded.requests, rejected = c.rejected + excluded.rejected,
            cache_hits = c.cache_hits + excluded.cache_hits, prompt_tokens = c.prompt_tokens + excluded.prompt_tokens,
            completion_tokens = c.completion_tokens + excluded.completion_tokens,
            last_finished_at = coalesce(excluded.last_finished_at, c.last_finished_at)
    )"""


def moves_of(source: str, from_state: str, to_state: str, to_label: str = "''", cache_hit: str = "0",
             prompt_tokens: str = "0", completion_tokens: str = "0") -> str:
    """A `moves` CTE (see counted): each row of `source` moved once from `from_state` to `to_state`, with
    `to_label` and the amounts, all SQL expressions over its columns. It leaves no state a label names
    (none of the moves that use it starts from failed, dead or succeeded)."""
    return f"""
    moves AS (
        SELECT job_id, {from_state} AS from_state, '' AS from_label, {to_state} AS to_state, {to_label} AS to_label,
               1 AS requests, 0 AS rejected, {cache_hit} AS cache_hit, {prompt_tokens} AS prompt_tokens,
               {completion_tokens} AS completion_tokens
        FROM {source}
    )"""


# What move() did, counted per job and label in Python (a cancel moves a whole job), added in one statement.
ADD_COUNTS = text(f"""
    WITH moves AS (
        SELECT * FROM jsonb_to_recordset(CAST(:moves AS jsonb))
            AS m(job_id text, from_state text, from_label text, to_state text, to_label text, rejected int,
                 cache_hit int, prompt_tokens int, completion_tokens int, requests int)
    ),
    {counted("moves")}
    SELECT 1
""")
LABELLED_STATES = (RequestState.failed, RequestState.dead)  # by error code; succeeded (by model) is the recorder's


def add_moves(session: Session, from_state: RequestState, to_state: RequestState, rows: Sequence[Any]) -> None:
    """Adds to job_counts what a move of `rows` (job_id, error_code) from `from_state` to `to_state` did."""
    moved = Counter((row.job_id, row.error_code or "") for row in rows)
    if not moved:
        return
    label = lambda state, error_code: error_code if state in LABELLED_STATES else ""  # noqa: E731
    session.execute(ADD_COUNTS, {"moves": json.dumps([
        {"job_id": job_id, "from_state": from_state.value, "from_label": label(from_state, error_code),
         "to_state": to_state.value, "to_label": label(to_state, error_code), "rejected": 0, "cache_hit": 0,
         "prompt_tokens": 0, "completion_tokens": 0, "requests": count}
        for (job_id, error_code), count in sorted(moved.items())])})
