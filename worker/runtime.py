"""What one worker process holds: its engine, its feeder and the maintenance thread, built once.

Built at Celery's `worker_init` (or by the first slice) because the engine owns the model and the KV
cache, and every slice's requests must land in the same continuous batch.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
from datetime import timedelta
from functools import partial

from schema.db import session_factory
from schema.settings import EngineSettings, FeederSettings, Settings, get_settings
from worker import metrics
from worker.app import publish_dead_letters, publish_groups, publish_slices, worker_app
from worker.circuit import EXIT_CIRCUIT_OPEN
from worker.engine.types import EngineConfig
from worker.feeder import Engine, Feeder
from worker.reconcile import Maintenance
from worker.transitions import Transitions


# EngineConfig's name of each engine setting named otherwise in Settings.
ENGINE_CONFIG_NAMES = {"cuda_graphs": "use_cuda_graphs"}


def engine_config(settings: Settings | EngineSettings) -> EngineConfig:
    """The settings given; the engine's own defaults (EngineConfig) for those left unset (None)."""
    given = engine_share(settings).model_dump(exclude={"engine"}, exclude_none=True)
    return EngineConfig(**{ENGINE_CONFIG_NAMES.get(name, name): value for name, value in given.items()})


def engine_share(settings: Settings | EngineSettings) -> EngineSettings:
    """The engine's share; a whole Settings is taken too (bench/system.py, the CLI's check)."""
    return EngineSettings.of(settings) if isinstance(settings, Settings) else settings


def build_engine(settings: EngineSettings) -> Engine:
    """`deepbatch`, `null` (benchmarks and tests only), or `package.module:factory` taking an EngineConfig."""
    config = engine_config(settings)
    if settings.engine == "deepbatch":
        from worker.engine.engine import build_engine as build_deepbatch_engine

        return build_deepbatch_engine(config)
    if settings.engine == "null":
        from worker.engine.null_engine import build_null_engine

        return build_null_engine(config)
    module_name, _, factory_name = settings.engine.partition(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    return factory(config)


class SettingError(ValueError):
    """An engine setting that cannot work; the message names the setting and its value."""


def check_engine_settings(settings: Settings | EngineSettings) -> None:
    """The engine's settings, checked in a second without loading anything big, so that a typo stops a
    worker (or `deepbatch run`) at once rather than in its first request."""
    import torch

    from worker.engine.device import resolve_device, resolve_dtype
    from worker.engine.loader import model_path

    settings = engine_share(settings)

    if settings.engine not in ("deepbatch", "null"):
        module_name, _, factory_name = settings.engine.partition(":")
        try:
            getattr(importlib.import_module(module_name), factory_name)
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


_feeder: Feeder | None = None
_maintenance: Maintenance | None = None
_lock = threading.Lock()


def get_feeder() -> Feeder:
    global _feeder, _maintenance
    with _lock:
        if _feeder is None:
            from worker.engine.tokenizer import PromptEncoder, load_tokenizer

            settings = get_settings()
            celery_app = worker_app()
            # No pre-ping: a round trip per transaction; a lost connection is retried (worker/retries.py).
            sessions = session_factory(settings.sqlalchemy_url, pool_size=(settings.worker_threads or 2) + 2,
                                       pre_ping=False)
            transitions = Transitions(sessions, worker_identity(), timedelta(seconds=settings.lease_s),
                                      settings.queue_name)
            encoder = PromptEncoder(load_tokenizer(settings.model))
            engine = build_engine(EngineSettings.of(settings))
            _feeder = Feeder(FeederSettings.of(settings), engine, encoder, transitions,
                             announce_dead=lambda letters: publish_dead_letters(celery_app, settings, letters),
                             republish=lambda ordinary, groups: (publish_slices(celery_app, ordinary,
                                                                                settings.slice_size),
                                                                 publish_groups(celery_app, groups)),
                             on_circuit_open=exit_for_supervisor)
            _maintenance = Maintenance(transitions, celery_app, settings, _feeder.held_request_ids,
                                       on_tick=partial(on_tick, _feeder))
            _maintenance.start()
            metrics.serve(settings.metrics_port)
        return _feeder


def on_tick(feeder: Feeder) -> None:
    feeder.judge_failures_alone()
    metrics.record_engine_stats(feeder.engine)


def exit_for_supervisor() -> None:
    """The circuit opened (worker/circuit.py) and what this worker held is given back: exit at once, with
    no warm shutdown, so that the broker redelivers the slices it holds (their unclaimed requests) to the
    other workers, and the supervisor restarts it."""
    logging.shutdown()
    os._exit(EXIT_CIRCUIT_OPEN)


def shutdown() -> None:
    if _maintenance is not None:
        _maintenance.stop()
    if _feeder is not None:
        _feeder.shutdown()
