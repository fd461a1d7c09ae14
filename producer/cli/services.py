"""The long-running commands: run (everything in one command, with a worker it supervises), worker, serve
(the HTTP API) and flower."""

from __future__ import annotations

import os
import signal
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from rich.markup import escape

from producer.cli.common import cli_identity, command_sessions, configured_settings, console, fail
from producer.cli.jobs import default_errors_path, export_to_files, submit_with_progress
from producer.cli.progress import print_job, wait_for_job, wait_for_worker

if TYPE_CHECKING:
    from producer.queries import UnfinishedJob
    from schema.settings import Settings

commands = typer.Typer()

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

    from worker.registry import QueueTaken

    try:
        get_feeder()
    except QueueTaken as error:
        raise fail(str(error)) from None
    except Exception as error:  # noqa: BLE001 - whatever stops the engine stops the worker, said plainly
        raise fail(f"the worker cannot start its engine ({type(error).__name__}: {error}); settings: "
                   f"DEEPBATCH_ENGINE={settings.engine!r} DEEPBATCH_MODEL={settings.model!r} "
                   f"DEEPBATCH_DEVICE={settings.device!r} DEEPBATCH_DTYPE={settings.dtype!r}") from None


@commands.command()
def worker(
    concurrency: Annotated[Optional[int], typer.Option(help="threads; default DEEPBATCH_WORKER_THREADS")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    model: Annotated[Optional[str], typer.Option(help=MODEL_HELP)] = None,
    tensor_parallel_size: Annotated[Optional[int], typer.Option(min=1, help=TENSOR_PARALLEL_HELP)] = None,
    quantization: QuantizationOption = None,
    ready_file: Annotated[Optional[Path], typer.Option(hidden=True, help="created once the worker takes requests "
                                                       "(how `run` knows its worker has loaded the model)")] = None,
) -> None:
    """Run a Celery worker: one per GPU (or per group of --tensor-parallel-size GPUs), one engine per worker process."""
    from schema.settings import get_settings
    from worker.app import model_queue_name, worker_app

    if model:  # the worker's runtime reads the settings again, from the environment
        deployment = configured_settings()  # another model than the deployment's default gets a queue of its own
        os.environ["DEEPBATCH_QUEUE_NAME"] = model_queue_name(deployment.queue_name, model,
                                                              deployment.served_model_names)
        os.environ["DEEPBATCH_MODEL"] = model
    if tensor_parallel_size:
        os.environ["DEEPBATCH_TENSOR_PARALLEL_SIZE"] = str(tensor_parallel_size)
    if quantization:
        os.environ["DEEPBATCH_QUANTIZATION"] = quantization.value
    get_settings.cache_clear()
    settings = configured_settings()
    start_engine_or_exit(settings)
    if ready_file is not None:
        from celery.signals import worker_ready

        worker_ready.connect(lambda **_: ready_file.write_text(str(os.getpid())), weak=False)
    worker_app().worker_main([
        "worker", "--pool=threads", f"--concurrency={concurrency or settings.worker_threads}",
        "-Q", settings.queue_name, f"--loglevel={loglevel}", "--without-gossip", "--without-mingle",
        "--hostname", f"deepbatch-{os.getpid()}@%h",
    ])


@commands.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="default DEEPBATCH_API_HOST")] = None,
    port: Annotated[Optional[int], typer.Option(help="default DEEPBATCH_API_PORT")] = None,
    access_log: Annotated[Optional[Path], typer.Option(
        help="append the access log (a line per request) to this file; default: standard output")] = None,
) -> None:
    """Serve OpenAI's Batch API (/v1/files, /v1/batches) and the job dashboard (/) over HTTP."""
    import uvicorn

    from producer.api.app import create_app
    from producer.api.keys import list_keys

    settings = configured_settings()
    if settings.api_auth:
        with command_sessions(settings)() as session:
            if not any(key.revoked_at is None for key in list_keys(session)):
                console.print("[yellow]no API key yet:[/] create one with `deepbatch keys create NAME` "
                              "(DEEPBATCH_API_AUTH=false serves without keys, on trusted networks only)")
    host, port = host or settings.api_host, port or settings.api_port
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    console.print(f"serving the Batch API at {url}/v1 and the dashboard at {url}/ "
                  f"(access log: {access_log or 'standard output'}; Ctrl-C stops)", highlight=False)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=uvicorn_logging(access_log))


def uvicorn_logging(access_log: Path | None) -> dict:
    """Uvicorn's own messages from warnings up, on standard error; its access log, a line per request in
    its usual format (client, request line, status), on standard output or appended to `access_log`."""
    access_handler: dict = ({"class": "logging.FileHandler", "filename": str(access_log), "encoding": "utf-8"}
                            if access_log else {"class": "logging.StreamHandler", "stream": "ext://sys.stdout"})
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {
            "default": {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s",
                        "use_colors": False},
            "access": {"()": "uvicorn.logging.AccessFormatter", "use_colors": False,
                       "fmt": '%(asctime)s %(client_addr)s "%(request_line)s" %(status_code)s'},
        },
        "handlers": {
            "default": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "default"},
            "access": {**access_handler, "formatter": "access"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "WARNING", "propagate": False},
            "uvicorn.error": {"handlers": ["default"], "level": "WARNING", "propagate": False},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


@commands.command()
def flower(
    no_auth: Annotated[bool, typer.Option("--no-auth", help="serve without a password (trusted networks only)")] = False,
    port: Annotated[Optional[int], typer.Option(help="default DEEPBATCH_FLOWER_PORT")] = None,
) -> None:
    """Start Flower for the workers: workers, tasks and queue lengths, behind basic auth."""
    from worker.app import make_celery_app

    settings = configured_settings()
    arguments = ["flower", f"--port={port or settings.flower_port}", f"--broker-api={settings.flower_broker_api or ''}"]
    if settings.flower_user and settings.flower_password:
        arguments.append(f"--basic-auth={settings.flower_user}:{settings.flower_password}")
    elif not no_auth:
        raise fail("set DEEPBATCH_FLOWER_USER and DEEPBATCH_FLOWER_PASSWORD, or pass --no-auth to serve Flower openly")
    make_celery_app(settings).start(arguments)


@commands.command()
def run(
    file: Annotated[Path, typer.Argument(help="JSONL prompt file (OpenAI Batch or plain lines)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="results file")] = Path("results.jsonl"),
    errors: Annotated[Optional[Path], typer.Option("-e", "--errors", help="errors file; default OUTPUT.errors.jsonl")] = None,
    model: Annotated[Optional[str], typer.Option(help=MODEL_HELP)] = None,
    tensor_parallel_size: Annotated[Optional[int], typer.Option(min=1, help=TENSOR_PARALLEL_HELP)] = None,
    quantization: QuantizationOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="go on with the unfinished job an interrupted run of "
                                         "FILE left (what a run of FILE does anyway); an error if there is none")] = False,
    new: Annotated[bool, typer.Option("--new", help="cancel the unfinished job of FILE, if any, and start over")] = False,
    cancel: Annotated[bool, typer.Option("--cancel", help="cancel the unfinished job of FILE, write what it "
                                         "finished, and exit (no worker is started)")] = False,
) -> None:
    """Everything in one command: services (embedded if unset), migrations, a worker, submit, wait, export.
    An interrupted run writes the results finished so far; the next run of FILE goes on with what is left."""
    from producer.embedded import DataDirInUse, embedded_services, stop_leftover_worker
    from schema.settings import get_settings

    if resume + new + cancel > 1:
        raise typer.BadParameter("choose one of --resume, --new and --cancel")
    options = {"model": model, "tensor_parallel_size": tensor_parallel_size,
               "quantization": quantization.value if quantization else None}
    base = get_settings().model_copy(update={name: value for name, value in options.items() if value})
    if not file.is_file():
        raise fail(f"no such file: {file}")
    if not cancel:
        check_engine_settings_or_exit(base)
    exit_cleanly_on_termination()
    if (leftover := stop_leftover_worker(base.data_dir)) is not None:
        console.print(f"stopped a worker (pid {leftover}) left running by an earlier `deepbatch run`")
    choice = "cancel" if cancel else "new" if new else "resume" if resume else "auto"
    try:
        with embedded_services(base.data_dir, base.database_url, base.broker_url, on_leftovers=lambda servers:
                               console.print(f"stopped what an earlier `deepbatch run` left running in "
                                             f"{base.data_dir}: {', '.join(servers)}")) as urls:
            settings = base.model_copy(update={"database_url": urls.database_url, "broker_url": urls.broker_url})
            run_in_services(settings, file, output, errors or default_errors_path(output), choice)
    except KeyboardInterrupt:
        console.print("interrupted: the worker and the services this run started are stopped")
        raise typer.Exit(code=130) from None
    except DataDirInUse as error:
        raise fail(str(error)) from None


def run_in_services(settings: Settings, file: Path, output: Path, errors: Path, choice: str) -> None:
    """`run` once its services are up: migrate, pick the job (a new one, or the one an interrupted run of
    this file left), then run it with a worker, or cancel it (`choice` "cancel")."""
    from producer import queries
    from producer.runs import run_queue, unfinished_runs
    from schema.migrate import upgrade

    upgrade(settings.sqlalchemy_url)
    path = file.resolve()
    sessions = command_sessions(settings)
    with sessions() as session:
        earlier = unfinished_runs(session, path, settings.queue_name)
    for job in earlier.other_files:
        console.print(f"[yellow]job {job.job_id} of {escape(job.input_file)} is unfinished[/] "
                      f"({job.total - job.finished} of {job.total} requests left; it waits on a queue of its own "
                      f"and does not delay this run): `deepbatch run {escape(job.input_file)}` goes on with it, "
                      f"`deepbatch run {escape(job.input_file)} --cancel` ends it", highlight=False)
    previous = earlier.this_file
    if choice in ("resume", "cancel") and previous is None:
        raise fail(f"no unfinished job of {escape(str(path))} to {'resume' if choice == 'resume' else 'cancel'}")
    if previous is not None and choice in ("new", "cancel"):
        with sessions.begin() as session:
            cancelled = queries.cancel_job(session, previous.job_id, cli_identity())
        console.print(f"job {previous.job_id} cancelled ({cancelled} queued requests)")
        if choice == "cancel":
            export_to_files(settings, previous.job_id, output, errors)
            return
        previous = None
    queue = previous.queue if previous is not None else run_queue(settings.queue_name, path)
    run_with_worker(settings.model_copy(update={"queue_name": queue}), path, output, errors, previous)


def run_with_worker(settings: Settings, path: Path, output: Path, errors: Path,
                    previous: UnfinishedJob | None) -> None:
    """Start the worker, submit (or go on with `previous`), wait (stopping early if the worker dies), stop the
    worker, export. Interrupted, it writes what has finished and says how to go on."""
    from producer.embedded import fresh_log, start_worker_process, stop_worker_process

    log_path = fresh_log(settings.data_dir / "worker.log")
    ready_file = settings.data_dir / "worker.ready"
    worker_process = start_worker_process(settings, log_path, ready_file=ready_file)
    go_on_with = f"deepbatch run {path} --resume"
    job_id: str | None = previous.job_id if previous is not None else None
    interrupted: BaseException | None = None
    try:
        if previous is None:
            job_id = submit_with_progress(path, settings, go_on_with=go_on_with)
            console.print(f"job {job_id} submitted; worker log: {log_path}")
        else:
            go_on(settings, path, previous, go_on_with)
        wait_for_worker(worker_process, ready_file, log_path, settings.model)
        progress = wait_for_job(settings, job_id, worker_process, log_path)
    except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C; SIGTERM and SIGHUP (exit_cleanly_on_termination)
        interrupted = stop
    finally:
        stop_worker_process(worker_process)  # it finishes what it holds first: those results are kept too
    if interrupted is not None:
        if job_id is not None:
            keep_what_finished(settings, job_id, output, errors, go_on_with)
        raise interrupted
    export_to_files(settings, job_id, output, errors)
    with command_sessions(settings)() as session:
        print_job(session, progress)


def go_on(settings: Settings, path: Path, previous: UnfinishedJob, go_on_with: str) -> None:
    """Go on with the job an interrupted run of this file left: submit the rest of the file if its
    submission stopped, and publish its queued requests again (the broker may have lost them)."""
    from producer.runs import publish_what_is_left, stored_part_unchanged

    if not stored_part_unchanged(path, previous):
        raise fail(f"{escape(str(path))} is not the file job {previous.job_id} was submitted from (its first "
                   f"{previous.submitted_bytes} bytes changed): run it with --new to cancel that job and start over, "
                   "or with --cancel to end that job")
    left = previous.total - previous.finished
    console.print(f"going on with job {previous.job_id}, left unfinished by an earlier run of this file: "
                  f"{previous.finished} of {previous.total} requests done, {left} left "
                  f"(`--new` starts over instead)", highlight=False)
    publish_what_is_left(settings, command_sessions(settings), previous.job_id)
    if not previous.submitted:
        submit_with_progress(path, settings, resume=previous.job_id, go_on_with=go_on_with)


def keep_what_finished(settings: Settings, job_id: str, output: Path, errors: Path, go_on_with: str) -> None:
    """An interrupted run writes the results finished so far (and the lines failed so far) and says how to
    go on; the run that does rewrites both files with everything."""
    from producer.export import export_job
    from producer.queries import job_progress

    with command_sessions(settings)() as session:
        progress = job_progress(session, job_id)
        written, failed = export_job(session, job_id, output, errors)
    assert progress is not None
    left = progress.queued + progress.running
    console.print(f"[yellow]interrupted:[/] job {job_id} has {progress.finished} of {progress.total} requests "
                  f"finished: {written} results → {escape(str(output))}"
                  + (f", {failed} errors → {escape(str(errors))}" if failed else "")
                  + f"; {left} left. Go on with: {escape(go_on_with)}", highlight=False)


def exit_cleanly_on_termination() -> None:
    """SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C, so the worker and the embedded services
    this run started are stopped on the way out, not left running."""
    def unwind(signum: int, _frame: object) -> None:
        console.print(f"{signal.Signals(signum).name}: stopping the worker and the services this run started")
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, unwind)
