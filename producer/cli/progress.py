"""How the commands show a job: a progress bar while it runs (`submit --wait`, `status --watch`, `run`) and
a table of its counts."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from producer.cli.common import command_sessions, console, fail

if TYPE_CHECKING:
    from producer.queries import JobProgress
    from schema.settings import Settings

COUNT_COLUMNS = ("total", "queued", "running", "succeeded", "failed", "dead", "cancelled", "expired")


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def wait_for_job(settings: Settings, job_id: str, worker: subprocess.Popen | None = None,
                 worker_log: Path | None = None, poll_seconds: float = 0.5) -> JobProgress:
    """Show a progress bar until every request of the job is final; stop early if our worker died."""
    from producer.queries import job_progress

    sessions = command_sessions(settings)
    started = time.monotonic()
    with progress_bar() as bar:
        task = bar.add_task("generating", total=None, rate="")
        while True:
            with sessions() as session:
                progress = job_progress(session, job_id)
            assert progress is not None
            elapsed = max(time.monotonic() - started, 1e-6)
            bar.update(task, total=progress.total, completed=progress.finished,
                       rate=f"{progress.finished / elapsed:.1f} req/s")
            if progress.done:
                return progress
            if worker is not None and worker.poll() is not None:
                raise fail(f"the worker exited with code {worker.returncode}; the end of its log ({worker_log}):\n"
                           + log_tail(worker_log))
            time.sleep(poll_seconds)


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.is_file():
        return "(no log)"
    return "\n".join("  " + escape(line) for line in path.read_text(errors="replace").splitlines()[-lines:])


def print_progress(progress: JobProgress) -> None:
    """One row per field, so nothing is cut in a narrow terminal."""
    title = f"job {progress.job_id}"
    table = Table(title=title, show_header=False, min_width=len(title) + 4)
    table.add_column("field", style="bold")
    table.add_column("value", justify="right")
    table.add_row("status", progress.status)
    for name in COUNT_COLUMNS:
        table.add_row(name, str(getattr(progress, name)))
    if progress.cache_hits:
        table.add_row("cache hits", str(progress.cache_hits))
    Console().print(table)
