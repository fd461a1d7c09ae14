"""The audit log is append-only and hash-chained: tampering is refused or detected; purges keep it verifiable."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from schema.audit import purge_before

from tests.conftest import deepbatch, sqlalchemy_url

pytestmark = pytest.mark.integration


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


def test_an_untouched_chain_verifies(audited) -> None:
    _, env = audited
    code, output = verify(env)
    assert code == 0 and "audit chain intact: 5 events" in output, output


def test_updates_and_deletes_are_refused(audited) -> None:
    engine, _ = audited
    for statement in ("UPDATE audit_events SET detail = 'x'", "DELETE FROM audit_events"):
        with pytest.raises(ProgrammingError, match="append-only"), engine.begin() as connection:
            connection.execute(text(statement))


def tamper(engine, statement: str) -> None:
    """What someone with the rights to disable the guard could do."""
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
        connection.execute(text(statement))
        connection.execute(text("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only"))


def test_an_edited_row_is_detected(audited) -> None:
    engine, env = audited
    tamper(engine, "UPDATE audit_events SET detail = 'nothing happened' WHERE chain_seq = 3")
    code, output = verify(env)
    assert code == 1 and "row 3: contents do not match its hash" in output, output


def test_a_deleted_row_is_detected(audited) -> None:
    engine, env = audited
    tamper(engine, "DELETE FROM audit_events WHERE chain_seq = 2")
    code, output = verify(env)
    assert code == 1 and "rows 2..2 of the chain are missing" in output, output


def test_a_purge_keeps_the_rest_verifiable(audited, tmp_path) -> None:
    engine, env = audited
    later = tmp_path / "later.jsonl"
    later.write_text('{"prompt": "c"}\n')
    with engine.connect() as connection:
        cutoff = connection.execute(text("SELECT now()")).scalar_one()  # after the fixture's 5 events
    deepbatch("submit", str(later), env=env)  # 3 more: job created, submitted, job submitted
    with Session(engine) as session, session.begin():
        assert purge_before(session, cutoff) == 5
    code, output = verify(env)
    assert code == 0 and "3 events" in output, output
    deepbatch("submit", str(later), env=env)  # the chain goes on from where it was
    code, output = verify(env)
    assert code == 0 and "6 events" in output, output


def test_the_purge_command_uses_the_retention(audited) -> None:
    _, env = audited
    assert "0 audit events older than 180 days purged" in deepbatch("audit", "purge", env=env).stderr
