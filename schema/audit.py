"""Verifying and purging the sealed audit log (the seals themselves are written by triggers, migration 0007).

Each INSERT statement into audit_events is sealed as one: an audit_seals row holds how many events it
wrote, a digest of them in id order and a hash chained to the previous seal; audit_chain_head holds the
last seal's position and hash. Verification recomputes every digest and hash in Postgres and walks the
seals in chain order: an edited event fails its seal's digest, a deleted one its seal's count, a deleted
seal leaves a gap in `chain_seq`, and seals cut off the end leave the head pointing past the last one.
A purge deletes the oldest whole seals past the retention with their events, and leaves an anchor, so
the rest still verifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

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


# The digest expression of migration 0007's seal trigger (SEAL_DIGEST), recomputed here over each seal's events.
RECOMPUTED_SEALS = text("""
    WITH found AS (
        SELECT seal_id, count(*) AS events_found,
               encode(sha256(convert_to(string_agg(audit_event_text(id, seal_id, job_id, request_id, event,
                      from_state, to_state, attempt, worker, detail, created_at), '' ORDER BY id), 'UTF8')), 'hex')
               AS events_digest
        FROM audit_events GROUP BY seal_id
    )
    SELECT s.id, s.chain_seq, s.row_count, s.digest, s.prev_hash, s.hash,
           audit_seal_hash(s.prev_hash, s.chain_seq, s.id, s.row_count, s.first_event_id, s.last_event_id,
                           s.digest, s.created_at) AS recomputed_hash,
           coalesce(found.events_found, 0) AS events_found, found.events_digest
    FROM audit_seals s LEFT JOIN found ON found.seal_id = s.id
    ORDER BY s.chain_seq
""").execution_options(yield_per=1000)

# Events whose seal_id no seal has: their seal was deleted, or they were written with the triggers off.
UNSEALED_EVENTS = text("""
    SELECT e.seal_id, count(*) AS events FROM audit_events e
    WHERE NOT EXISTS (SELECT 1 FROM audit_seals s WHERE s.id = e.seal_id)
    GROUP BY e.seal_id ORDER BY e.seal_id LIMIT :limit
""")

LAST_ANCHOR = text("SELECT chain_seq, hash FROM audit_anchors ORDER BY chain_seq DESC LIMIT 1")
CHAIN_HEAD = text("SELECT chain_seq, hash FROM audit_chain_head")


@dataclass
class ChainReport:
    checked: int = 0  # events, in the seals walked
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def verify_chain(session: Session, max_problems: int = 20) -> ChainReport:
    """Walk the seals from the last purge's anchor (or the start) to the head, recomputing each one.

    All of it is read in one snapshot (REPEATABLE READ, unless the caller's transaction has begun already),
    so a seal or a purge committed meanwhile does not look like a head out of step with the seals.
    """
    if not session.in_transaction():
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    report = ChainReport()
    anchor = session.execute(LAST_ANCHOR).first()
    expected_seq, expected_prev = (anchor.chain_seq + 1, anchor.hash) if anchor else (1, "")
    for seal in session.execute(RECOMPUTED_SEALS):
        report.checked += seal.events_found
        report.problems += _seal_problems(seal, expected_seq, expected_prev)
        expected_seq, expected_prev = seal.chain_seq + 1, seal.hash
        if len(report.problems) >= max_problems:
            del report.problems[max_problems:]
            return report
    report.problems += _head_problems(session.execute(CHAIN_HEAD).first(), expected_seq - 1, expected_prev)
    for orphan in session.execute(UNSEALED_EVENTS, {"limit": max_problems}):
        report.problems.append(f"{orphan.events} events carry seal_id {orphan.seal_id}, which no seal has "
                               "(seal deleted, or events written with the triggers disabled)")
    del report.problems[max_problems:]
    return report


def _seal_problems(seal: Any, expected_seq: int, expected_prev: str) -> list[str]:
    name = f"seal {seal.chain_seq} (seal_id {seal.id})"
    problems = []
    if seal.chain_seq > expected_seq:
        problems.append(f"seals {expected_seq}..{seal.chain_seq - 1} of the chain are missing (deleted)")
    elif seal.chain_seq < expected_seq:  # only before the first seal: at or below the last anchor
        problems.append(f"{name}: precedes the last purge's anchor (seal {expected_seq - 1}) yet is still there")
    elif seal.prev_hash != expected_prev:
        problems.append(f"{name}: previous hash does not match seal {seal.chain_seq - 1}")
    if seal.hash != seal.recomputed_hash:
        problems.append(f"{name}: its fields do not match its hash (seal edited)")
    if seal.events_found < seal.row_count:
        problems.append(f"{name}: {seal.row_count - seal.events_found} of its {seal.row_count} events are missing "
                        "(deleted)")
    elif seal.events_found > seal.row_count:
        problems.append(f"{name}: {seal.events_found} events carry its seal_id, it sealed {seal.row_count} "
                        "(events added)")
    elif seal.events_digest != seal.digest:
        problems.append(f"{name}: its events do not match its digest (edited)")
    return problems


def _head_problems(head: Any, last_seq: int, last_hash: str) -> list[str]:
    """The head records the last seal written: seals deleted from the end leave it pointing past them."""
    if head is None:
        return ["the chain head (audit_chain_head) is missing"]
    if head.chain_seq > last_seq:
        return [f"seals {last_seq + 1}..{head.chain_seq} at the end of the chain are missing (truncated): "
                f"the chain ends at seal {last_seq}, its head at seal {head.chain_seq}"]
    if head.chain_seq < last_seq:
        return [f"the chain head is at seal {head.chain_seq}, behind its last seal {last_seq} (head edited)"]
    if head.hash != last_hash:
        return [f"the chain head's hash does not match seal {last_seq} (head or seal edited)"]
    return []


def purge_older_than(session: Session, retention: timedelta) -> int:
    return purge_before(session, datetime.now(timezone.utc) - retention)


# The end of the purge: the seal before the first one sealed at or after the cutoff (a contiguous prefix).
PURGE_END = text("""
    SELECT chain_seq, hash FROM audit_seals
    WHERE chain_seq = (SELECT coalesce(min(chain_seq) FILTER (WHERE created_at >= :cutoff), max(chain_seq) + 1) - 1
                       FROM audit_seals)
""")

# The purged seals' events lie in their id ranges (interleaved with other seals' under concurrency).
DELETE_SEALS_AND_EVENTS = text("""
    WITH purged AS (
        DELETE FROM audit_seals WHERE chain_seq <= :chain_seq RETURNING id, first_event_id, last_event_id
    )
    DELETE FROM audit_events
    WHERE id BETWEEN (SELECT min(first_event_id) FROM purged) AND (SELECT max(last_event_id) FROM purged)
      AND seal_id IN (SELECT id FROM purged)
""")


def purge_before(session: Session, cutoff: datetime) -> int:
    """Delete the whole seals sealed before `cutoff` and their events (no commit); returns how many events."""
    end = session.execute(PURGE_END, {"cutoff": cutoff}).first()
    if end is None:
        return 0  # nothing sealed before the cutoff, or purged up to there already
    # The append-only triggers let DELETEs through for as long as this is on: only these two statements.
    session.execute(text("SELECT set_config('deepbatch.audit_purge', 'on', true)"))
    deleted = session.execute(DELETE_SEALS_AND_EVENTS, {"chain_seq": end.chain_seq}).rowcount
    session.execute(text("SELECT set_config('deepbatch.audit_purge', 'off', true)"))
    session.execute(text(
        "INSERT INTO audit_anchors (chain_seq, hash, purged_before) VALUES (:chain_seq, :hash, :cutoff)"),
        {"chain_seq": end.chain_seq, "hash": end.hash, "cutoff": cutoff})
    return deleted
