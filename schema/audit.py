"""Verifying and purging the hash-chained audit log (the chain itself is built by a trigger, migration 0002).

Verification recomputes every row's hash in Postgres and walks the rows in chain order: an edited row
fails its hash, a deleted row leaves a gap in `chain_seq` and a `prev_hash` that no longer matches.
A purge deletes the oldest rows past the retention and leaves an anchor, so the rest still verifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import text
from sqlalchemy.orm import Session

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
