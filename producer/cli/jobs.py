"""The job commands: submit, status, cancel, jobs, results; and submitting a file with a progress bar,
which `run` (and bench/system.py) use too."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from producer.cli.common import cli_identity, command_sessions, configured_settings, console, fail
from producer.cli.progress import print_job, progress_bar, wait_for_job

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from producer.queries import FailedLines, Submission
    from schema.settings import Settings

commands = typer.Typer()


def submit_with_progress(path: Path, settings: Settings, completion_window: timedelta | None = None,
                         metadata: dict[str, str] | None = None, use_result_cache: bool = True,
                         priority: int = 0, resume: str | None = None, go_on_with: str | None = None) -> str:
    """Submit (or, with `resume`, go on submitting) `path` with a progress bar; returns the job id. Ctrl-C
    stops at once, and says how far the file got and how to resume (`go_on_with`: the command that does,
    when it is not `deepbatch submit --resume`)."""
    from producer import queries
    from producer.staging import SubmitError
    from producer.submit import SubmissionStopped, resume_file, submit_file
    from worker.app import make_celery_app

    if not path.is_file():
        raise fail(f"no such file: {path}")
    sessions = command_sessions(settings)
    started: list[str] = [resume] if resume else []
    stop = threading.Event()
    try:
        with progress_bar() as bar, stop_on_ctrl_c(stop):
            task = bar.add_task("submitting", total=None, rate="")
            show = lambda lines: bar.update(task, completed=lines)  # noqa: E731
            if resume:
                resumed_at = resume_file(path, resume, settings, sessions, make_celery_app(settings), on_chunk=show,
                                         stop=stop)
                console.print(f"job {resume}: resumed at line {resumed_at}")
            else:
                submit_file(path, settings, sessions, make_celery_app(settings), on_chunk=show,
                            completion_window=completion_window, metadata=metadata, use_result_cache=use_result_cache,
                            priority=priority, on_job=started.append, stop=stop)
    except SubmitError as error:
        raise fail(str(error)) from None
    except (SubmissionStopped, KeyboardInterrupt):
        raise interrupted_submission(sessions, path, started[0] if started else None, go_on_with) from None
    job_id = started[0]
    with sessions() as session:
        report_rejected_lines(queries.failed_lines(session, job_id, rejected_only=True),
                              queries.unknown_model_names(session, job_id), settings)
    return job_id


@contextmanager
def stop_on_ctrl_c(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C asks the submission to stop after the chunk in hand (a KeyboardInterrupt in the
    middle of a COPY would leave its connection unusable); a second one interrupts at once."""
    def request_stop(_signum: int, _frame: object) -> None:
        stop.set()
        console.print("stopping after the chunk in hand (Ctrl-C again to stop at once)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupted_submission(sessions: sessionmaker[Session], path: Path, job_id: str | None,
                           go_on_with: str | None = None) -> typer.Exit:
    """What Ctrl-C during submit says: how far the file got, and the command that goes on from there."""
    from producer.queries import submission_of

    if job_id is None:
        console.print("submission interrupted before its job was created; nothing was stored")
        return typer.Exit(code=130)
    with sessions() as session:
        submission = submission_of(session, job_id)
    stored = submission.lines if submission else 0
    if go_on_with:
        console.print(f"[yellow]submission interrupted:[/] job {job_id} holds lines 1-{stored} of "
                      f"{escape(str(path))}. Go on with: {escape(go_on_with)}", highlight=False)
        return typer.Exit(code=130)
    console.print(f"[yellow]submission interrupted:[/] job {job_id} holds lines 1-{stored} of {escape(str(path))}, "
                  f"which run as usual. Go on with: deepbatch submit {escape(str(path))} --resume {job_id}   "
                  f"(or drop the rest: deepbatch cancel {job_id})", highlight=False)
    return typer.Exit(code=130)


def report_rejected_lines(rejected: list[FailedLines], unknown_models: list[tuple[str, int]],
                          settings: Settings) -> None:
    """One line per reason lines were rejected (each line's own error is in the errors file), and the fix
    when lines name a model this deployment does not serve."""
    for kind in rejected:
        lines = "1 line" if kind.count == 1 else f"{kind.count} lines"
        console.print(f"[yellow]{lines} rejected: {kind.code}[/] (first, line {kind.first_line}: "
                      f"{escape(kind.first_message)})", highlight=False)
    if unknown_models:
        names = ",".join(name for name, _ in unknown_models if name)
        console.print(f"[yellow]lines name model(s) {escape(names)} but this deployment serves "
                      f"{escape(repr(settings.model))}:[/] to run them on it, set DEEPBATCH_MODEL_ALIASES="
                      f"{escape(names)} and submit again", highlight=False)


def parse_window(text: str) -> timedelta:
    """A bad --completion-window is a usage error naming the option."""
    from producer.submit import parse_duration

    try:
        return parse_duration(text)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--completion-window") from None


def parse_metadata(pairs: list[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        metadata[key] = value
    return metadata


@commands.command()
def submit(
    file: Annotated[Path, typer.Argument(help="JSONL prompt file (OpenAI Batch or plain lines)")],
    wait: Annotated[bool, typer.Option(help="wait for the job to finish, with a progress bar")] = False,
    completion_window: Annotated[Optional[str], typer.Option(
        help="requests still queued this long after submission expire: 24h, 90m, 30s, 2d; default none")] = None,
    metadata: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE, repeatable; kept with the job")] = None,
    cache: Annotated[bool, typer.Option(help="reuse stored results of identical greedy requests")] = True,
    priority: Annotated[int, typer.Option(help="higher runs first; a backlog of lower priority waits")] = 0,
    resume: Annotated[Optional[str], typer.Option(
        help="JOB: go on submitting FILE into this job, whose submission was interrupted, after its last stored "
             "line (the stored part of FILE must be unchanged)")] = None,
) -> None:
    """Submit a file; prints the job id when every line is stored (exit 130 if interrupted: it says how to resume)."""
    settings = configured_settings()
    window = parse_window(completion_window) if completion_window else None
    job_id = submit_with_progress(file, settings, window, parse_metadata(metadata or []), cache, priority, resume)
    print(job_id)
    if wait:
        progress = wait_for_job(settings, job_id)
        with command_sessions(settings)() as session:
            print_job(session, progress)


@commands.command()
def status(
    job_id: Annotated[str, typer.Argument(help="the job id printed by submit")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    watch: Annotated[bool, typer.Option(help="follow with a progress bar until the job is done")] = False,
) -> None:
    """Show a job's progress. Exit code 0; 1 if there is no such job."""
    from producer import queries

    settings = configured_settings()
    sessions = command_sessions(settings)
    with sessions() as session:
        progress = queries.job_progress(session, job_id)
        submission = queries.submission_of(session, job_id)
    if progress is None or submission is None:
        raise fail(f"no job {job_id!r}")
    if submission.stopped:
        console.print(stopped_note(job_id, submission), highlight=False)
    if watch and not progress.done:
        progress = wait_for_job(settings, job_id)
    with sessions() as session:
        if as_json:
            models = queries.result_models(session, job_id)
            print(json.dumps({**asdict(progress), "submission_stopped_at_line": submission.lines
                              if submission.stopped else None,
                              "rejected_lines": queries.rejected_line_count(session, job_id),
                              "result_models": dict(models)}, default=str))
        else:
            print_job(session, progress)


def stopped_note(job_id: str, submission: Submission) -> str:
    return (f"[yellow]submission stopped at line {submission.lines}:[/] resume with `deepbatch submit "
            f"{escape(submission.input_file)} --resume {job_id}`, or end it with `deepbatch cancel {job_id}`")


@commands.command()
def cancel(job_id: Annotated[str, typer.Argument(help="the job id")]) -> None:
    """Cancel a job: queued requests are cancelled, running ones finish, finished results are kept."""
    from producer import queries

    settings = configured_settings()
    with command_sessions(settings)() as session:
        progress = queries.job_progress(session, job_id)
    if progress is None:
        raise fail(f"no job {job_id!r}")
    if progress.done:
        raise fail(f"job {job_id} is already {progress.status}; there is nothing to cancel")
    with command_sessions(settings).begin() as session:
        cancelled = queries.cancel_job(session, job_id, cli_identity())
    console.print(f"job {job_id}: {cancelled} queued requests cancelled; running ones will finish")


@commands.command()
def jobs(
    limit: Annotated[int, typer.Option(help="how many of the newest jobs")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List the newest jobs: status, file, model and counts (failed = failed + dead)."""
    from producer import queries

    settings = configured_settings()
    with command_sessions(settings)() as session:
        recent = queries.recent_jobs(session, limit)
        if as_json:
            names = queries.input_file_names(session, [progress.job_id for progress in recent])
            print(json.dumps([{**asdict(progress), "input_file_name": names.get(progress.job_id)}
                              for progress in recent], default=str))
            return
        stopped = {progress.job_id: submission for progress in recent
                   if progress.status == "validating" and (submission := queries.submission_of(session, progress.job_id))
                   and submission.stopped}
        names = queries.input_file_names(session, [progress.job_id for progress in recent])
    table = Table("job", "status", "file", "model", "done", "succeeded", "failed", "cancelled", "expired", "created")
    for progress in recent:
        status_text = progress.status
        if progress.job_id in stopped:
            status_text += f" (submission stopped at line {stopped[progress.job_id].lines})"
        table.add_row(progress.job_id, status_text, escape(names.get(progress.job_id, progress.input_file)),
                      escape(progress.model), f"{progress.finished}/{progress.total}", str(progress.succeeded),
                      str(progress.failed + progress.dead), str(progress.cancelled), str(progress.expired),
                      f"{progress.created_at.astimezone():%Y-%m-%d %H:%M}")
    if not recent:
        console.print("no jobs yet")
        return
    # In a terminal the table fits its width; piped or redirected, each job stays on one line.
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


def default_errors_path(output: Path) -> Path:
    return output.with_name(output.stem + ".errors" + output.suffix)


@commands.command()
def results(
    job_id: Annotated[str, typer.Argument(help="the job id")],
    output: Annotated[Path, typer.Option("-o", "--output", help="results file (OpenAI Batch output format)")],
    errors: Annotated[Optional[Path], typer.Option("-e", "--errors", help="errors file; default OUTPUT.errors.jsonl")] = None,
) -> None:
    """Export a job's results and errors as JSONL files."""
    settings = configured_settings()
    export_to_files(settings, job_id, output, errors or default_errors_path(output))


def export_to_files(settings: Settings, job_id: str, output: Path, errors: Path) -> None:
    from producer.export import export_job
    from producer.queries import job_progress

    with command_sessions(settings)() as session:
        if job_progress(session, job_id) is None:
            raise fail(f"no job {job_id!r}")
        written, failed = export_job(session, job_id, output, errors)
    console.print(f"{written} results → {output}" + (f"; {failed} errors → {errors}" if failed else "; no errors"))
