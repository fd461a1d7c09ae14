"""What one worker process holds, and what it does with one request.

Built once per process (Celery's `worker_init`, or lazily by the first task) because the engine owns
the model and the KV cache, and every thread's requests must land in the same continuous batch.
`process()` is the request's life in this worker: claim, generate, record — retrying transient errors
with exponential backoff and jitter in the same thread, so no broker-side delay is needed.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy.exc import DBAPIError

from schema.db import session_factory
from schema.lines import CHAT_URL
from schema.settings import Settings, get_settings
from worker import metrics
from worker.app import celery_app, publish_dead_letters
from worker.engine.types import Completion, EngineConfig, PermanentEngineError, SamplingParams, TransientEngineError
from worker.isolation import IsolationLock
from worker.reconcile import Maintenance
from worker.store import ClaimedRequest, DeadRequest, RequestStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine(Protocol):
    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Any: ...
    def shutdown(self) -> None: ...


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        model=settings.model, device=settings.device, dtype=settings.dtype, seed=settings.seed,
        max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
        max_num_batched_tokens=settings.max_num_batched_tokens, max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization, use_cuda_graphs=settings.cuda_graphs,
    )


def build_engine(settings: Settings) -> Engine:
    """`deepbatch`, or `package.module:factory` — a callable taking an EngineConfig."""
    config = engine_config(settings)
    if settings.engine == "deepbatch":
        from worker.engine.engine import build_engine as build_deepbatch_engine

        return build_deepbatch_engine(config)
    module_name, _, factory_name = settings.engine.partition(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    return factory(config)


def sampling_from_body(body: dict[str, Any], default_max_tokens: int) -> SamplingParams:
    """OpenAI defaults: temperature 1 and top_p 1 unless the request says otherwise."""
    stop = body.get("stop") or []
    return SamplingParams(
        max_tokens=body.get("max_tokens") or body.get("max_completion_tokens") or default_max_tokens,
        temperature=body.get("temperature", 1.0),
        top_p=body.get("top_p", 1.0),
        top_k=body.get("top_k", 0),
        seed=body.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base × 2^(attempt-1))]."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def is_connection_loss(error: DBAPIError) -> bool:
    return error.connection_invalidated or "connection" in str(error.orig).lower()


def with_database_retry(operation: Callable[[], T], settings: Settings) -> T:
    """Run a store operation, waiting out a lost database connection (a Postgres restart) with backoff."""
    deadline = time.monotonic() + settings.database_retry_s
    attempt = 0
    while True:
        try:
            return operation()
        except DBAPIError as error:
            attempt += 1
            if not is_connection_loss(error) or time.monotonic() > deadline:
                raise
            delay = backoff_seconds(attempt, 0.5, 10.0)
            log.warning("database unavailable (%s); retrying in %.1fs", type(error.orig).__name__, delay)
            time.sleep(delay)


@dataclass
class WorkerRuntime:
    settings: Settings
    engine: Engine
    encoder: Any  # worker.engine.tokenizer.PromptEncoder
    store: RequestStore
    worker_id: str
    in_flight: set[int] = field(default_factory=set)
    in_flight_lock: threading.Lock = field(default_factory=threading.Lock)
    isolation: IsolationLock = field(default_factory=IsolationLock)

    def prompt_token_ids(self, claim: ClaimedRequest) -> list[int]:
        if claim.url == CHAT_URL:
            return self.encoder.encode_chat(claim.body["messages"])
        return self.encoder.encode_prompt(claim.body["prompt"])

    def generate(self, claim: ClaimedRequest) -> Completion:
        sampling = sampling_from_body(claim.body, self.settings.default_max_tokens)
        return self.engine.submit(self.prompt_token_ids(claim), sampling).result()

    def running_request_ids(self) -> list[int]:
        with self.in_flight_lock:
            return list(self.in_flight)

    def _db(self, operation: Callable[[], T]) -> T:
        return with_database_retry(operation, self.settings)

    def process(self, message_request_id: int) -> str:
        """Run one request for this message; returns what became of it.

        Ordinarily the most urgent queued request is claimed (priority); the message's own request is
        claimed by id when its worker died (then it runs alone) and when it is being retried here.
        """
        suspect = self._db(lambda: self.store.lost_a_worker(message_request_id))
        request_id: int | None = message_request_id if suspect else None
        while True:
            with self.isolation.alone() if suspect else self.isolation.shared():
                outcome, claim = self._claim_and_attempt(request_id)
            if outcome != "retry" or claim is None:
                return outcome
            request_id = claim.id  # a retried request has no message of its own: this thread keeps it
            time.sleep(backoff_seconds(claim.attempt, self.settings.retry_backoff_s,
                                       self.settings.retry_backoff_max_s))

    def _claim_and_attempt(self, request_id: int | None) -> tuple[str, ClaimedRequest | None]:
        """Claim `request_id`, or the most urgent queued request when None, and run one attempt."""
        claim = self._db(lambda: self.store.claim(request_id) if request_id else self.store.claim_next())
        if claim is None:
            metrics.requests_finished.labels("skipped").inc()
            return "skipped", None  # nothing queued (a duplicate message), or a live worker holds it
        if isinstance(claim, DeadRequest):  # its worker died during its last attempt: a poison request
            self._announce_dead(claim)
            metrics.requests_finished.labels("dead").inc()
            return "dead", None
        if claim.attempt == 1:
            metrics.queue_wait.observe(claim.queued_seconds)
        with self.in_flight_lock:
            self.in_flight.add(claim.id)
        metrics.in_flight.inc()
        started = time.monotonic()
        try:
            outcome = self._attempt(claim)
        finally:
            metrics.in_flight.dec()
            with self.in_flight_lock:
                self.in_flight.discard(claim.id)
        metrics.request_latency.observe(time.monotonic() - started)
        if outcome != "retry":  # retries have their own counter
            metrics.requests_finished.labels(outcome).inc()
        return outcome, claim

    def _attempt(self, claim: ClaimedRequest) -> str:
        cached = self._db(lambda: self.store.cached_result(claim.cache_key)) if claim.cache_key else None
        if cached is not None:
            source, completion = cached
            self._db(lambda: self.store.succeed(claim, completion, self.settings.model, cached_from=source))
            metrics.cache_hits.inc()
            return "succeeded"
        try:
            completion = self.generate(claim)
        except PermanentEngineError as error:
            code, message = type(error).__name__, f"line {claim.line_no}: {error}"
            self._db(lambda: self.store.fail(claim, code, message))
            return "failed"
        except Exception as error:  # noqa: BLE001 - transient or unknown: retried, then dead-lettered
            code = type(error).__name__ if isinstance(error, TransientEngineError) else "internal_error"
            log.warning("request %s attempt %s failed: %r", claim.id, claim.attempt, error)
            return self._transient(claim, code, f"{type(error).__name__}: {error}")
        self._db(lambda: self.store.succeed(claim, completion, self.settings.model))
        metrics.generated_tokens.inc(completion.completion_tokens)
        metrics.prompt_tokens.inc(completion.prompt_tokens)
        return "succeeded"

    def _transient(self, claim: ClaimedRequest, code: str, message: str) -> str:
        state = self._db(lambda: self.store.retry_or_dead_letter(claim, code, message))
        if state is None:
            return "lost"  # another worker took the request over
        if state.value == "queued":
            metrics.retries.inc()
            return "retry"
        self._announce_dead(DeadRequest(claim.id, claim.job_id, claim.attempt, f"{code}: {message}"))
        return "dead"

    def _announce_dead(self, letter: DeadRequest) -> None:
        """Counts a request this worker dead-lettered and copies it to the broker's dead-letter queue."""
        metrics.dead_letters.inc()
        publish_dead_letters(celery_app, self.settings, [asdict(letter)])


_runtime: WorkerRuntime | None = None
_maintenance: Maintenance | None = None
_runtime_lock = threading.Lock()


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def get_runtime() -> WorkerRuntime:
    global _runtime, _maintenance
    with _runtime_lock:
        if _runtime is None:
            from worker.engine.tokenizer import PromptEncoder, load_tokenizer

            settings = get_settings()
            sessions = session_factory(settings.sqlalchemy_url, pool_size=min(settings.worker_threads or 10, 20))
            worker_id = worker_identity()
            store = RequestStore(sessions, worker_id, timedelta(seconds=settings.lease_s), settings.queue_name)
            encoder = PromptEncoder(load_tokenizer(settings.model))
            _runtime = WorkerRuntime(settings, build_engine(settings), encoder, store, worker_id)
            _maintenance = Maintenance(store, celery_app, settings, _runtime.running_request_ids,
                                       on_tick=lambda: metrics.record_engine_stats(_runtime.engine))
            _maintenance.start()
            metrics.serve(settings.metrics_port)
        return _runtime


def shutdown_runtime() -> None:
    if _maintenance is not None:
        _maintenance.stop()
    if _runtime is not None:
        _runtime.engine.shutdown()
