"""All of the HTTP API's SQL: API keys and their rate-limit buckets, stored files, the caller's batches, list
pages and the dashboard's page. Job-level operations (progress, cancel, failed lines) are the producer's
and stay in producer/queries.py. Nothing here commits: the route owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, delete, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from producer.api.errors import ApiError
from schema.tables import ApiKey, AuditEvent, Job, StoredFile

# ---- API keys ----


def insert_key(session: Session, key_id: str, name: str, secret_sha256: str, actor: str) -> ApiKey:
    key = ApiKey(id=key_id, name=name, secret_sha256=secret_sha256)
    session.add(key)
    session.add(AuditEvent(job_id=key.id, event="api_key_created", worker=actor, detail=name))
    session.flush()
    return key


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, key_id: str, actor: str) -> bool:
    revoked = session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                              .values(revoked_at=text("now()"))).rowcount
    if revoked:
        session.add(AuditEvent(job_id=key_id, event="api_key_revoked", worker=actor))
    return bool(revoked)


def live_key(session: Session, secret_sha256: str) -> ApiKey | None:
    """The key whose secret hashes to this; None for an unknown or revoked one."""
    return session.scalar(select(ApiKey).where(ApiKey.secret_sha256 == secret_sha256, ApiKey.revoked_at.is_(None)))


# One statement draws a token, so that several server processes share the key's bucket: refill for the
# time since the last draw (up to the burst), then take one if there is one.
DRAW_TOKEN = text("""
    WITH bucket AS (
        SELECT id, least(:burst, coalesce(bucket_tokens, :burst) + :rate * greatest(0, extract(epoch FROM
                   clock_timestamp() - coalesce(bucket_refilled_at, clock_timestamp())))) AS available
        FROM api_keys WHERE id = :key_id FOR UPDATE
    )
    UPDATE api_keys AS k
    SET bucket_tokens = CASE WHEN b.available >= 1 THEN b.available - 1 ELSE b.available END,
        bucket_refilled_at = clock_timestamp()
    FROM bucket AS b WHERE k.id = b.id
    RETURNING b.available
""")


def draw_token(session: Session, key_id: str, rate: float, burst: int) -> float:
    """The tokens the key's bucket held before this draw (one was taken if that is at least one)."""
    return session.execute(DRAW_TOKEN, {"key_id": key_id, "rate": rate, "burst": burst}).scalar_one()


QUEUED_LINES = text("""
    SELECT coalesce(sum(n.requests), 0)::bigint FROM job_counts AS n JOIN jobs AS j ON j.id = n.job_id
    WHERE j.owner_key_id = :key_id AND n.state IN ('queued', 'running')
""")
# Checking a key's queued lines and storing a batch's are one step per key, across server processes: a
# transaction holds this advisory lock (namespace, hashtext(key id)) from the count until the batch is stored.
QUEUED_LINES_LOCK_NAMESPACE = 0x0DC
TRY_QUEUED_LINES_LOCK = text("SELECT pg_try_advisory_xact_lock(:namespace, hashtext(:key_id))")


def try_queued_lines_lock(session: Session, key_id: str) -> bool:
    return session.scalar(TRY_QUEUED_LINES_LOCK, {"namespace": QUEUED_LINES_LOCK_NAMESPACE, "key_id": key_id})


def queued_lines(session: Session, key_id: str) -> int:
    """The key's requests still to run, across all its batches."""
    return session.execute(QUEUED_LINES, {"key_id": key_id}).scalar_one()


# ---- list pages ----


def newest_first(session: Session, listed: Select, owned: Select, model: Any, limit: int,
                 after: str | None) -> list[Any]:
    """`listed`'s rows of `model` (which has `created_at` and `id`), newest first, after the row `after`,
    which must be one of `owned` (the caller's rows, deleted ones too: a page may end at one deleted since).
    Another key's id and one that never existed are refused alike, so a cursor tells a caller nothing of
    what exists beyond its own. Ask for one more than a page holds: whether it came says whether there
    are more."""
    if after is not None:
        cursor = session.execute(owned.with_only_columns(model.created_at, model.id).where(model.id == after)).first()
        if cursor is None:
            raise ApiError(400, f"after: {after!r} is not the id of one of your {model.__tablename__}", param="after")
        listed = listed.where(tuple_(model.created_at, model.id) < tuple_(*cursor))
    return list(session.scalars(listed.order_by(model.created_at.desc(), model.id.desc()).limit(limit)))


def owned_by(query: Select, model: Any, owner_key_id: str | None) -> Select:
    """`query` limited to the key's rows (with auth off, owner None: everyone's)."""
    return query if owner_key_id is None else query.where(model.owner_key_id == owner_key_id)


# ---- files ----


def insert_file(session: Session, row: StoredFile) -> StoredFile:
    session.add(row)
    session.add(AuditEvent(job_id=row.id, event="file_uploaded", worker=row.owner_key_id,
                           detail=f"{row.filename}: {row.bytes} bytes, {row.lines} lines"))
    session.flush()
    session.refresh(row)
    return row


def owned_file(session: Session, file_id: str, owner_key_id: str | None) -> StoredFile | None:
    """The file, if it exists, is not deleted and belongs to this key."""
    query = select(StoredFile).where(StoredFile.id == file_id, StoredFile.deleted_at.is_(None))
    return session.scalar(owned_by(query, StoredFile, owner_key_id).execution_options(populate_existing=True))


def list_files(session: Session, owner_key_id: str | None, purpose: str | None, limit: int,
               after: str | None) -> list[StoredFile]:
    owned = owned_by(select(StoredFile), StoredFile, owner_key_id)
    listed = owned.where(StoredFile.deleted_at.is_(None))
    if purpose:
        listed = listed.where(StoredFile.purpose == purpose)
    return newest_first(session, listed, owned, StoredFile, limit, after)


def mark_file_deleted(session: Session, file_id: str, actor: str | None) -> None:
    session.execute(update(StoredFile).where(StoredFile.id == file_id).values(deleted_at=func.now()))
    session.add(AuditEvent(job_id=file_id, event="file_deleted", worker=actor))


def stored_files(session: Session, file_ids: tuple[str, ...]) -> dict[str, StoredFile]:
    """These files' rows, deleted ones too, as the database has them now."""
    query = select(StoredFile).where(StoredFile.id.in_(file_ids)).execution_options(populate_existing=True)
    return {row.id: row for row in session.scalars(query)}


def upsert_batch_file(session: Session, file_id: str, owner_key_id: str | None, filename: str, purpose: str,
                      size: int, lines: int, fingerprint: str) -> None:
    row = dict(bytes=size, lines=lines, results_fingerprint=fingerprint)
    session.execute(insert(StoredFile).values(id=file_id, owner_key_id=owner_key_id, filename=filename,
                                              purpose=purpose, **row)
                    .on_conflict_do_update(index_elements=[StoredFile.id], set_=row))


def forget_file(session: Session, file_id: str) -> None:
    """No row for this file (a batch's error file once no request failed)."""
    session.execute(delete(StoredFile).where(StoredFile.id == file_id))


# ---- batches ----


def owned_job(session: Session, job_id: str, owner_key_id: str | None) -> Job | None:
    query = owned_by(select(Job).where(Job.id == job_id), Job, owner_key_id)
    return session.scalar(query.execution_options(populate_existing=True))


def list_jobs(session: Session, owner_key_id: str | None, limit: int, after: str | None) -> list[Job]:
    """Newest first; `after` is the id of the last batch of the previous page."""
    owned = owned_by(select(Job), Job, owner_key_id)
    return newest_first(session, owned, owned, Job, limit, after)


BATCH_USAGE = text("""
    SELECT coalesce(sum(prompt_tokens), 0) AS input_tokens, coalesce(sum(completion_tokens), 0) AS output_tokens
    FROM job_counts WHERE job_id = :job_id AND state = 'succeeded'
""")


def batch_usage(session: Session, job_id: str) -> tuple[int, int]:
    """The tokens of the batch's results so far: (input, output)."""
    row = session.execute(BATCH_USAGE, {"job_id": job_id}).one()
    return int(row.input_tokens), int(row.output_tokens)


# ---- the dashboard ----


@dataclass(frozen=True)
class DashboardRow:
    """One job as the dashboard shows it: its job_progress counts, what finished lately, its first failures."""

    id: str
    input_file: str  # the uploaded file's name for a batch of the API, the path given for a CLI job
    status: str
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    dead: int
    cancelled: int
    expired: int
    finished: int
    recent_tokens: int
    recent_finished: int
    failures: list[dict[str, Any]]  # code, count, first_line, first_message: the most frequent codes first


# The caller's newest jobs with everything their rows show, in one statement. Each job's progress is read
# through job_progress in a LATERAL subquery, which OFFSET 0 keeps from being flattened into the outer
# query: so the view's counts are grouped for that job alone (an index scan), never for every job.
DASHBOARD_PAGE = text("""
    WITH page AS (  -- a batch's input as it was uploaded (the file's name), a CLI job's as the path given
        SELECT j.id, coalesce(f.filename, j.input_file) AS input_file, j.created_at
        FROM jobs AS j LEFT JOIN files AS f ON f.id = j.input_file_id
        WHERE CAST(:owner_key_id AS text) IS NULL OR j.owner_key_id = :owner_key_id
        ORDER BY j.created_at DESC, j.id DESC LIMIT :limit
    )
    SELECT page.id, page.input_file, progress.status, progress.total, progress.queued, progress.running,
           progress.succeeded, progress.failed, progress.dead, progress.cancelled, progress.expired,
           progress.finished, recent.tokens AS recent_tokens, recent.finished AS recent_finished,
           failures.failures
    FROM page
    CROSS JOIN LATERAL (SELECT * FROM job_progress WHERE job_id = page.id OFFSET 0) AS progress
    CROSS JOIN LATERAL (
        SELECT coalesce(sum(completion_tokens), 0) AS tokens, count(*) AS finished
        FROM results WHERE job_id = page.id AND created_at > now() - make_interval(secs => :window_s)
    ) AS recent
    CROSS JOIN LATERAL (
        SELECT coalesce(json_agg(json_build_object('code', top.code, 'count', top.count, 'first_line', first.line_no,
                                                   'first_message', first.message)
                                 ORDER BY top.count DESC, top.code), '[]') AS failures
        FROM (SELECT label AS code, sum(requests)::bigint AS count FROM job_counts  -- failed and dead are counted by code
              WHERE job_id = page.id AND state IN ('failed', 'dead') AND label <> ''
              GROUP BY label HAVING sum(requests) > 0 ORDER BY 2 DESC, 1 LIMIT :failures) AS top
        CROSS JOIN LATERAL (  -- each code's first line: ix_requests_job_id_error_code, in line order
              SELECT line_no, coalesce(line_error, error_message) AS message FROM requests
              WHERE job_id = page.id AND error_code = top.code AND state IN ('failed', 'dead')
              ORDER BY line_no LIMIT 1) AS first
    ) AS failures
    ORDER BY page.created_at DESC, page.id DESC
""")


def dashboard_page(session: Session, owner_key_id: str | None, jobs: int, window_s: int,
                   failures: int) -> list[DashboardRow]:
    """The key's newest `jobs` jobs, each with the tokens and requests finished in the last `window_s`
    seconds and its `failures` most frequent reasons for failing."""
    rows = session.execute(DASHBOARD_PAGE, {"owner_key_id": owner_key_id, "limit": jobs, "window_s": window_s,
                                            "failures": failures}).mappings()
    return [DashboardRow(**row) for row in rows]
