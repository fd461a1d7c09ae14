"""How the commands show a job: a progress bar while it runs (`submit --wait`, `status --watch`, `run`) and
a table of its counts."""

from __future__ import annotations

import subprocess
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from producer.cli.common import command_sessions, console, fail

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from producer.queries import JobProgress
    from schema.settings import Settings

COUNT_COLUMNS = ("total", "queued", "running", "succeeded", "failed", "dead", "cancelled", "expired")


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


class RecentRate:
    """Requests finished per second over the last `window_s`, from samples of a running count: blank until
    two samples a second apart, so a bar opened on a job half done does not start at hundreds a second."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, count: int, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        self.samples.append((now, count))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        first_time, first_count = self.samples[0]
        if now - first_time < 1.0:
            return ""
        return f"{(count - first_count) / (now - first_time):.1f} req/s"


def wait_for_worker(worker: subprocess.Popen, ready_file: Path, worker_log: Path, model: str,
                    poll_seconds: float = 0.2) -> None:
    """The loading phase of `run`: say what the worker is doing until it is ready to take requests (it
    writes `ready_file` then); stop at once, with the end of its log, if it exits instead."""
    started = time.monotonic()
    with console.status(f"loading {escape(model)} in the worker") as status:
        while not ready_file.is_file():
            if worker.poll() is not None:
                raise worker_exited(worker, worker_log)
            status.update(f"loading {escape(model)} in the worker ({time.monotonic() - started:.0f} s; "
                          f"its log: {escape(str(worker_log))})")
            time.sleep(poll_seconds)
    console.print(f"worker ready: {escape(model)} loaded in {time.monotonic() - started:.1f} s", highlight=False)


def worker_exited(worker: subprocess.Popen, worker_log: Path | None) -> typer.Exit:
    return fail(f"the worker exited with code {worker.returncode}; the end of its log ({worker_log}):\n"
                + log_tail(worker_log))


def wait_for_job(settings: Settings, job_id: str, worker: subprocess.Popen | None = None,
                 worker_log: Path | None = None, poll_seconds: float = 0.5) -> JobProgress:
    """Show a progress bar until every request of the job is final; stop early if our worker died. The bar
    counts requests run: lines rejected at submission (failed without running) are left out, and said apart."""
    from producer.queries import job_progress, rejected_line_count

    sessions = command_sessions(settings)
    rate = RecentRate()
    with progress_bar() as bar:
        task = None
        while True:
            with sessions() as session:
                progress = job_progress(session, job_id)
                rejected = rejected_line_count(session, job_id)
            assert progress is not None
            run_total, run_finished = progress.total - rejected, progress.finished - rejected
            description = "generating" + (f" ({rejected} rejected line{'s' if rejected != 1 else ''} apart)"
                                          if rejected else "")
            if task is None:  # opened with what had finished already: rich's ETA counts only what follows
                task = bar.add_task(description, total=run_total, completed=run_finished, rate="")
            bar.update(task, description=description, total=run_total, completed=run_finished,
                       rate=rate.add(run_finished))
            if progress.done:
                return progress
            if worker is not None and worker.poll() is not None:
                raise worker_exited(worker, worker_log)
            time.sleep(poll_seconds)


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.is_file():
        return "(no log)"
    return "\n".join("  " + escape(line) for line in path.read_text(errors="replace").splitlines()[-lines:])


def print_progress(progress: JobProgress, models: list[tuple[str, int]] | None = None, rejected: int | None = None,
                   input_file: str | None = None) -> None:
    """One row per field, so nothing is cut in a narrow terminal: status, the file, the model(s) that
    answered (else the one asked for), every count, lines rejected at submission, cache hits."""
    title = f"job {progress.job_id}"
    table = Table(title=title, show_header=False, min_width=len(title) + 4)
    table.add_column("field", style="bold")
    table.add_column("value", justify="right")
    table.add_row("status", progress.status)
    table.add_row("file", escape(input_file or progress.input_file))
    answered = ", ".join(f"{escape(name)} ({count})" for name, count in models or []) if len(models or []) > 1 \
        else escape(models[0][0] if models else progress.model)
    table.add_row("models" if len(models or []) > 1 else "model", answered)
    for name in COUNT_COLUMNS:
        table.add_row(name, str(getattr(progress, name)))
        if name == "failed" and rejected:
            table.add_row("  rejected at submission", str(rejected))
    table.add_row("cache hits", str(progress.cache_hits))
    Console().print(table)


def print_job(session: Session, progress: JobProgress) -> None:
    """print_progress with what the job's rows add: the models that answered, rejected lines, the file's name."""
    from producer import queries

    print_progress(progress, queries.result_models(session, progress.job_id),
                   queries.rejected_line_count(session, progress.job_id),
                   queries.input_file_names(session, [progress.job_id]).get(progress.job_id))
