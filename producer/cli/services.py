"""The long-running commands: run (everything in one command, with a worker it supervises), worker, serve
(the HTTP API) and flower."""

from __future__ import annotations

import os
import signal
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from producer.cli.common import command_sessions, configured_settings, console, fail
from producer.cli.jobs import default_errors_path, export_to_files, submit_with_progress
from producer.cli.progress import print_progress, wait_for_job

if TYPE_CHECKING:
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

    try:
        get_feeder()
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
) -> None:
    """Run a Celery worker: one per GPU (or per group of --tensor-parallel-size GPUs), one engine per worker process."""
    from schema.settings import get_settings
    from worker.app import worker_app

    if model:  # the worker's runtime reads the settings again, from the environment
        os.environ["DEEPBATCH_MODEL"] = model
    if tensor_parallel_size:
        os.environ["DEEPBATCH_TENSOR_PARALLEL_SIZE"] = str(tensor_parallel_size)
    if quantization:
        os.environ["DEEPBATCH_QUANTIZATION"] = quantization.value
    get_settings.cache_clear()
    settings = configured_settings()
    start_engine_or_exit(settings)
    worker_app().worker_main([
        "worker", "--pool=threads", f"--concurrency={concurrency or settings.worker_threads}",
        "-Q", settings.queue_name, f"--loglevel={loglevel}", "--without-gossip", "--without-mingle",
        "--hostname", f"deepbatch-{os.getpid()}@%h",
    ])


@commands.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="default DEEPBATCH_API_HOST")] = None,
    port: Annotated[Optional[int], typer.Option(help="default DEEPBATCH_API_PORT")] = None,
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
    uvicorn.run(create_app(settings), host=host or settings.api_host, port=port or settings.api_port,
                log_level="warning")


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
) -> None:
    """Everything in one command: services (embedded if unset), migrations, a worker, submit, wait, export."""
    from producer.embedded import DataDirInUse, embedded_services, stop_leftover_worker
    from schema.settings import get_settings

    options = {"model": model, "tensor_parallel_size": tensor_parallel_size,
               "quantization": quantization.value if quantization else None}
    base = get_settings().model_copy(update={name: value for name, value in options.items() if value})
    if not file.is_file():
        raise fail(f"no such file: {file}")
    check_engine_settings_or_exit(base)
    exit_cleanly_on_termination()
    if (leftover := stop_leftover_worker(base.data_dir)) is not None:
        console.print(f"stopped a worker (pid {leftover}) left running by an earlier `deepbatch run`")
    try:
        with embedded_services(base.data_dir, base.database_url, base.broker_url, on_leftovers=lambda servers:
                               console.print(f"stopped what an earlier `deepbatch run` left running in "
                                             f"{base.data_dir}: {', '.join(servers)}")) as urls:
            settings = base.model_copy(update={"database_url": urls.database_url, "broker_url": urls.broker_url})
            run_with_worker(settings, file, output, errors or default_errors_path(output))
    except KeyboardInterrupt:
        console.print("interrupted: the worker and the services this run started are stopped")
        raise typer.Exit(code=130) from None
    except DataDirInUse as error:
        raise fail(str(error)) from None


def run_with_worker(settings: Settings, file: Path, output: Path, errors: Path) -> None:
    """`run` once its services are up: migrate, start the worker, submit, wait (stopping early if the worker
    dies), stop the worker, export."""
    from producer.embedded import start_worker_process, stop_worker_process
    from schema.migrate import upgrade

    upgrade(settings.sqlalchemy_url)
    log_path = settings.data_dir / "worker.log"
    worker_process = start_worker_process(settings, log_path)
    try:
        job_id = submit_with_progress(file, settings)
        console.print(f"job {job_id} submitted; worker log: {log_path}")
        progress = wait_for_job(settings, job_id, worker_process, log_path)
    finally:
        stop_worker_process(worker_process)
    export_to_files(settings, job_id, output, errors)
    print_progress(progress)


def exit_cleanly_on_termination() -> None:
    """SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C, so the worker and the embedded services
    this run started are stopped on the way out, not left running."""
    def unwind(signum: int, _frame: object) -> None:
        console.print(f"{signal.Signals(signum).name}: stopping the worker and the services this run started")
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, unwind)
