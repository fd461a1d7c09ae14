"""The audit log is append-only and sealed per statement in a hash chain: tampering is refused or detected;
purges keep it verifiable."""

from __future__ import annotations

import os
import threading

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from schema.audit import AuditRow, append_events, purge_before, verify_chain
from schema.migrate import downgrade, upgrade
from schema.tables import AuditEvent

from tests.conftest import deepbatch, sqlalchemy_url

pytestmark = pytest.mark.integration

# The triggers that refuse UPDATE and DELETE, and what someone with the rights to disable them could do.
GUARDS = {"audit_events": "audit_events_append_only", "audit_seals": "audit_seals_append_only",
          "audit_chain_head": "audit_chain_head_append_only"}


@pytest.fixture
def audited(scratch_database_url: str, tmp_path):
    """A database with one submitted job (a few audit events), and the environment to run the CLI on it."""
    env = {**os.environ, "DEEPBATCH_DATABASE_URL": scratch_database_url,
           "DEEPBATCH_BROKER_URL": "redis://127.0.0.1:6379/15", "DEEPBATCH_QUEUE_NAME": "audit-test-unused"}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{bad\n')
    deepbatch("submit", str(prompts), env=env)
    engine = create_engine(sqlalchemy_url(scratch_database_url))
    yield engine, env
    engine.dispose()


def verify(env: dict) -> tuple[int, str]:
    completed = deepbatch("audit", "verify", env=env, check=False)
    return completed.returncode, completed.stderr


def problems(engine: Engine) -> list[str]:
    """The same check as `deepbatch audit verify`, in this process (faster than the CLI)."""
    with Session(engine) as session:
        return verify_chain(session).problems


def job_of(engine: Engine) -> str:
    with engine.connect() as connection:
        return connection.execute(text("SELECT id FROM jobs ORDER BY created_at LIMIT 1")).scalar_one()


def append_batch(engine: Engine, size: int, event: str = "probe") -> int:
    """`size` events in one append_events statement, committed; returns their seal's id."""
    job_id = job_of(engine)
    with Session(engine) as session, session.begin():
        append_events(session, [AuditRow(job_id=job_id, event=event, request_id=n, detail=f"#{n}")
                                for n in range(size)])
        return session.scalar(text("SELECT max(seal_id) FROM audit_events"))


def seal_of(engine: Engine, seal_id: int) -> tuple[int, str]:
    """The problem messages' name for the seal: its place in the chain and its id."""
    with engine.connect() as connection:
        chain_seq = connection.execute(text("SELECT chain_seq FROM audit_seals WHERE id = :s"),
                                       {"s": seal_id}).scalar_one()
    return chain_seq, f"seal {chain_seq} (seal_id {seal_id})"


def tamper(engine: Engine, *statements: str) -> None:
    with engine.begin() as connection:
        for table, trigger in GUARDS.items():
            connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}"))
        for statement in statements:
            connection.execute(text(statement))
        for table, trigger in GUARDS.items():
            connection.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER {trigger}"))


def test_an_untouched_chain_verifies(audited) -> None:
    _, env = audited
    code, output = verify(env)
    assert code == 0 and "audit chain intact: 5 events" in output, output
    assert "note: DEEPBATCH_AUDIT_HMAC_KEY_FILE is not set: seal signatures were not checked" in output, output


@pytest.mark.parametrize("statement", [
    "UPDATE audit_events SET detail = 'x'", "DELETE FROM audit_events",
    "UPDATE audit_seals SET row_count = 0", "DELETE FROM audit_seals", "TRUNCATE audit_seals",
    "UPDATE audit_chain_head SET chain_seq = chain_seq - 1", "DELETE FROM audit_chain_head",
])
def test_updates_and_deletes_are_refused(audited, statement: str) -> None:
    engine, _ = audited
    with pytest.raises(ProgrammingError, match="append-only"), engine.begin() as connection:
        connection.execute(text(statement))


def test_a_batch_insert_makes_exactly_one_seal(audited) -> None:
    engine, _ = audited
    with engine.connect() as connection:
        seals_before = connection.execute(text("SELECT count(*) FROM audit_seals")).scalar_one()
    seal_id = append_batch(engine, 256)
    with engine.connect() as connection:
        seals = connection.execute(text("SELECT count(*) FROM audit_seals")).scalar_one()
        row_count, first, last = connection.execute(text(
            "SELECT row_count, first_event_id, last_event_id FROM audit_seals WHERE id = :s"), {"s": seal_id}).one()
        carried = connection.execute(text("SELECT count(*), min(id), max(id) FROM audit_events WHERE seal_id = :s"),
                                     {"s": seal_id}).one()
    assert seals == seals_before + 1
    assert (row_count, first, last) == tuple(carried) and row_count == 256
    assert problems(engine) == []


def insert_through_a_cte(engine: Engine, job_id: str) -> int:
    """As worker/transitions.py writes events: the audit INSERTs feed on a data-modifying CTE."""
    with engine.begin() as connection:
        touched = connection.execute(text("SELECT count(*) FROM requests WHERE job_id = :j"),
                                     {"j": job_id}).scalar_one()
        connection.execute(text("""
            WITH moved AS (UPDATE requests SET updated_at = now() WHERE job_id = :j RETURNING id, job_id, attempt),
                 audited AS (INSERT INTO audit_events (job_id, request_id, event, attempt)
                             SELECT job_id, id, 'touched', attempt FROM moved ORDER BY id)
            INSERT INTO audit_events (job_id, event, detail) SELECT :j, 'touched_all', count(*)::text FROM moved
        """), {"j": job_id})
    return touched + 1  # an event per request, and one for them all


def insert_by_copy(engine: Engine, job_id: str) -> int:
    with engine.begin() as connection:
        cursor = connection.connection.driver_connection.cursor()
        with cursor.copy("COPY audit_events (job_id, event, detail) FROM STDIN") as copy:
            for n in range(3):
                copy.write_row((job_id, "copied", None if n == 1 else str(n)))
    return 3


def insert_one_orm_row(engine: Engine, job_id: str) -> int:
    with Session(engine) as session, session.begin():
        session.add(AuditEvent(job_id=job_id, event="orm_row", detail=""))
    return 1


@pytest.mark.parametrize("insert", [insert_through_a_cte, insert_by_copy, insert_one_orm_row])
def test_every_kind_of_insert_is_sealed_as_one(audited, insert) -> None:
    engine, _ = audited
    with engine.connect() as connection:
        last_seal = connection.execute(text("SELECT max(id) FROM audit_seals")).scalar_one()
    rows = insert(engine, job_of(engine))
    with engine.connect() as connection:
        new_seals = connection.execute(text("SELECT id, row_count FROM audit_seals WHERE id > :s"),
                                       {"s": last_seal}).all()
        carried = connection.execute(text("SELECT count(*) FROM audit_events WHERE seal_id > :s"),
                                     {"s": last_seal}).scalar_one()
    assert [row_count for _, row_count in new_seals] == [rows] and carried == rows
    assert problems(engine) == []


def test_a_seal_id_given_explicitly_is_refused(audited) -> None:
    """Else a row could claim a seal number a later statement will draw, and break that statement."""
    engine, _ = audited
    with pytest.raises(ProgrammingError, match="wrote rows of seals"), engine.begin() as connection:
        connection.execute(text("INSERT INTO audit_events (job_id, event, seal_id) "
                                "VALUES (:j, 'forged', nextval('audit_seal_ids') + 5)"), {"j": job_of(engine)})


def test_an_edited_row_is_detected(audited) -> None:
    engine, env = audited
    seal_id = append_batch(engine, 4)
    _, name = seal_of(engine, seal_id)
    tamper(engine, f"UPDATE audit_events SET detail = 'nothing happened' "
                   f"WHERE id = (SELECT first_event_id + 1 FROM audit_seals WHERE id = {seal_id})")
    code, output = verify(env)
    assert code == 1 and f"{name}: its events do not match its digest (edited)" in output, output


def test_a_null_edited_into_an_empty_string_is_detected(audited) -> None:
    engine, _ = audited
    seal_id = append_batch(engine, 2)
    _, name = seal_of(engine, seal_id)
    tamper(engine, f"UPDATE audit_events SET worker = '' WHERE seal_id = {seal_id}")
    assert problems(engine) == [f"{name}: its events do not match its digest (edited)"]


def test_the_session_time_zone_does_not_change_a_digest(audited) -> None:
    """Sealed in one time zone, verified in another: the digest must not hang on how a time is written."""
    engine, _ = audited
    with Session(engine) as session, session.begin():
        session.execute(text("SET LOCAL TIME ZONE 'Asia/Kathmandu'"))
        append_events(session, [AuditRow(job_id=job_of(engine), event="probe")])
    with Session(engine) as session:
        session.execute(text("SET TIME ZONE 'America/St_Johns'"))
        assert verify_chain(session).problems == []


def test_a_deleted_row_in_the_middle_is_detected(audited) -> None:
    engine, env = audited
    seal_id = append_batch(engine, 5)
    append_batch(engine, 5)  # the chain goes on after it
    _, name = seal_of(engine, seal_id)
    tamper(engine, f"DELETE FROM audit_events "
                   f"WHERE id = (SELECT first_event_id + 2 FROM audit_seals WHERE id = {seal_id})")
    code, output = verify(env)
    assert code == 1 and f"{name}: 1 of its 5 events are missing (deleted)" in output, output


def test_a_deleted_seal_in_the_middle_is_detected(audited) -> None:
    """With its events (a gap in the chain), and without them (events no seal covers)."""
    engine, _ = audited
    with_events, without_events = append_batch(engine, 3), append_batch(engine, 2)
    append_batch(engine, 1)
    first, _ = seal_of(engine, with_events)
    second, _ = seal_of(engine, without_events)
    tamper(engine, f"DELETE FROM audit_events WHERE seal_id = {with_events}",
           f"DELETE FROM audit_seals WHERE id IN ({with_events}, {without_events})")
    assert problems(engine) == [
        f"seals {first}..{second} of the chain are missing (deleted)",
        f"2 events carry seal_id {without_events}, which no seal has "
        "(seal deleted, or events written with the triggers disabled)",
    ]


def test_an_edited_seal_is_detected(audited) -> None:
    engine, _ = audited
    seal_id = append_batch(engine, 3)
    append_batch(engine, 1)
    chain_seq, name = seal_of(engine, seal_id)
    # The edit a forger needs to hide an edited event: a new digest for the seal.
    tamper(engine, f"UPDATE audit_seals SET digest = repeat('0', 64) WHERE id = {seal_id}")
    assert problems(engine) == [f"{name}: its fields do not match its hash (seal edited)",
                                f"{name}: its events do not match its digest (edited)"]


def test_a_truncated_tail_is_detected(audited) -> None:
    engine, env = audited
    last_kept = append_batch(engine, 2)
    cut = [append_batch(engine, 3), append_batch(engine, 1)]
    kept_seq, _ = seal_of(engine, last_kept)
    ids = ", ".join(map(str, cut))
    tamper(engine, f"DELETE FROM audit_events WHERE seal_id IN ({ids})", f"DELETE FROM audit_seals WHERE id IN ({ids})")
    code, output = verify(env)
    assert code == 1, output
    assert (f"seals {kept_seq + 1}..{kept_seq + 2} at the end of the chain are missing (truncated): "
            f"the chain ends at seal {kept_seq}, its head at seal {kept_seq + 2}") in output, output


def test_concurrent_writers_extend_one_chain(audited) -> None:
    """The head's row lock serialises sealers: the chain stays contiguous, whatever the interleaving."""
    engine, _ = audited
    with engine.connect() as connection:
        seals_before = connection.execute(text("SELECT count(*) FROM audit_seals")).scalar_one()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(10):
                append_batch(engine, 16)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM audit_seals")).scalar_one() == seals_before + 40
    assert problems(engine) == []


def test_a_purge_keeps_the_rest_verifiable(audited, tmp_path) -> None:
    engine, env = audited
    later = tmp_path / "later.jsonl"
    later.write_text('{"prompt": "c"}\n')
    with engine.connect() as connection:
        cutoff = connection.execute(text("SELECT now()")).scalar_one()  # after the fixture's 5 events
    deepbatch("submit", str(later), env=env)  # 3 more: job created, submitted, job submitted
    with Session(engine) as session, session.begin():
        assert purge_before(session, cutoff) == 5
    with Session(engine) as session, session.begin():
        assert purge_before(session, cutoff) == 0  # nothing left before the cutoff
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM audit_anchors")).scalar_one() == 1
        assert connection.execute(text("SELECT min(created_at) FROM audit_seals")).scalar_one() >= cutoff
    code, output = verify(env)
    assert code == 0 and "3 events" in output, output
    deepbatch("submit", str(later), env=env)  # the chain goes on from where it was
    code, output = verify(env)
    assert code == 0 and "6 events" in output, output


def test_a_purge_of_everything_still_verifies(audited) -> None:
    """No seal left: the anchor and the head must agree on where the chain stands."""
    engine, _ = audited
    with engine.connect() as connection:
        cutoff = connection.execute(text("SELECT now() + interval '1 day'")).scalar_one()
    with Session(engine) as session, session.begin():
        assert purge_before(session, cutoff) == 5
    assert problems(engine) == []
    append_batch(engine, 2)
    assert problems(engine) == []


def test_the_purge_command_uses_the_retention(audited) -> None:
    _, env = audited
    assert "0 audit events older than 180 days purged" in deepbatch("audit", "purge", env=env).stderr


def test_events_written_before_the_seals_are_sealed_by_the_migration(audited) -> None:
    """Down to the per-row chain of 0002 and up again: the older rows get genesis seals, in id order."""
    engine, env = audited
    append_batch(engine, 3)
    url = engine.url.render_as_string(hide_password=False)
    engine.dispose()
    downgrade(url, "0006")
    with engine.connect() as connection:  # the per-row chain, rebuilt by the downgrade
        rows = connection.execute(text("""
            SELECT count(*), count(*) FILTER (WHERE hash = audit_event_hash(prev_hash, chain_seq, job_id, request_id,
                   event, from_state, to_state, attempt, worker, detail, created_at)), min(chain_seq), max(chain_seq)
            FROM audit_events""")).one()
    assert tuple(rows) == (8, 8, 1, 8)
    with engine.begin() as connection:  # enough for two genesis seals (of 10,000 rows each at most)
        connection.execute(text("INSERT INTO audit_events (job_id, event, request_id) "
                                "SELECT :j, 'legacy', n FROM generate_series(1, 10000) n"), {"j": job_of(engine)})
    engine.dispose()
    upgrade(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT row_count FROM audit_seals ORDER BY chain_seq")).scalars().all() \
            == [10000, 8]
    code, output = verify(env)
    assert code == 0 and "audit chain intact: 10008 events" in output, output
    append_batch(engine, 2)
    assert problems(engine) == []
