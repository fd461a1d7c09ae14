"""The operator's commands: migrate, keys (of the HTTP API), reconcile, dlq (the dead-letter queue) and
audit (the hash-chained audit log)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from producer.cli.common import cli_identity, command_sessions, configured_settings, console, fail

if TYPE_CHECKING:
    from schema.audit import ChainReport
    from schema.settings import Settings

commands = typer.Typer()


@commands.command()
def migrate() -> None:
    """Apply the database migrations (Alembic) to DATABASE_URL; says which it applied. Needs no broker."""
    from schema.migrate import upgrade

    settings = database_settings()
    before = schema_revisions(settings.sqlalchemy_url)
    upgrade(settings.sqlalchemy_url)
    applied = applied_between(settings.sqlalchemy_url, before)
    for revision, description in applied:
        console.print(f"applied {revision}: {escape(description)}", highlight=False)
    head = applied[-1][0] if applied else ", ".join(before) or "none"
    console.print(f"applied {len(applied)} migration{'s' if len(applied) != 1 else ''}; the database is at {head}, "
                  f"the latest" if applied else f"nothing to apply: the database is already at {head}, the latest",
                  highlight=False)


def database_settings() -> Settings:
    """The settings of a command that only touches the database: DATABASE_URL alone must be set."""
    from schema.settings import get_settings

    settings = get_settings()
    if settings.database_url is None:
        raise fail("DATABASE_URL must be set")
    return settings


def schema_revisions(sqlalchemy_url: str) -> tuple[str, ...]:
    """The migrations the database is at (none for an empty one)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    engine = create_engine(sqlalchemy_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_heads()
    finally:
        engine.dispose()


def applied_between(sqlalchemy_url: str, before: tuple[str, ...]) -> list[tuple[str, str]]:
    """The migrations after `before` up to where the database is now, oldest first: (revision, its message)."""
    from alembic.script import ScriptDirectory

    from schema.migrate import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config(sqlalchemy_url))
    after = schema_revisions(sqlalchemy_url)
    revisions = scripts.iterate_revisions(after, before or "base")
    return [(script.revision, (script.doc or "").strip().splitlines()[0] if script.doc else "")
            for script in reversed(list(revisions))]


keys = typer.Typer(help="API keys of `deepbatch serve`: create, list, revoke.", no_args_is_help=True)
commands.add_typer(keys, name="keys")


@keys.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="who or what the key is for")]) -> None:
    """Create a key; its secret is printed once (stdout) and cannot be shown again."""
    from producer.api.keys import create_key

    with command_sessions(configured_settings()).begin() as session:
        key, secret = create_key(session, name, cli_identity())
    console.print(f"created {key.id} ({name}); its secret, shown only now:")
    print(secret)


@keys.command("list")
def keys_list() -> None:
    """Every key: id, name, created, revoked."""
    from producer.api.keys import list_keys

    table = Table("key", "name", "created", "revoked")
    with command_sessions(configured_settings())() as session:
        for key in list_keys(session):
            table.add_row(key.id, key.name, f"{key.created_at:%Y-%m-%d %H:%M}",
                          f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "")
    Console().print(table)


@keys.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id (key_…), from `deepbatch keys list`")]) -> None:
    """Revoke a key: its requests are refused from now on."""
    from producer.api.keys import revoke_key

    with command_sessions(configured_settings()).begin() as session:
        if not revoke_key(session, key_id, cli_identity()):
            raise fail(f"no live key {key_id!r}")
    console.print(f"{key_id} revoked")


@commands.command()
def reconcile(
    force: Annotated[bool, typer.Option(help="re-publish every queued request, even if the queue is not empty")] = False,
) -> None:
    """Re-enqueue what the broker lost: expired leases and queued requests with no message."""
    from worker.app import make_celery_app
    from worker.reconcile import reconcile as reconcile_once
    from worker.transitions import Transitions

    settings = configured_settings()  # also expires the queued requests of jobs past their window
    sessions = command_sessions(settings)
    for queue in deployment_queues(settings, sessions):  # each model's queue, as its workers would
        queue_settings = settings.model_copy(update={"queue_name": queue})
        transitions = Transitions(sessions, cli_identity(), timedelta(seconds=settings.lease_s), queue)
        report = reconcile_once(transitions, make_celery_app(queue_settings), queue_settings, force=force)
        console.print(f"{queue}: {len(report.requeued)} re-queued from expired leases, {len(report.dead)} "
                      f"dead-lettered, {len(report.republished)} queued requests re-published, {report.expired} "
                      "expired", highlight=False)


def deployment_queues(settings: Settings, sessions) -> list[str]:
    """DEEPBATCH_QUEUE_NAME and the queue of every model a worker announced under it (worker/registry.py)."""
    from worker.registry import registered_workers

    with sessions() as session:
        return sorted({settings.queue_name, *(worker.queue for worker in registered_workers(session, settings))})


dlq = typer.Typer(help="The dead-letter queue: requests that failed every attempt.", no_args_is_help=True)
commands.add_typer(dlq, name="dlq")


@dlq.command("list")
def dlq_list(
    job_id: Annotated[Optional[str], typer.Option("--job", help="only this job")] = None,
    limit: Annotated[int, typer.Option(help="at most this many")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List dead-lettered requests with their attempts and last error."""
    from producer.queries import dead_letters

    with command_sessions(configured_settings())() as session:
        letters = dead_letters(session, job_id, limit)
    if as_json:
        print(json.dumps(letters, default=str))
        return
    table = Table(title=f"{len(letters)} dead letters")
    for column in ("request", "job", "line", "custom_id", "attempts", "last error"):
        table.add_column(column)
    for letter in letters:
        table.add_row(str(letter["request_id"]), letter["job_id"], str(letter["line_no"]), str(letter["custom_id"]),
                      str(letter["attempts"]), letter["last_error"])
    Console().print(table)


@dlq.command("requeue")
def dlq_requeue(
    request_ids: Annotated[Optional[list[int]], typer.Argument(help="request ids; none: all (of --job)")] = None,
    job_id: Annotated[Optional[str], typer.Option("--job", help="only this job")] = None,
) -> None:
    """Send dead requests back to the queue with a fresh set of attempts."""
    from producer.queries import requeue_dead
    from worker.app import make_celery_app, publish_slices

    settings = configured_settings()
    sessions = command_sessions(settings)
    app, requeued = make_celery_app(settings), 0
    for queue in deployment_queues(settings, sessions):  # each back to its model's queue
        with sessions.begin() as session:
            request_ids_of_queue = requeue_dead(session, queue, cli_identity(), request_ids or None, job_id)
        publish_slices(app, request_ids_of_queue, settings.slice_size, queue)
        requeued += len(request_ids_of_queue)
    console.print(f"{requeued} requests re-queued")


@dlq.command("purge")
def dlq_purge(job_id: Annotated[Optional[str], typer.Option("--job", help="only this job")] = None) -> None:
    """Forget dead-letter records and empty the broker's dead-letter queue (the requests stay dead)."""
    from producer.queries import purge_dead_letters
    from worker.app import dead_letter_queue, make_celery_app

    settings = configured_settings()
    sessions = command_sessions(settings)
    with sessions.begin() as session:
        purged = purge_dead_letters(session, job_id)
    if job_id is None:
        app = make_celery_app(settings)
        with app.connection_for_write() as connection:
            for queue in deployment_queues(settings, sessions):  # each model's queue has its own dead letters
                dead_letter_queue(settings, queue)(connection.default_channel).purge()
    console.print(f"{purged} dead-letter records purged")


audit = typer.Typer(help="The hash-chained audit log: verify it, anchor it off-site, purge it.", no_args_is_help=True)
commands.add_typer(audit, name="audit")


def audit_key(settings: Settings) -> bytes | None:
    """The key that signs the chain (DEEPBATCH_AUDIT_HMAC_KEY_FILE), or None when unset."""
    from schema.audit_signing import AuditKeyError, load_key

    try:
        return load_key(settings.audit_hmac_key_file)
    except AuditKeyError as error:
        raise fail(str(error)) from None


def print_audit_report(report: ChainReport) -> None:
    for note in report.notes + report.signing_notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    for problem in report.problems:
        console.print(f"[red]{escape(problem)}[/red]")


@audit.command("verify")
def audit_verify(
    anchor_file: Annotated[Optional[Path], typer.Option(
        "--anchor", metavar="FILE", help="anchors of `audit anchor --append`: each seal must still be in the chain",
    )] = None,
) -> None:
    """Check that no audit event was edited or deleted; exit code 1 if one was."""
    from schema.audit import verify_chain
    from schema.audit_signing import AnchorFileError, read_anchor_file

    settings = configured_settings()
    key = audit_key(settings)
    try:
        anchors = [] if anchor_file is None else [
            (f"{anchor_file} line {line_no}", anchor) for line_no, anchor in read_anchor_file(anchor_file)]
    except AnchorFileError as error:
        raise fail(str(error)) from None
    with command_sessions(settings)() as session:
        report = verify_chain(session, key, anchors)
    print_audit_report(report)
    if not report.intact:
        raise fail(f"audit chain broken ({len(report.problems)} problems in {report.checked} events checked)")
    console.print(f"audit chain intact: {report.checked} events")


@audit.command("anchor")
def audit_anchor(
    append: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="append the anchor to FILE as a JSON line (keep FILE off the database's host)",
    )] = None,
) -> None:
    """Verify the chain, sign its head with the audit key and print it (sequence, hash, times) to keep off-site."""
    from schema.audit import anchor_chain
    from schema.audit_signing import KEY_SETTING, append_anchor

    settings = configured_settings()
    key = audit_key(settings)
    with command_sessions(settings)() as session:
        report, anchor = anchor_chain(session, key)
        print_audit_report(report)
        if anchor is None:
            raise fail(f"audit chain broken ({len(report.problems)} problems): not anchored")
        session.commit()
    if append is None:
        print(anchor.json_line(), end="")
    else:
        try:
            append_anchor(append, anchor)
        except OSError as error:
            raise fail(f"--append {append}: cannot write the anchor ({error.strerror})") from None
    signed = "signed" if key is not None else f"unsigned: {KEY_SETTING} is not set"
    console.print(f"anchored seal {anchor.chain_seq} ({signed})" + (f", appended to {append}" if append else ""))


@audit.command("purge")
def audit_purge(
    days: Annotated[Optional[int], typer.Option(help="retention; default DEEPBATCH_AUDIT_RETENTION_DAYS")] = None,
) -> None:
    """Delete audit events older than the retention, keeping the rest verifiable (the anchor signed with the key)."""
    from schema.audit import purge_older_than

    settings = configured_settings()
    key = audit_key(settings)
    with command_sessions(settings).begin() as session:
        deleted = purge_older_than(session, timedelta(days=days or settings.audit_retention_days), key)
    console.print(f"{deleted} audit events older than {days or settings.audit_retention_days} days purged")
