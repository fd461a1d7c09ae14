"""The `deepbatch` command: run, submit, status, jobs, results, cancel, worker, flower, migrate, reconcile, dlq,
audit.

Errors print one clear line and exit non-zero: 1 for a failed operation, 2 for bad usage (typer's).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from producer import queries
from producer.embedded import DataDirInUse, embedded_services
from producer.export import export_job
from producer.submit import parse_duration, submit_file
from schema.db import session_factory
from schema.settings import Settings, get_settings

cli = typer.Typer(help="DeepBatch: bulk LLM inference on your own GPUs.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console(stderr=True, soft_wrap=True)  # one line per message, however narrow the terminal


def fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


def configured_settings() -> Settings:
    settings = get_settings()
    if settings.database_url is None or settings.broker_url is None:
        raise fail("DATABASE_URL and BROKER_URL must be set (or use `deepbatch run`, which starts embedded ones)")
    return settings


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def wait_for_job(settings: Settings, job_id: str, worker: subprocess.Popen | None = None,
                 worker_log: Path | None = None, poll_seconds: float = 0.5) -> queries.JobProgress:
    """Show a progress bar until every request of the job is final; stop early if our worker died."""
    sessions = session_factory(settings.sqlalchemy_url, pool_size=1)
    started = time.monotonic()
    with progress_bar() as bar:
        task = bar.add_task("generating", total=None, rate="")
        while True:
            with sessions() as session:
                progress = queries.job_progress(session, job_id)
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


COUNT_COLUMNS = ("total", "queued", "running", "succeeded", "failed", "dead", "cancelled", "expired")


def print_progress(progress: queries.JobProgress) -> None:
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


def parse_window(text: str) -> timedelta:
    """A bad --completion-window is a usage error naming the option."""
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


@cli.command()
def migrate() -> None:
    """Apply the database migrations (Alembic) to DATABASE_URL."""
    from schema.migrate import upgrade

    upgrade(configured_settings().sqlalchemy_url)
    console.print("database is at the latest schema")


MODEL_HELP = "a built-in name (smollm2-135m-instruct, tiny-deepseek-v3, ...), a .gguf file or a checkpoint " \
             "directory; default DEEPBATCH_MODEL"
TENSOR_PARALLEL_HELP = "GPUs the worker splits the model over, one process each; default DEEPBATCH_TENSOR_PARALLEL_SIZE"
QUANTIZATION_HELP = "fp8: linear weights in FP8 with 128x128 block scales, quantized at load; default DEEPBATCH_QUANTIZATION"


class Quantization(str, Enum):
    none = "none"
    fp8 = "fp8"


QuantizationOption = Annotated[Optional[Quantization], typer.Option(help=QUANTIZATION_HELP)]


def check_engine_settings_or_exit(settings: Settings) -> None:
    """A bad engine setting fails here, naming the setting and its value, not minutes later in the worker."""
    from worker.runtime import SettingError, check_engine_settings

    try:
        check_engine_settings(settings)
    except SettingError as error:
        raise fail(str(error)) from None


def start_engine_or_exit(settings: Settings) -> None:
    """Build the worker's engine (the model loaded) before Celery consumes anything; a failure exits
    the worker at once (Celery would only log it and fail every request)."""
    check_engine_settings_or_exit(settings)
    from worker.runtime import get_feeder

    try:
        get_feeder()
    except Exception as error:  # noqa: BLE001 - whatever stops the engine stops the worker, said plainly
        raise fail(f"the worker cannot start its engine ({type(error).__name__}: {error}); settings: "
                   f"DEEPBATCH_ENGINE={settings.engine!r} DEEPBATCH_MODEL={settings.model!r} "
                   f"DEEPBATCH_DEVICE={settings.device!r} DEEPBATCH_DTYPE={settings.dtype!r}") from None


@cli.command()
def worker(
    concurrency: Annotated[Optional[int], typer.Option(help="threads; default DEEPBATCH_WORKER_THREADS")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    model: Annotated[Optional[str], typer.Option(help=MODEL_HELP)] = None,
    tensor_parallel_size: Annotated[Optional[int], typer.Option(min=1, help=TENSOR_PARALLEL_HELP)] = None,
    quantization: QuantizationOption = None,
) -> None:
    """Run a Celery worker: one per GPU (or per group of --tensor-parallel-size GPUs), one engine per worker process."""
    if model:  # the worker's runtime reads the settings again, from the environment
        os.environ["DEEPBATCH_MODEL"] = model
    if tensor_parallel_size:
        os.environ["DEEPBATCH_TENSOR_PARALLEL_SIZE"] = str(tensor_parallel_size)
    if quantization:
        os.environ["DEEPBATCH_QUANTIZATION"] = quantization.value
    get_settings.cache_clear()
    settings = configured_settings()
    start_engine_or_exit(settings)
    from worker.app import celery_app

    celery_app.worker_main([
        "worker", "--pool=threads", f"--concurrency={concurrency or settings.worker_threads}",
        "-Q", settings.queue_name, f"--loglevel={loglevel}", "--without-gossip", "--without-mingle",
        "--hostname", f"deepbatch-{os.getpid()}@%h",
    ])


@cli.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="default DEEPBATCH_API_HOST")] = None,
    port: Annotated[Optional[int], typer.Option(help="default DEEPBATCH_API_PORT")] = None,
) -> None:
    """Serve OpenAI's Batch API (/v1/files, /v1/batches) and the job dashboard (/) over HTTP."""
    import uvicorn

    from producer.api.app import create_app

    settings = configured_settings()
    if settings.api_auth:
        with session_factory(settings.sqlalchemy_url, pool_size=1)() as session:
            from producer.api.keys import list_keys

            if not any(key.revoked_at is None for key in list_keys(session)):
                console.print("[yellow]no API key yet:[/] create one with `deepbatch keys create NAME` "
                              "(DEEPBATCH_API_AUTH=false serves without keys, on trusted networks only)")
    uvicorn.run(create_app(settings), host=host or settings.api_host, port=port or settings.api_port,
                log_level="warning")


keys_cli = typer.Typer(help="API keys of `deepbatch serve`: create, list, revoke.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")


@keys_cli.command("create")
def keys_create(name: Annotated[str, typer.Argument(help="who or what the key is for")]) -> None:
    """Create a key; its secret is printed once (stdout) and cannot be shown again."""
    from producer.api.keys import create_key

    settings = configured_settings()
    with session_factory(settings.sqlalchemy_url, pool_size=1).begin() as session:
        key, secret = create_key(session, name, cli_identity())
    console.print(f"created {key.id} ({name}); its secret, shown only now:")
    print(secret)


@keys_cli.command("list")
def keys_list() -> None:
    """Every key: id, name, created, revoked."""
    from producer.api.keys import list_keys

    settings = configured_settings()
    table = Table("key", "name", "created", "revoked")
    with session_factory(settings.sqlalchemy_url, pool_size=1)() as session:
        for key in list_keys(session):
            table.add_row(key.id, key.name, f"{key.created_at:%Y-%m-%d %H:%M}",
                          f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "")
    Console().print(table)


@keys_cli.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id (key_…), from `deepbatch keys list`")]) -> None:
    """Revoke a key: its requests are refused from now on."""
    from producer.api.keys import revoke_key

    settings = configured_settings()
    with session_factory(settings.sqlalchemy_url, pool_size=1).begin() as session:
        if not revoke_key(session, key_id, cli_identity()):
            raise fail(f"no live key {key_id!r}")
    console.print(f"{key_id} revoked")


@cli.command()
def flower(
    no_auth: Annotated[bool, typer.Option("--no-auth", help="serve without a password (trusted networks only)")] = False,
    port: Annotated[Optional[int], typer.Option(help="default DEEPBATCH_FLOWER_PORT")] = None,
) -> None:
    """Start Flower for the workers: workers, tasks and queue lengths, behind basic auth."""
    settings = configured_settings()
    arguments = ["flower", f"--port={port or settings.flower_port}", f"--broker-api={settings.flower_broker_api or ''}"]
    if settings.flower_user and settings.flower_password:
        arguments.append(f"--basic-auth={settings.flower_user}:{settings.flower_password}")
    elif not no_auth:
        raise fail("set DEEPBATCH_FLOWER_USER and DEEPBATCH_FLOWER_PASSWORD, or pass --no-auth to serve Flower openly")
    from worker.app import celery_app

    celery_app.start(arguments)


def submit_with_progress(path: Path, settings: Settings, completion_window: timedelta | None = None,
                         metadata: dict[str, str] | None = None, use_result_cache: bool = True,
                         priority: int = 0, resume: str | None = None) -> str:
    """Submit (or, with `resume`, go on submitting) `path` with a progress bar; returns the job id. Ctrl-C
    stops at once, and says how far the file got and how to resume."""
    from producer.submit import SubmissionStopped, SubmitError, resume_file
    from worker.app import make_celery_app

    if not path.is_file():
        raise fail(f"no such file: {path}")
    sessions = session_factory(settings.sqlalchemy_url, pool_size=1)
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
        raise interrupted_submission(sessions, path, started[0] if started else None) from None
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


def interrupted_submission(sessions, path: Path, job_id: str | None) -> typer.Exit:
    """What Ctrl-C during submit says: how far the file got, and the command that goes on from there."""
    if job_id is None:
        console.print("submission interrupted before its job was created; nothing was stored")
        return typer.Exit(code=130)
    with sessions() as session:
        submission = queries.submission_of(session, job_id)
    stored = submission.lines if submission else 0
    console.print(f"[yellow]submission interrupted:[/] job {job_id} holds lines 1-{stored} of {escape(str(path))}, "
                  f"which run as usual. Go on with: deepbatch submit {escape(str(path))} --resume {job_id}   "
                  f"(or drop the rest: deepbatch cancel {job_id})", highlight=False)
    return typer.Exit(code=130)


def report_rejected_lines(rejected: list[queries.FailedLines], unknown_models: list[tuple[str, int]],
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


@cli.command()
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
        print_progress(wait_for_job(settings, job_id))


@cli.command()
def status(
    job_id: Annotated[str, typer.Argument(help="the job id printed by submit")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    watch: Annotated[bool, typer.Option(help="follow with a progress bar until the job is done")] = False,
) -> None:
    """Show a job's progress. Exit code 0; 1 if there is no such job."""
    settings = configured_settings()
    with session_factory(settings.sqlalchemy_url, pool_size=1)() as session:
        progress = queries.job_progress(session, job_id)
        submission = queries.submission_of(session, job_id)
    if progress is None or submission is None:
        raise fail(f"no job {job_id!r}")
    if submission.stopped:
        console.print(stopped_note(job_id, submission), highlight=False)
    if watch and not progress.done:
        progress = wait_for_job(settings, job_id)
    if as_json:
        print(json.dumps({**asdict(progress), "submission_stopped_at_line": submission.lines
                          if submission.stopped else None}, default=str))
    else:
        print_progress(progress)


def stopped_note(job_id: str, submission: queries.Submission) -> str:
    return (f"[yellow]submission stopped at line {submission.lines}:[/] resume with `deepbatch submit "
            f"{escape(submission.input_file)} --resume {job_id}`, or end it with `deepbatch cancel {job_id}`")


@cli.command()
def cancel(job_id: Annotated[str, typer.Argument(help="the job id")]) -> None:
    """Cancel a job: queued requests are cancelled, running ones finish, finished results are kept."""
    settings = configured_settings()
    with session_factory(settings.sqlalchemy_url, pool_size=1)() as session:
        progress = queries.job_progress(session, job_id)
    if progress is None:
        raise fail(f"no job {job_id!r}")
    if progress.done:
        raise fail(f"job {job_id} is already {progress.status}; there is nothing to cancel")
    with session_factory(settings.sqlalchemy_url, pool_size=1).begin() as session:
        cancelled = queries.cancel_job(session, job_id, cli_identity())
    console.print(f"job {job_id}: {cancelled} queued requests cancelled; running ones will finish")


@cli.command()
def jobs(
    limit: Annotated[int, typer.Option(help="how many of the newest jobs")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List the newest jobs."""
    settings = configured_settings()
    with session_factory(settings.sqlalchemy_url, pool_size=1)() as session:
        recent = queries.recent_jobs(session, limit)
    if as_json:
        print(json.dumps([asdict(progress) for progress in recent], default=str))
        return
    with session_factory(settings.sqlalchemy_url, pool_size=1)() as session:
        stopped = {progress.job_id: submission for progress in recent
                   if progress.status == "validating" and (submission := queries.submission_of(session, progress.job_id))
                   and submission.stopped}
    for progress in recent:
        note = f"  (submission stopped at line {stopped[progress.job_id].lines})" if progress.job_id in stopped else ""
        print(f"{progress.job_id}  {progress.status:<11} {progress.finished}/{progress.total}  {progress.input_file}{note}")


def default_errors_path(output: Path) -> Path:
    return output.with_name(output.stem + ".errors" + output.suffix)


@cli.command()
def results(
    job_id: Annotated[str, typer.Argument(help="the job id")],
    output: Annotated[Path, typer.Option("-o", "--output", help="results file (OpenAI Batch output format)")],
    errors: Annotated[Optional[Path], typer.Option("-e", "--errors", help="errors file; default OUTPUT.errors.jsonl")] = None,
) -> None:
    """Export a job's results and errors as JSONL files."""
    settings = configured_settings()
    export_to_files(settings, job_id, output, errors or default_errors_path(output))


def export_to_files(settings: Settings, job_id: str, output: Path, errors: Path) -> None:
    with session_factory(settings.sqlalchemy_url, pool_size=1)() as session:
        if queries.job_progress(session, job_id) is None:
            raise fail(f"no job {job_id!r}")
        written, failed = export_job(session, job_id, output, errors)
    console.print(f"{written} results → {output}" + (f"; {failed} errors → {errors}" if failed else "; no errors"))


def start_worker_process(settings: Settings, log_path: Path, loglevel: str = "WARNING") -> subprocess.Popen:
    env = {**os.environ, "DEEPBATCH_DATABASE_URL": settings.database_url or "",
           "DEEPBATCH_BROKER_URL": settings.broker_url or "", "DEEPBATCH_MODEL": settings.model,
           "DEEPBATCH_TENSOR_PARALLEL_SIZE": str(settings.tensor_parallel_size),
           "DEEPBATCH_QUANTIZATION": settings.quantization or "none"}
    log = log_path.open("ab")
    command = [sys.executable, "-m", "producer.cli", "worker", "--loglevel", loglevel]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    worker_pid_file(settings.data_dir).write_text(str(process.pid))
    return process


def die_with_parent() -> None:
    """In the worker `run` starts: the kernel sends it SIGTERM if `run` dies, even of SIGKILL (Linux)."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_worker_process(process: subprocess.Popen, timeout: float = 30) -> None:
    process.terminate()  # Celery's warm shutdown: finish what is in hand, then exit
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    # Only the pid of the worker this run started is forgotten here.
    pid_file = worker_pid_file(get_settings().data_dir)
    if pid_file.is_file() and pid_file.read_text() == str(process.pid):
        pid_file.unlink()


@cli.command()
def run(
    file: Annotated[Path, typer.Argument(help="JSONL prompt file (OpenAI Batch or plain lines)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="results file")] = Path("results.jsonl"),
    errors: Annotated[Optional[Path], typer.Option("-e", "--errors", help="errors file; default OUTPUT.errors.jsonl")] = None,
    model: Annotated[Optional[str], typer.Option(help=MODEL_HELP)] = None,
    tensor_parallel_size: Annotated[Optional[int], typer.Option(min=1, help=TENSOR_PARALLEL_HELP)] = None,
    quantization: QuantizationOption = None,
) -> None:
    """Everything in one command: services (embedded if unset), migrations, a worker, submit, wait, export."""
    from schema.migrate import upgrade

    base = get_settings()
    if model:
        base = base.model_copy(update={"model": model})
    if tensor_parallel_size:
        base = base.model_copy(update={"tensor_parallel_size": tensor_parallel_size})
    if quantization:
        base = base.model_copy(update={"quantization": quantization.value})
    if not file.is_file():
        raise fail(f"no such file: {file}")
    check_engine_settings_or_exit(base)
    exit_cleanly_on_termination()
    stop_leftover_worker(base.data_dir)
    try:
        with embedded_services(base.data_dir, base.database_url, base.broker_url, on_leftovers=lambda servers:
                               console.print(f"stopped what an earlier `deepbatch run` left running in "
                                             f"{base.data_dir}: {', '.join(servers)}")) as urls:
            settings = base.model_copy(update={"database_url": urls.database_url, "broker_url": urls.broker_url})
            upgrade(settings.sqlalchemy_url)
            log_path = settings.data_dir / "worker.log"
            worker_process = start_worker_process(settings, log_path)
            try:
                job_id = submit_with_progress(file, settings)
                console.print(f"job {job_id} submitted; worker log: {log_path}")
                progress = wait_for_job(settings, job_id, worker_process, log_path)
            finally:
                stop_worker_process(worker_process)
            export_to_files(settings, job_id, output, errors or default_errors_path(output))
            print_progress(progress)
    except KeyboardInterrupt:
        console.print("interrupted: the worker and the services this run started are stopped")
        raise typer.Exit(code=130) from None
    except DataDirInUse as error:
        raise fail(str(error)) from None


def exit_cleanly_on_termination() -> None:
    """SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C, so the worker and the embedded services
    this run started are stopped on the way out, not left running."""
    def unwind(signum: int, _frame: object) -> None:
        console.print(f"{signal.Signals(signum).name}: stopping the worker and the services this run started")
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, unwind)


def worker_pid_file(data_dir: Path) -> Path:
    return data_dir / "worker.pid"


def stop_leftover_worker(data_dir: Path) -> None:
    """A worker an earlier `run` started and could not stop (it was SIGKILLed) is stopped, and said so."""
    pid_file = worker_pid_file(data_dir)
    try:
        pid = int(pid_file.read_text())
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"producer.cli\x00worker" in command_line:
        os.kill(pid, signal.SIGTERM)
        console.print(f"stopped a worker (pid {pid}) left running by an earlier `deepbatch run`")
    pid_file.unlink(missing_ok=True)


def cli_identity() -> str:
    """Who the audit log names for what this command changes."""
    return f"cli@{socket.gethostname()}:{os.getpid()}"


def cli_transitions(settings: Settings):  # -> worker.transitions.Transitions, imported late: the CLI starts fast
    from worker.transitions import Transitions

    sessions = session_factory(settings.sqlalchemy_url, pool_size=1)
    return Transitions(sessions, cli_identity(), timedelta(seconds=settings.lease_s), settings.queue_name)


@cli.command()
def reconcile(
    force: Annotated[bool, typer.Option(help="re-publish every queued request, even if the queue is not empty")] = False,
) -> None:
    """Re-enqueue what the broker lost: expired leases and queued requests with no message."""
    from worker.app import make_celery_app
    from worker.reconcile import reconcile as reconcile_once

    settings = configured_settings()  # also expires the queued requests of jobs past their window
    report = reconcile_once(cli_transitions(settings), make_celery_app(settings), settings, force=force)
    console.print(f"{len(report.requeued)} re-queued from expired leases, {len(report.dead)} dead-lettered, "
                  f"{len(report.republished)} queued requests re-published, {report.expired} expired")


dlq = typer.Typer(help="The dead-letter queue: requests that failed every attempt.", no_args_is_help=True)
cli.add_typer(dlq, name="dlq")


@dlq.command("list")
def dlq_list(
    job_id: Annotated[Optional[str], typer.Option("--job", help="only this job")] = None,
    limit: Annotated[int, typer.Option(help="at most this many")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List dead-lettered requests with their attempts and last error."""
    settings = configured_settings()
    with session_factory(settings.sqlalchemy_url, pool_size=1)() as session:
        letters = queries.dead_letters(session, job_id, limit)
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
    from worker.app import make_celery_app, publish_slices

    settings = configured_settings()
    with session_factory(settings.sqlalchemy_url, pool_size=1).begin() as session:
        requeued = queries.requeue_dead(session, settings.queue_name, cli_identity(), request_ids or None, job_id)
    publish_slices(make_celery_app(settings), requeued, settings.slice_size)
    console.print(f"{len(requeued)} requests re-queued")


@dlq.command("purge")
def dlq_purge(job_id: Annotated[Optional[str], typer.Option("--job", help="only this job")] = None) -> None:
    """Forget dead-letter records and empty the broker's dead-letter queue (the requests stay dead)."""
    from worker.app import dead_letter_queue, make_celery_app

    settings = configured_settings()
    with session_factory(settings.sqlalchemy_url, pool_size=1).begin() as session:
        purged = queries.purge_dead_letters(session, job_id)
    if job_id is None:
        app = make_celery_app(settings)
        with app.connection_for_write() as connection:
            dead_letter_queue(settings)(connection.default_channel).purge()
    console.print(f"{purged} dead-letter records purged")


audit = typer.Typer(help="The hash-chained audit log: verify it, anchor it off-site, purge it.", no_args_is_help=True)
cli.add_typer(audit, name="audit")


def audit_key(settings: Settings) -> bytes | None:
    """The key that signs the chain (DEEPBATCH_AUDIT_HMAC_KEY_FILE), or None when unset."""
    from schema.audit_signing import AuditKeyError, load_key

    try:
        return load_key(settings.audit_hmac_key_file)
    except AuditKeyError as error:
        raise fail(str(error)) from None


def print_audit_report(report) -> None:  # schema.audit.ChainReport, imported late: the CLI starts fast
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
    with session_factory(settings.sqlalchemy_url, pool_size=1)() as session:
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
    with session_factory(settings.sqlalchemy_url, pool_size=1)() as session:
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
    with session_factory(settings.sqlalchemy_url, pool_size=1).begin() as session:
        deleted = purge_older_than(session, timedelta(days=days or settings.audit_retention_days), key)
    console.print(f"{deleted} audit events older than {days or settings.audit_retention_days} days purged")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
