"""`deepbatch purge --older-than AGE` drops whole finished jobs (rows and files) and nothing else: not a
running job, not a recent one, not a job someone holds; the audit chain still verifies afterwards; a dry
run changes nothing; a bad age is refused naming the option. Against the real PostgreSQL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from producer import retention
from producer.api.outputs import output_file_ids
from schema.audit import AuditRow, append_events, verify_chain

from tests.conftest import deepbatch, sqlalchemy_url

pytestmark = pytest.mark.integration

JOB_TABLES = ("jobs", "requests", "results", "dead_letters", "job_counts")
NOW = datetime.now(timezone.utc)


@dataclass
class Deployment:
    engine: Engine
    env: dict[str, str]
    files_dir: Path


@pytest.fixture
def deployment(scratch_database_url: str, tmp_path: Path):
    env = {**{name: value for name, value in os.environ.items() if name != "DEEPBATCH_AUDIT_HMAC_KEY_FILE"},
           "DEEPBATCH_DATABASE_URL": scratch_database_url,
           "DEEPBATCH_BROKER_URL": "redis://127.0.0.1:6379/15",  # `audit verify` wants one; nothing uses it
           "DEEPBATCH_FILES_DIR": str(tmp_path / "files")}
    engine = create_engine(sqlalchemy_url(scratch_database_url))
    (tmp_path / "files").mkdir()
    yield Deployment(engine, env, tmp_path / "files")
    engine.dispose()


def add_file(deployment: Deployment, session: Session, file_id: str, created: datetime) -> None:
    session.execute(text("INSERT INTO files (id, filename, purpose, bytes, lines, created_at) "
                         "VALUES (:id, 'x.jsonl', 'batch', 3, 1, :created)"), {"id": file_id, "created": created})
    (deployment.files_dir / file_id).write_text("{}\n")


def add_job(deployment: Deployment, job_id: str, age: timedelta, states: list[str], input_file_id: str | None = None,
            changed_age: timedelta | None = None) -> None:
    """A batch job of the HTTP API created `age` ago with one request per state in `states`, the results of
    its succeeded ones, a dead letter for each dead one, its audit events (sealed, as the workers write
    them), its output and error files; every request last changed `changed_age` ago (default `age`)."""
    created, changed = NOW - age, NOW - (changed_age or age)
    with Session(deployment.engine) as session, session.begin():
        stored = session.scalar(text("SELECT count(*) FROM files WHERE id = :id"), {"id": input_file_id})
        if input_file_id and stored == 0:
            add_file(deployment, session, input_file_id, created)
        session.execute(text("""
            INSERT INTO jobs (id, input_file, model, total_lines, submitted_at, created_at, input_file_id, endpoint)
            VALUES (:id, 'prompts.jsonl', 'tiny', :lines, :created, :created, :input_file_id, '/v1/chat/completions')
        """), {"id": job_id, "lines": len(states), "created": created, "input_file_id": input_file_id})
        request_ids = session.scalars(text("""
            INSERT INTO requests (job_id, line_no, custom_id, state, attempt, max_attempts, created_at, updated_at)
            SELECT :job_id, n, 'request-' || n, CAST(s AS request_state), 1, 3, :created, :changed
            FROM unnest(CAST(:states AS text[])) WITH ORDINALITY AS t(s, n) RETURNING id
        """), {"job_id": job_id, "states": states, "created": created, "changed": changed}).all()
        for request_id, state in zip(request_ids, states):
            if state == "succeeded":
                session.execute(text("""
                    INSERT INTO results (request_id, job_id, text, finish_reason, prompt_tokens, completion_tokens,
                                         model, worker, created_at)
                    VALUES (:r, :j, 'answer', 'stop', 3, 4, 'tiny', 'host:1', :changed)
                """), {"r": request_id, "j": job_id, "changed": changed})
            if state == "dead":
                session.execute(text("INSERT INTO dead_letters (request_id, job_id, attempts, last_error) "
                                     "VALUES (:r, :j, 3, 'boom')"), {"r": request_id, "j": job_id})
        session.execute(text("""
            INSERT INTO job_counts (job_id, state, label, shard, requests)
            SELECT :job_id, CAST(s AS request_state), '', 0, count(*) FROM unnest(CAST(:states AS text[])) AS t(s)
            GROUP BY s
        """), {"job_id": job_id, "states": states})
        append_events(session, [AuditRow(job_id=job_id, request_id=request_id, event="started", to_state="running")
                                for request_id in request_ids])
        for file_id in output_file_ids(job_id):
            add_file(deployment, session, file_id, changed)


def rows_of(engine: Engine, job_id: str) -> dict[str, int]:
    """The job's rows in each table keyed by its id (audit_events aside: the log keeps its own retention)."""
    with engine.connect() as connection:
        keyed = connection.execute(text("SELECT table_name FROM information_schema.columns WHERE column_name = "
                                        "'job_id' AND table_schema = current_schema() AND table_name NOT IN "
                                        "('audit_events', 'job_progress')")).scalars().all()
        assert set(JOB_TABLES) - {"jobs"} <= set(keyed)
        counts = {table: connection.execute(text(f"SELECT count(*) FROM {table} WHERE "
                                                 f"{'id' if table == 'jobs' else 'job_id'} = :j"),
                                            {"j": job_id}).scalar_one() for table in ("jobs", *keyed)}
        counts["files"] = connection.execute(text("SELECT count(*) FROM files WHERE id = ANY(:ids)"),
                                             {"ids": list(output_file_ids(job_id))}).scalar_one()
    return counts


def snapshot(deployment: Deployment) -> dict[str, object]:
    """Every row count that a purge could change, and the files on disk."""
    with deployment.engine.connect() as connection:
        counts = {table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                  for table in (*JOB_TABLES, "files", "audit_events", "audit_seals", "audit_anchors")}
    return {**counts, "on disk": sorted(path.name for path in deployment.files_dir.iterdir())}


def purge(deployment: Deployment, *arguments: str):
    # A purge that waited on a lock instead of skipping would hang: a minute is ample for these few rows.
    return deepbatch("purge", *arguments, env=deployment.env, check=False, timeout=60)


@pytest.fixture
def jobs(deployment: Deployment) -> Deployment:
    """old: finished 40 days ago, its own input file; shared: finished 40 days ago, of the input file of
    `recent`, which finished 2 days ago; running: 40 days old with a request still running; requeued: 40
    days old, its requests finished again yesterday (a dead letter requeued)."""
    add_job(deployment, "batch_old", timedelta(days=40), ["succeeded"] * 10 + ["failed", "dead"], "file-oldinput")
    add_job(deployment, "batch_shared", timedelta(days=40), ["succeeded"] * 3, "file-sharedinput")
    add_job(deployment, "batch_recent", timedelta(days=2), ["succeeded"] * 3, "file-sharedinput")
    add_job(deployment, "batch_running", timedelta(days=40), ["succeeded"] * 5 + ["running", "queued"])
    add_job(deployment, "batch_requeued", timedelta(days=40), ["succeeded"] * 4, changed_age=timedelta(days=1))
    return deployment


KEPT = ("batch_recent", "batch_running", "batch_requeued")


def test_an_old_finished_job_is_purged_whole_and_nothing_else(jobs: Deployment) -> None:
    kept_before = {job_id: rows_of(jobs.engine, job_id) for job_id in KEPT}
    assert rows_of(jobs.engine, "batch_old") == {"jobs": 1, "requests": 12, "results": 10, "dead_letters": 1,
                                                 "job_counts": 3, "files": 2}
    with jobs.engine.connect() as connection:
        audited_before = connection.execute(text("SELECT count(*) FROM audit_events WHERE job_id = 'batch_old'")
                                            ).scalar_one()

    purged = purge(jobs, "--older-than", "30d", "--chunk", "5")  # 12 requests: three transactions
    assert purged.returncode == 0, purged.stderr
    assert "2 jobs purged (15 requests), 0 skipped" in purged.stderr, purged.stderr

    for job_id in ("batch_old", "batch_shared"):
        assert set(rows_of(jobs.engine, job_id).values()) == {0}, job_id
    on_disk = {path.name for path in jobs.files_dir.iterdir()}
    assert not on_disk & {"file-oldinput", *output_file_ids("batch_old"), *output_file_ids("batch_shared")}
    assert "file-sharedinput" in on_disk  # batch_recent was made of it too
    with jobs.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM files WHERE id IN ('file-oldinput', 'file-sharedinput')")
                                  ).scalar_one() == 1
        # The audit log keeps its own retention: the job's events stay, with one that says it was purged.
        events = dict(connection.execute(text("SELECT event, count(*) FROM audit_events WHERE job_id = 'batch_old' "
                                              "GROUP BY event")).all())
    assert events == {"started": audited_before, "job_purged": 1}
    assert {job_id: rows_of(jobs.engine, job_id) for job_id in KEPT} == kept_before
    assert all((jobs.files_dir / file_id).exists() for job_id in KEPT for file_id in output_file_ids(job_id))

    verified = deepbatch("audit", "verify", env=jobs.env, check=False)
    assert verified.returncode == 0 and "audit chain intact" in verified.stderr, verified.stderr

    again = purge(jobs, "--older-than", "30d", "--vacuum")  # nothing left to purge; VACUUM runs outside a transaction
    assert again.returncode == 0 and "0 jobs purged (0 requests), 0 skipped" in again.stderr, again.stderr
    assert "vacuumed" in again.stderr, again.stderr
    with jobs.engine.connect() as connection:
        assert connection.execute(text("SELECT last_vacuum IS NOT NULL AND last_analyze IS NOT NULL "
                                       "FROM pg_stat_user_tables WHERE relname = 'requests'")).scalar_one()


def test_a_dry_run_lists_what_would_go_and_changes_nothing(jobs: Deployment) -> None:
    before = snapshot(jobs)
    listed = purge(jobs, "--older-than", "4w", "--dry-run")
    assert listed.returncode == 0, listed.stderr
    assert "2 jobs finished before" in listed.stderr and "would be purged" in listed.stderr, listed.stderr
    assert "batch_old" in listed.stderr and "batch_shared" in listed.stderr
    assert not any(job_id in listed.stderr for job_id in KEPT), listed.stderr
    assert "file-oldinput" in listed.stderr and "file-sharedinput" not in listed.stderr
    assert "dry run: nothing was changed" in listed.stderr
    assert snapshot(jobs) == before


def test_a_job_locked_by_another_transaction_is_skipped(jobs: Deployment) -> None:
    with jobs.engine.connect() as holder:
        holder.execute(text("SELECT id FROM jobs WHERE id = 'batch_old' FOR UPDATE"))
        purged = purge(jobs, "--older-than", "30d")
        holder.rollback()
    assert purged.returncode == 0, purged.stderr
    assert "skipped batch_old: locked by another transaction" in purged.stderr, purged.stderr
    assert "1 jobs purged (3 requests), 1 skipped" in purged.stderr, purged.stderr
    assert rows_of(jobs.engine, "batch_old")["requests"] == 12
    assert rows_of(jobs.engine, "batch_shared")["requests"] == 0


def test_a_job_running_again_stops_its_purge(jobs: Deployment) -> None:
    """A dead letter requeued between the listing and the purge: the purge leaves the job."""
    sessions = sessionmaker(jobs.engine)
    with sessions() as session:
        old = next(job for job in retention.purgeable_jobs(session, NOW - timedelta(days=30))
                   if job.job_id == "batch_old")
    with jobs.engine.begin() as connection:
        connection.execute(text("UPDATE requests SET state = 'queued' WHERE job_id = 'batch_old' AND state = 'dead'"))
    outcome = retention.purge_job(sessions, old, jobs.files_dir, "test", chunk=5)
    assert outcome.skipped == "it has queued or running requests again" and outcome.requests_deleted == 0
    assert rows_of(jobs.engine, "batch_old")["requests"] == 12


def test_the_audit_purge_goes_in_steps_and_keeps_the_chain_verifiable(jobs: Deployment, monkeypatch) -> None:
    """What the CLI does past DEEPBATCH_AUDIT_RETENTION_DAYS, here with a cutoff of now: schema/audit.py's
    purge in steps of two seals, each with its anchor, and the chain still verifies."""
    monkeypatch.setattr(retention, "AUDIT_SEALS_PER_STEP", 2)
    sessions = sessionmaker(jobs.engine)
    with sessions() as session:
        cutoff = session.scalar(text("SELECT max(created_at) FROM audit_seals")) + timedelta(microseconds=1)
        expected = retention.audit_events_before(session, cutoff)
    assert expected == 12 + 3 + 3 + 7 + 4
    assert retention.purge_audit(sessions, cutoff, None) == expected
    with sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM audit_events")) == 0
        assert session.scalar(text("SELECT count(*) FROM audit_anchors")) == 3  # 5 seals, 2 at a time
        report = verify_chain(session)
    assert report.intact, report.problems


@pytest.mark.parametrize("age", ["30", "30x", "0d", "1m", "-3d", "", "d", "3.5d", "99999999999w", "6000w"])
def test_a_bad_age_is_refused_naming_the_option(deployment: Deployment, age: str) -> None:
    refused = purge(deployment, "--older-than", age)
    assert refused.returncode == 2, refused.stderr
    said = " ".join(refused.stderr.replace("│", " ").split())
    assert "Invalid value for --older-than" in said and f"'{age}'" in said, said


@pytest.mark.parametrize(("age", "expected"), [("30d", timedelta(days=30)), ("12h", timedelta(hours=12)),
                                               ("2w", timedelta(weeks=2))])
def test_good_ages(age: str, expected: timedelta) -> None:
    assert retention.parse_age(age) == expected


def test_a_purge_never_takes_the_audit_log_back_further_than_its_own_retention() -> None:
    audit_retention = timedelta(days=180)
    assert retention.audit_cutoff(NOW - timedelta(days=30), NOW, audit_retention) == NOW - audit_retention
    assert retention.audit_cutoff(NOW - timedelta(days=400), NOW, audit_retention) == NOW - timedelta(days=400)
