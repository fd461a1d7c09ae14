"""Retention: drop whole finished jobs older than a cutoff, and the audit seals past the audit retention.

A job goes when its submission ended, none of its requests is queued or running, and nothing of it changed
since the cutoff (created, submitted, cancelled, a request's last transition). Its rows go in chunks, each
its own short transaction that takes the job's row lock with SKIP LOCKED (a job someone else holds is
skipped, to be purged by a later run) and checks again that none of its requests is unfinished: a running
job's rows are never locked, a job's rows never all at once. Its requests go first (results and dead
letters cascade), then, in one last transaction, every other table keyed by `job_id`, its file rows and
the job row, with an audited `job_purged` event; then the files on disk. An interrupted purge leaves the
job row and whatever rows remain, and the next run finishes it.

The audit log is not purged per job: a seal covers one statement's events, often of several jobs, and
deleting some of them breaks it (the append-only trigger refuses it anyway). So the audit log keeps its own
retention, DEEPBATCH_AUDIT_RETENTION_DAYS (the log outlives what it describes), and goes through
schema/audit.py's purge_before — whole seals, an anchor left behind — in steps of a few hundred seals, each
its own transaction. A purge never takes the audit log back further than that retention.

The SQL of retention is here rather than in producer/queries.py: it is one concept, and this module owns it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from producer.api.outputs import output_file_ids
from schema.audit import PURGE_END, AuditRow, append_events, purge_before

log = logging.getLogger(__name__)

AGE_UNITS = {"h": 3600, "d": 86400, "w": 7 * 86400}
AGE = re.compile(r"0*([0-9]{1,9})([hdw])")  # ASCII digits only; 9 digits of weeks still fit a timedelta
MAX_AGE = timedelta(days=100 * 365)  # older cutoffs are typos, and far ones overflow a datetime


def parse_age(value: str) -> timedelta:
    """`30d`, `12h`, `2w` → a timedelta; anything else is a ValueError that says what is wrong with it.
    No `m`: minutes or months? Retention is a matter of hours at the least."""
    match = AGE.fullmatch(value.strip())
    if match is None or match[1] == "0":
        raise ValueError(f"{value[:40]!r} is not an age like 30d, 12h or 2w (a whole number of hours h, days d "
                         "or weeks w, more than 0)")
    seconds = int(match[1]) * AGE_UNITS[match[2]]
    if seconds > MAX_AGE.total_seconds():
        raise ValueError(f"{value[:40]!r} is longer than {MAX_AGE.days // 365} years")
    return timedelta(seconds=seconds)


# Jobs whose submission ended and whose own timestamps are all before the cutoff, without a queued or running
# request (ix_requests_job_id_state answers that from the index). Oldest first.
PURGEABLE_JOBS = text("""
    SELECT j.id, j.created_at, j.total_lines, j.input_file_id FROM jobs j
    WHERE j.submitted_at < :cutoff AND j.created_at < :cutoff
      AND (j.cancel_requested_at IS NULL OR j.cancel_requested_at < :cutoff)
      AND NOT EXISTS (SELECT FROM requests r WHERE r.job_id = j.id AND r.state IN ('queued', 'running'))
    ORDER BY j.created_at, j.id
""")
# Whether a request of the job changed since the cutoff (a late retry, a requeue): reads the job's rows once,
# one job at a time, so that a database of many jobs is not scanned whole for a few.
CHANGED_SINCE = text("SELECT EXISTS (SELECT FROM requests WHERE job_id = :job_id AND updated_at >= :cutoff)")
# What a chunk's transaction holds first: the job's row, unless another transaction holds it.
LOCK_JOB = text("SELECT id FROM jobs WHERE id = :job_id FOR UPDATE SKIP LOCKED")
UNFINISHED = text("SELECT EXISTS (SELECT FROM requests WHERE job_id = :job_id AND state IN ('queued', 'running'))")
# One chunk of the job's requests; results and dead letters go with them (ON DELETE CASCADE). Only final
# states, and rows someone else holds are left for the next chunk or run.
DELETE_REQUESTS = text("""
    DELETE FROM requests WHERE id IN (
        SELECT id FROM requests
        WHERE job_id = :job_id AND state IN ('succeeded', 'failed', 'dead', 'cancelled', 'expired')
        LIMIT :chunk FOR UPDATE SKIP LOCKED)
""")
ANY_REQUEST = text("SELECT EXISTS (SELECT FROM requests WHERE job_id = :job_id)")
# Every table with a job_id column but requests (deleted in chunks above), audit_events (sealed: purged by
# seal) and jobs: results, dead_letters, and whatever per-job table a later migration adds.
JOB_KEYED_TABLES = text("""
    SELECT c.table_name FROM information_schema.columns c
    JOIN information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name
    WHERE c.table_schema = current_schema() AND c.column_name = 'job_id' AND t.table_type = 'BASE TABLE'
      AND c.table_name NOT IN ('jobs', 'requests', 'audit_events')
    ORDER BY c.table_name
""")
# The job's file rows: its output and error files, and its input file with its last job (another batch may
# have been made of the same file).
JOB_FILES = """
    id = ANY(:file_ids)
    OR (id = :input_file_id AND NOT EXISTS (SELECT FROM jobs WHERE input_file_id = :input_file_id AND id <> :job_id))
"""
FILE_ROWS = text(f"SELECT id FROM files WHERE {JOB_FILES}")
DELETE_FILES = text(f"DELETE FROM files WHERE {JOB_FILES} RETURNING id")
DELETE_JOB = text("DELETE FROM jobs WHERE id = :job_id")
# The audit events a purge up to `end` (PURGE_END's seal) takes, and the seal a step of `seals` seals stops at.
AUDIT_EVENTS_UP_TO = text("SELECT coalesce(sum(row_count), 0) FROM audit_seals WHERE chain_seq <= :chain_seq")
AUDIT_STEP_CUTOFF = text("""
    SELECT created_at FROM audit_seals WHERE chain_seq > coalesce((SELECT max(chain_seq) FROM audit_anchors), 0)
    ORDER BY chain_seq OFFSET :seals LIMIT 1
""")
AUDIT_SEALS_PER_STEP = 200  # a few tens of thousands of events per transaction at the recorder's seal sizes


@dataclass(frozen=True)
class PurgeableJob:
    job_id: str
    created_at: datetime
    requests: int  # its lines: one request row each
    input_file_id: str | None  # a batch of the HTTP API: its uploaded input file


@dataclass
class JobPurge:
    """What became of one job: its requests deleted, its files, and why it stopped, if it did."""

    job_id: str
    requests_deleted: int = 0
    files_deleted: list[str] = field(default_factory=list)
    skipped: str | None = None  # the job stays (whole or in part): locked by another, or running again

    @property
    def purged(self) -> bool:
        return self.skipped is None


def purgeable_jobs(session: Session, cutoff: datetime) -> list[PurgeableJob]:
    """The finished jobs of which nothing changed since `cutoff`, oldest first."""
    jobs = [PurgeableJob(row.id, row.created_at, row.total_lines, row.input_file_id)
            for row in session.execute(PURGEABLE_JOBS, {"cutoff": cutoff})]
    return [job for job in jobs if not session.scalar(CHANGED_SINCE, {"job_id": job.job_id, "cutoff": cutoff})]


def job_files(session: Session, job: PurgeableJob) -> list[str]:
    """The file rows that go with the job: its output and error files, its input file if no other job's."""
    return list(session.scalars(FILE_ROWS, file_parameters(job)))


def file_parameters(job: PurgeableJob) -> dict[str, object]:
    return {"job_id": job.job_id, "file_ids": list(output_file_ids(job.job_id)),
            "input_file_id": job.input_file_id}


def purge_job(sessions: sessionmaker[Session], job: PurgeableJob, files_dir: Path, actor: str,
              chunk: int = 5000, on_chunk: Callable[[int], None] = lambda deleted: None) -> JobPurge:
    """Delete the job in chunks of `chunk` requests, each its own transaction, then the rest of it; calls
    `on_chunk` with the requests each chunk deleted."""
    outcome = JobPurge(job.job_id)
    while True:
        with sessions.begin() as session:
            outcome.skipped = job_held(session, job.job_id)
            if outcome.skipped is not None:
                return outcome
            deleted = session.execute(DELETE_REQUESTS, {"job_id": job.job_id, "chunk": chunk}).rowcount
            if deleted == 0:
                if session.scalar(ANY_REQUEST, {"job_id": job.job_id}):
                    outcome.skipped = "some of its requests are locked by another transaction"
                    return outcome
                outcome.files_deleted = delete_job_rows(session, job, outcome.requests_deleted, actor)
                break
        outcome.requests_deleted += deleted
        on_chunk(deleted)
    remove_files(files_dir, outcome.files_deleted)
    return outcome


def job_held(session: Session, job_id: str) -> str | None:
    """Lock the job's row for this transaction; why the job cannot be purged now, or None if it can."""
    if session.scalar(LOCK_JOB, {"job_id": job_id}) is None:
        return "locked by another transaction (or gone)"
    if session.scalar(UNFINISHED, {"job_id": job_id}):
        return "it has queued or running requests again"
    return None


def delete_job_rows(session: Session, job: PurgeableJob, requests_deleted: int, actor: str) -> list[str]:
    """The last transaction of a job's purge: the rows keyed by its id, its file rows, the job row and the
    audit event that says so. Returns the ids of the files whose rows went."""
    for table in session.scalars(JOB_KEYED_TABLES).all():
        quoted = session.get_bind().dialect.identifier_preparer.quote(table)
        session.execute(text(f"DELETE FROM {quoted} WHERE job_id = :job_id"), {"job_id": job.job_id})
    files = list(session.scalars(DELETE_FILES, file_parameters(job)))
    session.execute(DELETE_JOB, {"job_id": job.job_id})
    detail = f"{requests_deleted} requests" + (f"; files {', '.join(files)}" if files else "")
    append_events(session, [AuditRow(job_id=job.job_id, event="job_purged", worker=actor, detail=detail)])
    return files


def remove_files(files_dir: Path, file_ids: Iterable[str]) -> None:
    """After the rows are gone: a file left on disk is only space, a row without its file would be an error."""
    for file_id in file_ids:
        try:
            (files_dir / file_id).unlink(missing_ok=True)
        except OSError as error:
            log.warning("could not remove %s: %s", files_dir / file_id, error.strerror)


def audit_cutoff(cutoff: datetime, now: datetime, audit_retention: timedelta) -> datetime:
    """The older of the purge's cutoff and the audit retention's: a purge never shortens the audit log."""
    return min(cutoff, now - audit_retention)


def audit_events_before(session: Session, cutoff: datetime) -> int:
    """How many audit events a purge of the seals sealed before `cutoff` would delete."""
    end = session.execute(PURGE_END, {"cutoff": cutoff}).first()
    return 0 if end is None else session.scalar(AUDIT_EVENTS_UP_TO, {"chain_seq": end.chain_seq})


def purge_audit(sessions: sessionmaker[Session], cutoff: datetime, key: bytes | None,
                on_step: Callable[[int], None] = lambda deleted: None) -> int:
    """schema/audit.py's purge_before up to `cutoff`, in steps of about AUDIT_SEALS_PER_STEP seals, each its
    own transaction and its own anchor (each step's cutoff is a seal's time, so every anchor is truthful);
    returns how many events went."""
    deleted, seals = 0, AUDIT_SEALS_PER_STEP
    while True:
        with sessions.begin() as session:
            step_cutoff = session.scalar(AUDIT_STEP_CUTOFF, {"seals": seals})
            step_cutoff = cutoff if step_cutoff is None else min(step_cutoff, cutoff)
            step = purge_before(session, step_cutoff, key)
        deleted += step
        on_step(step)
        if step_cutoff == cutoff:
            return deleted
        # Seals are timed when their transaction began, so one may be older than the seal before it: a step
        # that took nothing looks further on, rather than stopping short of the cutoff.
        seals = AUDIT_SEALS_PER_STEP if step else seals * 2


def vacuum(sessions: sessionmaker[Session]) -> None:
    """VACUUM (ANALYZE) the tables a purge shrinks: their free space is reused by new rows, and the planner
    sees their new sizes. It returns to the OS only empty pages at a table's end (README: Retention)."""
    with sessions() as session:
        tables = ["jobs", "requests", "files", "audit_events", "audit_seals", *session.scalars(JOB_KEYED_TABLES)]
    engine = sessions.kw["bind"]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for table in tables:
            connection.execute(text(f"VACUUM (ANALYZE) {engine.dialect.identifier_preparer.quote(table)}"))
