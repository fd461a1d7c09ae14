"""`deepbatch purge`: drop finished jobs older than an age, with a progress bar, or list them (--dry-run).

The work is producer/retention.py's; this module parses the age, shows what goes and how far it got."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from producer.cli.admin import audit_key, database_settings
from producer.cli.common import cli_identity, command_sessions, console

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from producer.retention import PurgeableJob

commands = typer.Typer()


def parse_older_than(value: str) -> timedelta:
    """A bad --older-than is a usage error naming the option."""
    from producer.retention import parse_age

    try:
        return parse_age(value)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--older-than") from None


@commands.command()
def purge(
    older_than: Annotated[str, typer.Option(
        "--older-than", metavar="AGE", help="finished jobs with nothing changed for this long go: 30d, 12h, 2w")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would go; change nothing")] = False,
    vacuum: Annotated[bool, typer.Option(
        "--vacuum", help="then VACUUM (ANALYZE) the tables (space reusable; see README: Retention)")] = False,
    chunk: Annotated[int, typer.Option(min=1, help="requests deleted per transaction")] = 5000,
) -> None:
    """Delete finished jobs (requests, results, files) older than AGE, and audit events past the audit
    retention; jobs still running, or locked by another transaction, are left alone. Needs DATABASE_URL only."""
    from producer import retention

    age = parse_older_than(older_than)
    settings = database_settings()
    now = datetime.now(timezone.utc)
    cutoff = now - age
    audit_cutoff = retention.audit_cutoff(cutoff, now, timedelta(days=settings.audit_retention_days))
    sessions = command_sessions(settings)
    with sessions() as session:
        jobs = retention.purgeable_jobs(session, cutoff)
        if dry_run:
            show_dry_run(session, jobs, cutoff, audit_cutoff)
            return
    key = audit_key(settings)  # before anything is deleted: a bad key file fails the command first
    purge_with_progress(sessions, jobs, settings.stored_files_dir, chunk, audit_cutoff, key)
    if vacuum:
        with console.status("VACUUM (ANALYZE) of the purged tables"):
            retention.vacuum(sessions)
        console.print("vacuumed: the space is free for new rows; the files keep their size (README: Retention)")


def show_dry_run(session: Session, jobs: list[PurgeableJob], cutoff: datetime, audit_cutoff: datetime) -> None:
    from producer.retention import audit_events_before, job_files

    table = Table("job", "created", "requests", "files", title=f"{len(jobs)} jobs finished before "
                  f"{cutoff:%Y-%m-%d %H:%M} UTC would be purged")
    for job in jobs:
        table.add_row(job.job_id, f"{job.created_at:%Y-%m-%d %H:%M}", str(job.requests),
                      ", ".join(job_files(session, job)))
    console.print(table)
    events = audit_events_before(session, audit_cutoff)
    console.print(f"{events} audit events sealed before {audit_cutoff:%Y-%m-%d %H:%M} UTC would be purged "
                  "(DEEPBATCH_AUDIT_RETENTION_DAYS)", highlight=False)
    console.print("dry run: nothing was changed")


def purge_with_progress(sessions: sessionmaker[Session], jobs: list[PurgeableJob], files_dir: Path, chunk: int,
                        audit_cutoff: datetime, key: bytes | None) -> None:
    from producer.retention import purge_audit, purge_job

    purged = skipped = requests = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(f"purging {len(jobs)} jobs", total=sum(job.requests for job in jobs) or None)
        for job in jobs:
            outcome = purge_job(sessions, job, files_dir, cli_identity(), chunk,
                                lambda deleted: progress.advance(bar, deleted))
            requests += outcome.requests_deleted
            if outcome.purged:
                purged += 1
            else:
                skipped += 1
                progress.console.print(f"[yellow]skipped {job.job_id}:[/yellow] {escape(outcome.skipped or '')}")
        audit = progress.add_task("purging audit seals", total=None)
        events = purge_audit(sessions, audit_cutoff, key, lambda deleted: progress.advance(audit, deleted))
        progress.update(audit, total=events, completed=events)
    console.print(f"{purged} jobs purged ({requests} requests), {skipped} skipped; {events} audit events sealed "
                  f"before {audit_cutoff:%Y-%m-%d %H:%M} UTC purged", highlight=False)
