"""What a database superuser can do to the audit chain, and what the key and the off-site anchors still catch.

The attacker here has every right inside PostgreSQL: with `session_replication_role = replica` no trigger
fires, so seals, events, signatures and the head can all be deleted or rewritten at will.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from schema.audit import AuditRow, anchor_chain, append_events, purge_before, verify_chain
from schema.audit_signing import append_anchor, read_anchor_file, seal_signature
from tests.conftest import deepbatch, sqlalchemy_url
from tests.integration.test_audit import seal_of

pytestmark = pytest.mark.integration

KEY_SETTING = "DEEPBATCH_AUDIT_HMAC_KEY_FILE"


@pytest.fixture
def chain(scratch_database_url: str, tmp_path: Path):
    """A migrated database with a few sealed events, and the environment to run the CLI on it with the key."""
    env = {**os.environ, "DEEPBATCH_DATABASE_URL": scratch_database_url,
           "DEEPBATCH_BROKER_URL": "redis://127.0.0.1:6379/15", "DEEPBATCH_QUEUE_NAME": "audit-test-unused",
           KEY_SETTING: str(tmp_path / "audit.key")}
    engine = create_engine(sqlalchemy_url(scratch_database_url))
    append_batch(engine, 5)
    yield engine, env
    engine.dispose()


def append_batch(engine: Engine, size: int) -> int:
    """`size` events in one statement, committed; returns their seal's id."""
    with Session(engine) as session, session.begin():
        append_events(session, [AuditRow(job_id="batch_audit", event="probe", request_id=n) for n in range(size)])
        return session.scalar(text("SELECT max(seal_id) FROM audit_events"))


@pytest.fixture
def key(tmp_path: Path) -> bytes:
    """The audit key, in a file of its own as the README says to provision it."""
    key_file = tmp_path / "audit.key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    return key_file.read_bytes().strip()


def as_superuser(engine: Engine, *statements: str) -> None:
    """Statements run with every trigger off, as a superuser may."""
    with engine.begin() as connection:
        connection.execute(text("SET LOCAL session_replication_role = replica"))
        for statement in statements:
            connection.execute(text(statement))


def sign_head(engine: Engine, key: bytes | None, anchors: Path | None = None) -> int:
    """`deepbatch audit anchor [--append anchors]`, in this process; returns the signed seal's chain_seq."""
    with Session(engine) as session:
        report, anchor = anchor_chain(session, key)
        assert report.problems == [] and anchor is not None
        session.commit()
    if anchors is not None:
        append_anchor(anchors, anchor)
    return anchor.chain_seq


def problems(engine: Engine, key: bytes | None) -> list[str]:
    with Session(engine) as session:
        return verify_chain(session, key).problems


def test_a_truncated_tail_with_its_head_rewritten_is_caught_by_the_anchor_file(chain, key, tmp_path) -> None:
    engine, env = chain
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text(deepbatch("audit", "anchor", env=env).stdout)  # without --append: the line on stdout
    newest = append_batch(engine, 3)
    newest_seq, _ = seal_of(engine, newest)
    assert f"anchored seal {newest_seq} (signed), appended to {anchors}" in deepbatch(
        "audit", "anchor", "--append", str(anchors), env=env).stderr
    with engine.connect() as connection:
        newest_hash = connection.execute(text("SELECT hash FROM audit_seals WHERE id = :s"), {"s": newest}).scalar_one()
    as_superuser(engine, f"DELETE FROM audit_events WHERE seal_id = {newest}",
                 f"DELETE FROM audit_signatures WHERE chain_seq = {newest_seq}",
                 f"DELETE FROM audit_seals WHERE id = {newest}",
                 f"UPDATE audit_chain_head SET (chain_seq, hash) = (SELECT chain_seq, hash FROM audit_seals "
                 f"WHERE chain_seq = {newest_seq - 1})")
    assert problems(engine, key) == []  # inside the database nothing is left to show it, signatures included
    caught = deepbatch("audit", "verify", "--anchor", str(anchors), env=env, check=False)
    assert caught.returncode == 1, caught.stderr
    assert (f"{anchors} line 2: seal {newest_seq} (hash {newest_hash[:16]}…) is missing (the chain was truncated "
            f"back past this anchor: it ends at seal {newest_seq - 1})") in caught.stderr, caught.stderr
    assert f"{anchors} line 1" not in caught.stderr, caught.stderr


def test_an_intact_chain_passes_its_anchors_through_a_signed_purge(chain, key, tmp_path) -> None:
    engine, _ = chain
    anchors = tmp_path / "anchors.jsonl"
    sign_head(engine, key, anchors)  # the fixture's 5 events
    with engine.connect() as connection:
        cutoff = connection.execute(text("SELECT now()")).scalar_one()
    append_batch(engine, 4)
    sign_head(engine, key, anchors)
    append_batch(engine, 1)
    with Session(engine) as session, session.begin():
        assert purge_before(session, cutoff, key) == 5  # what line 1 anchored
    with engine.connect() as connection:
        assert connection.execute(text("SELECT hmac IS NOT NULL FROM audit_anchors")).scalar_one()
    lines = [(f"line {line_no}", anchor) for line_no, anchor in read_anchor_file(anchors)]
    with Session(engine) as session:
        report = verify_chain(session, key, lines)
    assert report.problems == [] and report.checked == 5 and "anchors checked: 2" in report.notes
    assert report.signing_notes == [f"seals {report.last_seq}..{report.last_seq} are not signed yet (written "
                                    "after the last `deepbatch audit anchor`)"]  # the batch of 1
    edited = lines[1][1].model_copy(update={"anchored_at": lines[1][1].anchored_at + timedelta(hours=1)})
    assert anchor_problems(engine, key, [("line 2", edited)]) == [
        f"line 2: its hmac does not match the key ({KEY_SETTING}): the line was edited, or written with another key"]
    # What a forged purge would look like: unsigned, or dated before the seals it took.
    as_superuser(engine, "UPDATE audit_anchors SET hmac = NULL")
    purge = f"the retention purge of seals up to 1 (sealed before {utc(cutoff)})"
    assert anchor_problems(engine, key, lines) == [
        f"line 1: seal 1 went in {purge}, which is not signed (run without {KEY_SETTING}, or forged)"]
    assert anchor_problems(engine, None, lines) == []
    as_superuser(engine, "UPDATE audit_anchors SET purged_before = purged_before - interval '1 hour'")
    assert anchor_problems(engine, None, lines)[0].startswith("line 1: seal 1 was sealed at ")
    assert anchor_problems(engine, None, lines)[0].endswith("took it (seals deleted and passed off as a purge)")


def anchor_problems(engine: Engine, key: bytes | None, anchors: list) -> list[str]:
    with Session(engine) as session:
        return verify_chain(session, key, anchors).problems


def forge_from(seal_id: int) -> str:
    """Re-seal the chain from `seal_id` on, with the edited events, and move the head: all a superuser needs."""
    return f"""
        DO $$
        DECLARE
            seal record;
            previous text;
            new_digest text;
            new_hash text;
        BEGIN
            FOR seal IN SELECT * FROM audit_seals
                        WHERE chain_seq >= (SELECT chain_seq FROM audit_seals WHERE id = {seal_id}) ORDER BY chain_seq
            LOOP
                previous := coalesce(previous, seal.prev_hash);
                SELECT encode(sha256(convert_to(string_agg(audit_event_text(id, seal_id, job_id, request_id, event,
                       from_state, to_state, attempt, worker, detail, created_at), '' ORDER BY id), 'UTF8')), 'hex')
                INTO new_digest FROM audit_events WHERE seal_id = seal.id;
                new_hash := audit_seal_hash(previous, seal.chain_seq, seal.id, seal.row_count, seal.first_event_id,
                                            seal.last_event_id, new_digest, seal.created_at);
                UPDATE audit_seals SET digest = new_digest, prev_hash = previous, hash = new_hash WHERE id = seal.id;
                previous := new_hash;
            END LOOP;
            UPDATE audit_chain_head SET hash = previous;
        END $$"""


def test_a_reforged_chain_fails_on_its_signature_when_the_key_is_set(chain, key) -> None:
    engine, _ = chain
    edited = append_batch(engine, 3)
    signed = append_batch(engine, 1)
    signed_seq, signed_name = seal_of(engine, signed)
    assert sign_head(engine, key) == signed_seq
    for statement in ("UPDATE audit_signatures SET hash = ''", "DELETE FROM audit_signatures",
                      "TRUNCATE audit_signatures"):
        with pytest.raises(ProgrammingError, match="append-only"), engine.begin() as connection:
            connection.execute(text(statement))
    as_superuser(engine, f"UPDATE audit_events SET detail = 'nothing happened' WHERE seal_id = {edited}",
                 forge_from(edited))
    rewritten = [f"{signed_name}: its hash is not the one signed at {signed_at(engine, signed_seq)} "
                 "(seal rewritten after signing)"]
    assert problems(engine, key) == problems(engine, None) == rewritten
    with Session(engine) as session:  # the key never vouches for a broken chain
        assert anchor_chain(session, key) == (verify_chain(session, key), None)
    # The forger signs the new hash too, with the only key at hand: not ours.
    with engine.connect() as connection:
        seal_hash, sealed_at, signed_time = connection.execute(text(
            "SELECT s.hash, s.created_at, g.signed_at FROM audit_seals s JOIN audit_signatures g USING (chain_seq) "
            "WHERE s.id = :s"), {"s": signed}).one()
    forged = seal_signature(secrets.token_bytes(32), signed_seq, seal_hash, sealed_at, signed_time)
    as_superuser(engine, f"UPDATE audit_signatures SET hash = '{seal_hash}', hmac = '{forged}'")
    assert problems(engine, None) == []  # without the key, a complete forgery
    assert problems(engine, key) == [
        f"{signed_name}: its signature (signed at {signed_at(engine, signed_seq)}) does not match the key "
        f"({KEY_SETTING}): signed with another key, or forged"]


def signed_at(engine: Engine, chain_seq: int) -> str:
    with engine.connect() as connection:
        moment = connection.execute(text("SELECT signed_at FROM audit_signatures WHERE chain_seq = :c"),
                                    {"c": chain_seq}).scalar_one()
    return utc(moment)


def utc(moment: datetime) -> str:
    """A time as the problem messages write it."""
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def test_anchor_verifies_what_came_since_the_last_signature(chain, key) -> None:
    """Before it signs, `anchor` walks only the seals after the newest signature the key made (`verify`
    walks them all), and refuses to sign a tail that does not verify."""
    engine, _ = chain
    sign_head(engine, key)
    append_batch(engine, 2)
    with Session(engine) as session:
        report, anchor = anchor_chain(session, key)
        session.commit()
    assert report.problems == [] and report.checked == 2 and anchor is not None and anchor.chain_seq == 2
    edited = append_batch(engine, 3)
    _, name = seal_of(engine, edited)
    as_superuser(engine, f"UPDATE audit_events SET detail = 'x' WHERE seal_id = {edited}")
    with Session(engine) as session:
        report, anchor = anchor_chain(session, key)
    assert anchor is None and report.checked == 3 and report.problems == [
        f"{name}: its events do not match its digest (edited)"]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM audit_signatures")).scalar_one() == 2
