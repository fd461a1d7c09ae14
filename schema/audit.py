"""Verifying and purging the sealed audit log (the seals themselves are written by triggers, migration 0007).

Each INSERT statement into audit_events is sealed as one: an audit_seals row holds how many events it
wrote, a digest of them in id order and a hash chained to the previous seal; audit_chain_head holds the
last seal's position and hash. Verification recomputes every digest and hash in Postgres and walks the
seals in chain order: an edited event fails its seal's digest, a deleted one its seal's count, a deleted
seal leaves a gap in `chain_seq`, and seals cut off the end leave the head pointing past the last one.
A purge deletes the oldest whole seals past the retention with their events, and leaves an anchor, so
the rest still verifies.

All of this is computed inside the database, so whoever controls it can recompute it: the signatures and
the off-site anchors of schema/audit_signing.py are what it cannot forge. Verification checks them too:
a signed seal must keep its signed hash, a signature must match the key, and every seal of an anchor
file must still be in the chain (or gone in a purge of what was sealed before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT, INTEGER, TEXT
from sqlalchemy.orm import Session

from schema.audit_signing import KEY_SETTING, Anchor, purge_signature, seal_signature, signature_matches, signed_anchor


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
    columns = {name: [getattr(row, name) for row in rows] for name in AuditRow.__dataclass_fields__}
    session.execute(APPEND_EVENTS, columns)


# The digest expression of migration 0007's seal trigger (SEAL_DIGEST), recomputed here over each seal's events:
# those of the seals after `:after` in the chain (-1: all of them), whose events have ids from `:first_event_id`.
RECOMPUTED_SEALS = text("""
    WITH walked AS (SELECT * FROM audit_seals WHERE chain_seq > :after), found AS (
        SELECT seal_id, count(*) AS events_found,
               encode(sha256(convert_to(string_agg(audit_event_text(id, seal_id, job_id, request_id, event,
                      from_state, to_state, attempt, worker, detail, created_at), '' ORDER BY id), 'UTF8')), 'hex')
               AS events_digest
        FROM audit_events WHERE id >= :first_event_id AND seal_id IN (SELECT id FROM walked) GROUP BY seal_id
    )
    SELECT s.id, s.chain_seq, s.row_count, s.digest, s.prev_hash, s.hash,
           audit_seal_hash(s.prev_hash, s.chain_seq, s.id, s.row_count, s.first_event_id, s.last_event_id,
                           s.digest, s.created_at) AS recomputed_hash,
           coalesce(found.events_found, 0) AS events_found, found.events_digest
    FROM walked s LEFT JOIN found ON found.seal_id = s.id
    ORDER BY s.chain_seq
""").execution_options(yield_per=1000)
FIRST_EVENT_AFTER = text("SELECT coalesce(min(first_event_id), 0) FROM audit_seals WHERE chain_seq > :after")

# Events whose seal_id no seal has: their seal was deleted, or they were written with the triggers off.
UNSEALED_EVENTS = text("""
    SELECT e.seal_id, count(*) AS events FROM audit_events e
    WHERE e.id >= :first_event_id AND NOT EXISTS (SELECT 1 FROM audit_seals s WHERE s.id = e.seal_id)
    GROUP BY e.seal_id ORDER BY e.seal_id LIMIT :limit
""")

LAST_PURGE = text("SELECT chain_seq, hash FROM audit_anchors ORDER BY chain_seq DESC LIMIT 1")
PURGES = text("SELECT chain_seq, hash, purged_before, hmac FROM audit_anchors ORDER BY chain_seq")
CHAIN_HEAD = text("SELECT chain_seq, hash FROM audit_chain_head")
SIGNATURES = text("""
    SELECT chain_seq, hash, sealed_at, signed_at, hmac FROM audit_signatures WHERE chain_seq > :after
    ORDER BY chain_seq, id
""")
# The newest signed seals still in the chain with their signed hash; the newest whose HMAC is the key's is
# where `anchor` resumes verifying.
SIGNED_SEALS = text("""
    SELECT g.chain_seq, g.hash, g.sealed_at, g.signed_at, g.hmac FROM audit_signatures g
    JOIN audit_seals s ON s.chain_seq = g.chain_seq AND s.hash = g.hash
    WHERE g.chain_seq > :after ORDER BY g.chain_seq DESC, g.id DESC LIMIT 100
""")
ANCHORED_SEALS = text("SELECT chain_seq, hash FROM audit_seals WHERE chain_seq = ANY(:chain_seqs)").bindparams(
    bindparam("chain_seqs", type_=ARRAY(BIGINT)))


@dataclass
class ChainReport:
    checked: int = 0  # events, in the seals walked
    problems: list[str] = field(default_factory=list)  # each one breaks the chain: exit 1
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    last_seq: int = 0  # where the chain ends (the last seal walked, or the last purge's anchor)
    signatures_checked: bool = False  # the key was there to check them
    last_signed_seq: int = 0  # the newest seal with a signature that matched the key (or the last purged)

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def signing_notes(self) -> list[str]:
        """What the signatures leave unprotected: everything without the key, else the tail since the last."""
        if not self.signatures_checked:
            return [f"{KEY_SETTING} is not set: seal signatures were not checked, and a database superuser could "
                    "rewrite the whole chain undetected (README: the audit log and a database superuser)"]
        if self.last_seq > self.last_signed_seq:
            return [f"seals {self.last_signed_seq + 1}..{self.last_seq} are not signed yet (written after the last "
                    "`deepbatch audit anchor`)"]
        return []


def verify_chain(session: Session, key: bytes | None = None, anchors: Sequence[tuple[str, Anchor]] = (),
                 max_problems: int = 20, since_signed: bool = False) -> ChainReport:
    """Walk the seals from the last purge's anchor (or the start) to the head, recomputing each one.

    With `key`, every signature (and signed purge) must match it; without, signatures are compared with the
    seals' hashes only. `anchors` are (label, anchor) pairs of an anchor file: each anchored seal must still
    be in the chain with its anchored hash, or have gone in a retention purge of what was sealed before it.
    All of it is read in one snapshot (REPEATABLE READ, unless the caller's transaction has begun already),
    so a seal or a purge committed meanwhile does not look like a head out of step with the seals.

    `since_signed` (with `key`) starts after the newest seal whose signature still matches it instead: what
    `anchor` needs before it signs the head, at the cost of the seals written since (a whole walk reads
    every event: 60,000 to 130,000 a second on 2 cores, bench/audit_anchor.py).
    """
    if not session.in_transaction():
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    report = ChainReport(signatures_checked=key is not None)
    walk, expected_prev = _walk_start(session, key if since_signed else None, report)
    signatures: dict[int, list[Any]] = {}
    for signature in session.execute(SIGNATURES, {"after": report.last_seq}):
        signatures.setdefault(signature.chain_seq, []).append(signature)
    for seal in session.execute(RECOMPUTED_SEALS, walk):
        report.checked += seal.events_found
        report.problems += _seal_problems(seal, report.last_seq + 1, expected_prev)
        report.problems += _signature_problems(seal, signatures.pop(seal.chain_seq, []), key, report)
        report.last_seq, expected_prev = seal.chain_seq, seal.hash
        if len(report.problems) >= max_problems:
            del report.problems[max_problems:]
            return report
    report.problems += _head_problems(session.execute(CHAIN_HEAD).first(), report.last_seq, expected_prev)
    for orphan in session.execute(UNSEALED_EVENTS, {"limit": max_problems, "first_event_id": walk["first_event_id"]}):
        report.problems.append(f"{orphan.events} events carry seal_id {orphan.seal_id}, which no seal has "
                               "(seal deleted, or events written with the triggers disabled)")
    for chain_seq, lost in signatures.items():
        where = f"truncated: the chain ends at seal {report.last_seq}" if chain_seq > report.last_seq else "deleted"
        report.problems.append(f"seal {chain_seq} was signed at {_when(lost[0].signed_at)} but is no longer in "
                               f"the chain ({where})")
    purges = session.execute(PURGES).all()
    report.problems += _purge_problems(purges, key, report.notes)
    report.problems += _anchor_problems(session, anchors, purges, key, report)
    del report.problems[max_problems:]
    return report


def _walk_start(session: Session, resume_key: bytes | None, report: ChainReport) -> tuple[dict[str, int], str]:
    """Where the walk starts: after the last purge's anchor (or at the start), walking every seal and event
    so that stale seals and orphaned events show; with `resume_key`, after the newest seal still carrying the
    hash signed with it. Sets the report's `last_seq` to the seal before the walk; returns the walk's bounds
    and that seal's hash."""
    purge = session.execute(LAST_PURGE).first()
    report.last_seq, last_hash = (purge.chain_seq, purge.hash) if purge else (0, "")
    walk = {"after": -1, "first_event_id": 0}
    for signed in session.execute(SIGNED_SEALS, {"after": report.last_seq}) if resume_key else ():
        if signature_matches(seal_signature(resume_key, signed.chain_seq, signed.hash, signed.sealed_at,
                                            signed.signed_at), signed.hmac):
            report.last_seq, last_hash = signed.chain_seq, signed.hash
            walk = {"after": signed.chain_seq,
                    "first_event_id": session.scalar(FIRST_EVENT_AFTER, {"after": signed.chain_seq})}
            break
    report.last_signed_seq = report.last_seq
    return walk, last_hash


def _when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def _seal_name(seal: Any) -> str:
    return f"seal {seal.chain_seq} (seal_id {seal.id})"


def _seal_problems(seal: Any, expected_seq: int, expected_prev: str) -> list[str]:
    name = _seal_name(seal)
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


def _signature_problems(seal: Any, signatures: list[Any], key: bytes | None, report: ChainReport) -> list[str]:
    """A signed seal keeps the hash it was signed with; with the key, each signature must be the key's."""
    problems = []
    for signature in signatures:
        signed = f"signed at {_when(signature.signed_at)}"
        if signature.hash != seal.hash:
            problems.append(f"{_seal_name(seal)}: its hash is not the one {signed} (seal rewritten after signing)")
        elif key is not None and not signature_matches(
                seal_signature(key, signature.chain_seq, signature.hash, signature.sealed_at, signature.signed_at),
                signature.hmac):
            problems.append(f"{_seal_name(seal)}: its signature ({signed}) does not match the key "
                            f"({KEY_SETTING}): signed with another key, or forged")
        elif key is not None:
            report.last_signed_seq = seal.chain_seq
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


def _purge_name(purge: Any) -> str:
    return f"the retention purge of seals up to {purge.chain_seq} (sealed before {_when(purge.purged_before)})"


def _purge_problems(purges: Sequence[Any], key: bytes | None, notes: list[str]) -> list[str]:
    """With the key, a purge that carries a signature must carry the key's; an unsigned one is noted."""
    if key is None:
        return []
    problems = []
    for purge in purges:
        if purge.hmac is None:
            notes.append(f"{_purge_name(purge)} is not signed (run without {KEY_SETTING}, or forged)")
        elif not signature_matches(purge_signature(key, purge.chain_seq, purge.hash, purge.purged_before),
                                   purge.hmac):
            problems.append(f"{_purge_name(purge)}: its signature does not match the key: signed with another "
                            "key, or forged")
    return problems


def _anchor_problems(session: Session, anchors: Sequence[tuple[str, Anchor]], purges: Sequence[Any],
                     key: bytes | None, report: ChainReport) -> list[str]:
    """Each anchored seal is still in the chain with its hash, or went in a purge that may have taken it."""
    found = dict(session.execute(ANCHORED_SEALS, {"chain_seqs": [anchor.chain_seq for _, anchor in anchors]}).all())
    problems = []
    for label, anchor in anchors:
        if key is not None and anchor.hmac is not None and not signature_matches(anchor.expected_hmac(key),
                                                                                  anchor.hmac):
            problems.append(f"{label}: its hmac does not match the key ({KEY_SETTING}): the line was edited, or "
                            "written with another key")
            continue
        if anchor.chain_seq == 0:
            continue
        purge = next((purge for purge in purges if purge.chain_seq >= anchor.chain_seq), None)
        if purge is not None:
            problems += _purged_anchor_problems(label, anchor, purge, key)
        elif anchor.chain_seq not in found:
            where = (f"the chain was truncated back past this anchor: it ends at seal {report.last_seq}"
                     if anchor.chain_seq > report.last_seq else "deleted from the chain")
            problems.append(f"{label}: seal {anchor.chain_seq} (hash {anchor.hash[:16]}…) is missing ({where})")
        elif found[anchor.chain_seq] != anchor.hash:
            problems.append(f"{label}: seal {anchor.chain_seq} has hash {found[anchor.chain_seq][:16]}…, the anchor "
                            f"says {anchor.hash[:16]}… (seal rewritten after it was anchored)")
    if anchors:
        unsigned = sum(anchor.hmac is None for _, anchor in anchors)
        report.notes.append(f"anchors checked: {len(anchors)}" + (f", {unsigned} of them without an hmac"
                                                                   if unsigned and key is not None else ""))
    return problems


def _purged_anchor_problems(label: str, anchor: Anchor, purge: Any, key: bytes | None) -> list[str]:
    if anchor.sealed_at is not None and anchor.sealed_at >= purge.purged_before:
        return [f"{label}: seal {anchor.chain_seq} was sealed at {_when(anchor.sealed_at)}, yet {_purge_name(purge)} "
                "took it (seals deleted and passed off as a purge)"]
    if purge.chain_seq == anchor.chain_seq and purge.hash != anchor.hash:
        return [f"{label}: seal {anchor.chain_seq}'s hash in {_purge_name(purge)} is not the anchored one"]
    if key is not None and purge.hmac is None:
        return [f"{label}: seal {anchor.chain_seq} went in {_purge_name(purge)}, which is not signed "
                f"(run without {KEY_SETTING}, or forged)"]
    return []


HEAD_SEAL = text("""
    SELECT h.chain_seq, h.hash, s.created_at AS sealed_at
    FROM audit_chain_head h LEFT JOIN audit_seals s ON s.chain_seq = h.chain_seq
""")
INSERT_SIGNATURE = text("""
    INSERT INTO audit_signatures (chain_seq, hash, sealed_at, signed_at, hmac)
    VALUES (:chain_seq, :hash, :sealed_at, :anchored_at, :hmac)
""")


def anchor_chain(session: Session, key: bytes | None) -> tuple[ChainReport, Anchor | None]:
    """Verify the chain since its last signature and, if intact, sign its head in the same snapshot (no commit).

    The head is signed only once the seals after the last signed one verified and chain onto it, so the key
    never vouches for a broken chain; what lies before that signature is vouched for by it (and checked
    whole by `verify`). Without `key` the whole chain is verified and the anchor returned unsigned.
    """
    report = verify_chain(session, key, since_signed=True)
    if not report.intact:
        return report, None
    head = session.execute(HEAD_SEAL).one()
    anchor = signed_anchor(key, head.chain_seq, head.hash, head.sealed_at)
    if key is not None and head.sealed_at is not None:
        session.execute(INSERT_SIGNATURE, anchor.model_dump())
        report.last_signed_seq = head.chain_seq
    return report, anchor


def purge_older_than(session: Session, retention: timedelta, key: bytes | None = None) -> int:
    return purge_before(session, datetime.now(timezone.utc) - retention, key)


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
    ), signatures AS (
        DELETE FROM audit_signatures WHERE chain_seq <= :chain_seq
    )
    DELETE FROM audit_events
    WHERE id BETWEEN (SELECT min(first_event_id) FROM purged) AND (SELECT max(last_event_id) FROM purged)
      AND seal_id IN (SELECT id FROM purged)
""")


def purge_before(session: Session, cutoff: datetime, key: bytes | None = None) -> int:
    """Delete the whole seals sealed before `cutoff`, their events and signatures (no commit); returns how many
    events. With `key`, the anchor left behind is signed, so that a superuser cannot pass a deletion off as a
    purge."""
    end = session.execute(PURGE_END, {"cutoff": cutoff}).first()
    if end is None:
        return 0  # nothing sealed before the cutoff, or purged up to there already
    # The append-only triggers let DELETEs through for as long as this is on: only this statement.
    session.execute(text("SELECT set_config('deepbatch.audit_purge', 'on', true)"))
    deleted = session.execute(DELETE_SEALS_AND_EVENTS, {"chain_seq": end.chain_seq}).rowcount
    session.execute(text("SELECT set_config('deepbatch.audit_purge', 'off', true)"))
    signature = None if key is None else purge_signature(key, end.chain_seq, end.hash, cutoff)
    session.execute(text("INSERT INTO audit_anchors (chain_seq, hash, purged_before, hmac) "
                         "VALUES (:chain_seq, :hash, :cutoff, :hmac)"),
                    {"chain_seq": end.chain_seq, "hash": end.hash, "cutoff": cutoff, "hmac": signature})
    return deleted
