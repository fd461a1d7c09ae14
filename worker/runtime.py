"""What one worker process holds: its engine, its feeder and the maintenance thread, built once.

Built at Celery's `worker_init` (or by the first slice; `deepbatch worker` builds it before Celery starts)
because the engine owns the model and the KV cache, and every slice's requests must land in the same
continuous batch. Once built, the worker announces itself in the workers registry (worker/registry.py) and
its maintenance thread beats its heart there.

Celery configures logging only when it starts the worker, after the engine is built: the lines that say
which model loads on which device, and when it is ready, would go to Python's last-resort handler, which
drops INFO. So the build gives the root logger a handler in Celery's format if it has none; Celery keeps a
handler it finds there (worker_hijack_root_logger is off) and sets its level from --loglevel.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta
from functools import partial

from schema.db import session_factory
from schema.settings import EngineSettings, FeederSettings, Settings, get_settings
from worker import metrics, registry
from worker.app import publish_dead_letters, publish_groups, publish_slices, worker_app
from worker.circuit import EXIT_CIRCUIT_OPEN
from worker.engine.types import EngineConfig
from worker.engine.process import EngineProcess, engine_facts, load_factory
from worker.feeder import Engine, Feeder
from worker.reconcile import Maintenance
from worker.transitions import Transitions


# EngineConfig's name of each engine setting named otherwise in Settings.
ENGINE_CONFIG_NAMES = {"cuda_graphs": "use_cuda_graphs"}


def engine_config(settings: Settings | EngineSettings) -> EngineConfig:
    """The settings given; the engine's own defaults (EngineConfig) for those left unset (None)."""
    given = engine_share(settings).model_dump(exclude={"engine", "engine_process"}, exclude_none=True)
    return EngineConfig(**{ENGINE_CONFIG_NAMES.get(name, name): value for name, value in given.items()})


def engine_share(settings: Settings | EngineSettings) -> EngineSettings:
    """The engine's share; a whole Settings is taken too (bench/system.py, the CLI's check)."""
    return EngineSettings.of(settings) if isinstance(settings, Settings) else settings


# The factory (`package.module:function` taking an EngineConfig) of each engine named by DEEPBATCH_ENGINE.
ENGINE_FACTORIES = {"deepbatch": "worker.engine.engine:build_engine",
                    "null": "worker.engine.null_engine:build_null_engine"}


def engine_factory(settings: EngineSettings) -> str:
    """`deepbatch`, `null` (benchmarks and tests only), or `package.module:factory` taking an EngineConfig."""
    return ENGINE_FACTORIES.get(settings.engine, settings.engine)


def engine_in_own_process(settings: EngineSettings) -> bool:
    from worker.engine.device import resolve_device

    if settings.engine_process == "auto":
        return resolve_device(settings.device).type == "cuda"
    return settings.engine_process == "own"


def build_engine(settings: EngineSettings) -> Engine:
    """The engine, in this process or in one of its own (DEEPBATCH_ENGINE_PROCESS); when the deepbatch engine
    cannot go on, or its process dies, the worker exits at once (worker/engine/engine.py's exit_process)."""
    config = engine_config(settings)
    if engine_in_own_process(settings):
        from worker.engine.engine import exit_process

        return EngineProcess(engine_factory(settings), config, on_fatal_error=exit_process)
    return load_factory(engine_factory(settings))(config)


class SettingError(ValueError):
    """An engine setting that cannot work; the message names the setting and its value."""


def check_engine_settings(settings: Settings | EngineSettings) -> None:
    """The engine's settings, checked in a second without loading anything big, so that a typo stops a
    worker (or `deepbatch run`) at once rather than in its first request."""
    import torch

    from worker.engine.device import resolve_device, resolve_dtype
    from worker.engine.loader import model_path

    settings = engine_share(settings)

    if settings.engine not in ENGINE_FACTORIES:
        try:
            load_factory(settings.engine)
        except (ImportError, AttributeError) as error:
            raise SettingError(f"DEEPBATCH_ENGINE={settings.engine!r}: {error}") from None
    try:
        device = resolve_device(settings.device)
        if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    except (RuntimeError, ValueError) as error:
        raise SettingError(f"DEEPBATCH_DEVICE={settings.device!r}: {error} (auto, cpu, cuda or cuda:N)") from None
    if not isinstance(getattr(torch, settings.dtype, None), torch.dtype) and settings.dtype != "auto":
        raise SettingError(f"DEEPBATCH_DTYPE={settings.dtype!r}: not a torch dtype (auto, float32, bfloat16, float16)")
    resolve_dtype(settings.dtype, device)
    if settings.engine == "deepbatch":
        try:
            model_path(settings.model)
        except ValueError as error:
            raise SettingError(f"DEEPBATCH_MODEL={settings.model!r}: {error}") from None
        check_tensor_parallel_size(settings.tensor_parallel_size, device)


def check_tensor_parallel_size(size: int, device) -> None:
    """Each rank takes the next GPU from the configured one; on the CPU the ranks share the host (tests)."""
    import torch

    if device.type == "cuda" and (device.index or 0) + size > torch.cuda.device_count():
        raise SettingError(f"DEEPBATCH_TENSOR_PARALLEL_SIZE={size}: needs GPUs {device.index or 0} to "
                           f"{(device.index or 0) + size - 1}; this machine has {torch.cuda.device_count()}")


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


CELERY_LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"  # Celery's worker_log_format
log = logging.getLogger(__name__)


def show_startup_logs() -> None:
    """INFO lines visible before Celery configures logging (the module's docstring says why)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()  # stderr, as Celery's
        handler.setFormatter(logging.Formatter(CELERY_LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def model_format(model: str) -> str:
    from worker.engine.configs import builtin_config, resolve_model

    path = resolve_model(model)
    if builtin_config(path) is not None:
        return "built-in"
    return "gguf" if path.endswith(".gguf") else "checkpoint"


def placement(settings: EngineSettings) -> tuple[list[str], str]:
    """The devices (one per tensor-parallel rank) and dtype the settings resolve to."""
    from worker.engine.device import resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    dtype = str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")
    if device.type == "cuda":
        first = device.index or 0
        return [f"cuda:{first + rank}" for rank in range(settings.tensor_parallel_size)], dtype
    return [str(device)] * settings.tensor_parallel_size, dtype


def build_announced_engine(settings: Settings, sessions) -> tuple[Engine, registry.Announcement]:
    """Check the queue is this model's, build the engine saying what loads where and when it is ready, and
    describe this worker for the registry."""
    engine_settings = EngineSettings.of(settings)
    aliases = sorted(settings.served_model_names - {settings.model})
    registry.check_queue_free(sessions, worker_identity(), settings.model, settings.queue_name, settings.lease_s)
    devices, dtype = placement(engine_settings)
    quantization = settings.quantization if settings.quantization not in (None, "none") else "no quantization"
    fmt = model_format(settings.model) if settings.engine == "deepbatch" else f"{settings.engine} engine"
    parallel = f", tensor parallel {settings.tensor_parallel_size}" if settings.tensor_parallel_size > 1 else ""
    log.info("loading %s (%s, %s) on %s, %s%s; queue %s …", settings.model, fmt, quantization, ",".join(devices),
             dtype, parallel, settings.queue_name)
    started = time.monotonic()
    engine = build_engine(engine_settings)
    facts = engine_facts(engine)
    log.info("ready in %.1f s: max batch %s, KV cache %s tokens", time.monotonic() - started, facts["max_batch_size"],
             facts["kv_cache_tokens"] if facts["kv_cache_tokens"] is not None else "(not reported)")
    announcement = registry.Announcement(
        id=worker_identity(), model=settings.model, aliases=aliases, queue=settings.queue_name,
        model_format=fmt, quantization=settings.quantization, devices=devices, dtype=dtype,
        tensor_parallel_size=settings.tensor_parallel_size, **facts)
    return engine, announcement


_feeder: Feeder | None = None
_maintenance: Maintenance | None = None
_sessions = None
_lock = threading.Lock()


def get_feeder() -> Feeder:
    global _feeder, _maintenance, _sessions
    with _lock:
        if _feeder is None:
            from worker.engine.tokenizer import PromptEncoder, load_tokenizer

            show_startup_logs()
            settings = get_settings()
            celery_app = worker_app()
            # No pre-ping: a round trip per transaction; a lost connection is retried (worker/retries.py).
            sessions = session_factory(settings.sqlalchemy_url, pool_size=(settings.worker_threads or 2) + 2,
                                       pre_ping=False)
            transitions = Transitions(sessions, worker_identity(), timedelta(seconds=settings.lease_s),
                                      settings.queue_name)
            engine, announcement = build_announced_engine(settings, sessions)
            encoder = PromptEncoder(load_tokenizer(settings.model))
            _feeder = Feeder(FeederSettings.of(settings), engine, encoder, transitions,
                             announce_dead=lambda letters: publish_dead_letters(celery_app, settings, letters),
                             republish=lambda ordinary, groups: (publish_slices(celery_app, ordinary,
                                                                                settings.slice_size),
                                                                 publish_groups(celery_app, groups)),
                             on_circuit_open=exit_for_supervisor)
            registry.announce(sessions, announcement)
            _sessions = sessions
            _maintenance = Maintenance(transitions, celery_app, settings, _feeder.held_request_ids,
                                       on_tick=partial(on_tick, _feeder, sessions))
            _maintenance.start()
            metrics.serve(settings.metrics_port)
        return _feeder


def on_tick(feeder: Feeder, sessions) -> None:
    registry.heartbeat(sessions, worker_identity())
    feeder.judge_failures_alone()
    metrics.record_engine_stats(feeder.engine)


def exit_for_supervisor() -> None:
    """The circuit opened (worker/circuit.py) and what this worker held is given back: exit at once, with
    no warm shutdown, so that the broker redelivers the slices it holds (their unclaimed requests) to the
    other workers, and the supervisor restarts it."""
    logging.shutdown()
    os._exit(EXIT_CIRCUIT_OPEN)


def stop_claiming() -> None:
    if _feeder is not None:
        _feeder.stop_claiming()


def shutdown() -> None:
    if _maintenance is not None:
        _maintenance.stop()
    if _feeder is not None:
        _feeder.shutdown()
    if _sessions is not None:
        try:
            registry.sign_off(_sessions, worker_identity())
        except Exception:  # noqa: BLE001 - a lost database: the heartbeat stops, and the worker shows as stale
            log.warning("could not mark this worker stopped in the registry", exc_info=True)
