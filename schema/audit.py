"""Verifying and purging the hash-chained audit log (the chain itself is built by a trigger, migration 0002).

Verification recomputes every row's hash in Postgres and walks the rows in chain order: an edited row
fails its hash, a deleted row leaves a gap in `chain_seq` and a `prev_hash` that no longer matches.
A purge deletes the oldest rows past the retention and leaves an anchor, so the rest still verifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, INTEGER, TEXT
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class AuditRow:
    """One event of a request's (or a job's) history, as `append_events` writes it."""

    job_id: str
    event: str
    request_id: int | None = None
    from_state: str | None = None
    to_state: str | None = None
    attempt: int | None = None
    worker: str | None = None
    detail: str | None = None


# One INSERT for a whole batch, whatever its size (no bind-parameter limit), so the batch is sealed as one.
APPEND_EVENTS = text("""
    INSERT INTO audit_events (job_id, request_id, event, from_state, to_state, attempt, worker, detail)
    SELECT * FROM unnest(:job_id, :request_id, :event, :from_state, :to_state, :attempt, :worker, :detail)
""").bindparams(
    bindparam("job_id", type_=ARRAY(TEXT)), bindparam("request_id", type_=ARRAY(BIGINT)),
    bindparam("event", type_=ARRAY(TEXT)), bindparam("from_state", type_=ARRAY(TEXT)),
    bindparam("to_state", type_=ARRAY(TEXT)), bindparam("attempt", type_=ARRAY(INTEGER)),
    bindparam("worker", type_=ARRAY(TEXT)), bindparam("detail", type_=ARRAY(TEXT)),
)


def append_events(session: Session, rows: Sequence[AuditRow]) -> None:
    """Append `rows` to the audit log in one statement (no commit)."""
    if not rows:
        return
    session.execute(APPEND_EVENTS, {name: [getattr(row, name) for row in rows] for name in AuditRow.__dataclass_fields__})

RECOMPUTED_CHAIN = text("""
    SELECT chain_seq, prev_hash, hash,
           audit_event_hash(prev_hash, chain_seq, job_id, request_id, event, from_state, to_state,
                            attempt, worker, detail, created_at) AS recomputed
    FROM audit_events ORDER BY chain_seq
""").execution_options(yield_per=5000)

LAST_ANCHOR = text("SELECT chain_seq, hash FROM audit_anchors ORDER BY chain_seq DESC LIMIT 1")


@dataclass
class ChainReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def verify_chain(session: Session, max_problems: int = 20) -> ChainReport:
    report = ChainReport()
    anchor = session.execute(LAST_ANCHOR).first()
    expected_seq, expected_prev = (anchor[0] + 1, anchor[1]) if anchor else (1, "")
    for row in session.execute(RECOMPUTED_CHAIN):
        report.checked += 1
        if row.chain_seq != expected_seq:
            report.problems.append(f"rows {expected_seq}..{row.chain_seq - 1} of the chain are missing")
        elif row.prev_hash != expected_prev:
            report.problems.append(f"row {row.chain_seq}: previous hash does not match row {row.chain_seq - 1}")
        if row.hash != row.recomputed:
            report.problems.append(f"row {row.chain_seq}: contents do not match its hash (edited)")
        expected_seq, expected_prev = row.chain_seq + 1, row.hash
        if len(report.problems) >= max_problems:
            break
    return report


def purge_older_than(session: Session, retention: timedelta) -> int:
    return purge_before(session, datetime.now(timezone.utc) - retention)


def purge_before(session: Session, cutoff: datetime) -> int:
    """Delete the events before `cutoff` (a contiguous prefix of the chain); returns how many."""
    last_purged = session.scalar(text("""
        SELECT coalesce(min(chain_seq) FILTER (WHERE created_at >= :cutoff), max(chain_seq) + 1) - 1
        FROM audit_events
    """), {"cutoff": cutoff})
    if not last_purged:
        return 0
    anchor_hash = session.scalar(text("SELECT hash FROM audit_events WHERE chain_seq = :seq"), {"seq": last_purged})
    if anchor_hash is None:
        return 0  # already purged up to there
    session.execute(text("SET LOCAL deepbatch.audit_purge = 'on'"))
    deleted = session.execute(text("DELETE FROM audit_events WHERE chain_seq <= :seq"), {"seq": last_purged}).rowcount
    session.execute(text(
        "INSERT INTO audit_anchors (chain_seq, hash, purged_before) VALUES (:seq, :hash, :cutoff)"),
        {"seq": last_purged, "hash": anchor_hash, "cutoff": cutoff})
    return deleted
