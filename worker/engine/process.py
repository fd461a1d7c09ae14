"""An engine in a process of its own, so that the worker's Python never holds the GIL against its step loop.

Why: a worker's feeder, recorder, Celery consumer and maintenance threads each hold Python's GIL for moments;
the engine's step loop lets go of it around every torch call and must win it back, so each step on a GPU
grew by those moments (bench/system.py on an H200: 0.82–0.95 of the engine alone). Here the engine runs in
a child process with an interpreter of its own, and the worker speaks to it through one pipe: requests go
down as they are submitted, finished ones come up in batches. `EngineProcess` answers the engine's
interface (submit, submit_choices, shutdown, stats, max_batch_size), so the feeder does not know.

The child is spawned, not forked (CUDA forbids forking a process that has used it; a fresh interpreter is
the sure way). It ends when the worker does, however the worker died: a thread in it waits on a pipe only
the worker writes. The worker watches the child: a child that dies is a fatal engine error, reported once to
`on_fatal_error` with its exit (the worker then exits, and its requests run again elsewhere, as for a dead
tensor-parallel rank); every request it held fails with the same error.
"""

from __future__ import annotations

import atexit
import importlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from worker.engine.types import (
    FATAL_EXIT_CODE,
    EngineConfig,
    EngineError,
    SamplingParams,
    TransientEngineError,
    resolve_future,
)

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0  # how often the child sends its engine's stats() (read by the worker's metrics)
LOG_FORMAT = "[%(asctime)s: %(levelname)s/engine] %(message)s"  # beside Celery's lines in the worker's log


class EngineProcessError(EngineError):
    """The engine's process could not start, or died."""


def load_factory(path: str) -> Callable[[EngineConfig], Any]:
    """`package.module:function`, the engine factory the child calls."""
    module_name, _, name = path.partition(":")
    return getattr(importlib.import_module(module_name), name)


def engine_facts(engine: Any) -> dict[str, object]:
    """What an engine chose, for the worker's log and registry: architecture, max batch, KV-cache tokens (None
    for what an engine does not tell, as the null one). An EngineProcess answers its child's engine's."""
    facts = getattr(engine, "facts", None)
    if facts is not None:
        return dict(facts)
    hf_config = getattr(engine, "hf_config", None)
    architectures = getattr(hf_config, "architectures", None) or [getattr(hf_config, "model_type", None)]
    blocks = getattr(engine, "block_manager", None)
    return {"architecture": architectures[0], "max_batch_size": engine.max_batch_size,
            "kv_cache_tokens": blocks.num_blocks * blocks.block_size if blocks is not None else None}


def describe_exit(exit_code: int | None) -> str:
    from worker.engine.ranks import describe_exit as describe  # ranks.py imports torch: only once a child ended

    return describe(exit_code)


_running: weakref.WeakSet[EngineProcess] = weakref.WeakSet()


@atexit.register
def _shut_down_running() -> None:
    """multiprocessing joins a live child at exit: shut an engine nobody shut down first (this hook runs
    before multiprocessing's, registered earlier)."""
    for engine in list(_running):
        engine.shutdown()


class EngineProcess:
    """The worker's side: one child process running `factory(config)`; futures resolved from its replies."""

    def __init__(self, factory: str, config: EngineConfig,
                 on_fatal_error: Callable[[EngineError], None] | None = None):
        self.on_fatal_error = on_fatal_error
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        lifeline_end, self._lifeline = context.Pipe(duplex=False)  # never written: the child sees it close
        self._process = context.Process(
            target=serve_engine, args=(factory, config, child_end, lifeline_end, logging.getLogger().level),
            name="deepbatch-engine", daemon=False)  # not a daemon: a tensor-parallel engine starts ranks
        self._process.start()
        child_end.close()
        lifeline_end.close()
        self._futures: dict[int, Future] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()  # the futures and _stopping; never held while the pipe is written
        self._send_lock = threading.Lock()  # the pipe's write end
        self._stopping = False
        self._stats: dict[str, float] = {}
        try:
            self.facts = self._wait_until_ready()
        except BaseException:  # a failed start, or Ctrl-C during a long load: nothing is left behind
            self._end_process(timeout=10)
            raise
        self.max_batch_size = int(self.facts["max_batch_size"])
        self.pid = self._process.pid
        _running.add(self)
        self._reader = threading.Thread(target=self._read, name="deepbatch-engine-reader", daemon=True)
        self._reader.start()

    def _wait_until_ready(self) -> dict[str, object]:
        """The child's facts once its engine is built (a model may take minutes); its error if it fails."""
        multiprocessing.connection.wait([self._connection, self._process.sentinel])
        try:
            kind, payload = self._connection.recv()
        except (EOFError, OSError):
            self._process.join(timeout=5)
            raise EngineProcessError(f"the engine process (pid {self._process.pid}) exited before it was ready "
                                     f"({describe_exit(self._process.exitcode)}); its log above says why") from None
        if kind != "ready":
            raise EngineProcessError(f"the engine could not start: {payload}")
        return payload

    # ---- the engine's interface (any thread) ----

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Future:
        return self.submit_choices(prompt_token_ids, [sampling])[0]

    def submit_choices(self, prompt_token_ids: list[int], samplings: Sequence[SamplingParams]) -> list[Future]:
        futures = [Future() for _ in samplings]
        with self._lock:
            if self._stopping:
                raise TransientEngineError("the engine is shutting down")
            keys = [next(self._keys) for _ in samplings]
            self._futures.update(zip(keys, futures))
        try:
            self._send(("submit", (keys, prompt_token_ids, list(samplings))))
        except TransientEngineError:
            with self._lock:
                for key in keys:
                    self._futures.pop(key, None)
            raise
        for key, future in zip(keys, futures):
            future.add_done_callback(lambda future, key=key: future.cancelled() and self._cancel(key))
        return futures

    def _cancel(self, key: int) -> None:
        with self._lock:
            held = self._futures.pop(key, None) is not None and not self._stopping
        if held:
            try:
                self._send(("cancel", key))
            except TransientEngineError:
                pass  # the engine is gone: nothing left to cancel

    def _send(self, message: tuple) -> None:
        """A pipe the child no longer reads is a dead engine: the reader says so."""
        try:
            with self._send_lock:
                self._connection.send(message)
        except (OSError, ValueError) as error:
            raise TransientEngineError(f"the engine process is gone ({error})") from None

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def shutdown(self) -> None:
        """Asks the child to stop (its engine fails what it holds, and those answers come back), waits for
        it, then fails whatever is left. Idempotent. A child that does not answer is killed."""
        _running.discard(self)
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        if self._send_lock.acquire(timeout=10):  # else a send is stuck: the child no longer reads
            try:
                self._connection.send(("stop", None))
            except (OSError, ValueError):
                pass
            finally:
                self._send_lock.release()
        self._reader.join(timeout=60)
        self._end_process(timeout=10)
        self._fail_held(TransientEngineError("the engine shut down before the request finished"))

    def _end_process(self, timeout: float) -> None:
        self._process.join(timeout=timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._lifeline.close()

    # ---- the child's replies (the reader thread) ----

    def _read(self) -> None:
        try:
            while True:
                kind, payload = self._connection.recv()
                if kind == "done":
                    self._resolve(payload)
                elif kind == "stats":
                    self._stats = payload
                elif kind == "stopped":
                    return
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a reply this process cannot read: the engine is lost to it
            log.exception("the engine process sent a reply this process cannot read; ending it")
            self._process.kill()
        with self._lock:
            died, self._stopping = not self._stopping, True
        if died:
            self._died()

    def _resolve(self, finished: list[tuple[int, Any, BaseException | None]]) -> None:
        with self._lock:
            futures = [self._futures.pop(key, None) for key, _, _ in finished]
        for future, (_, result, error) in zip(futures, finished):
            if future is not None:
                resolve_future(future, result, error)

    def _died(self) -> None:
        """The child ended unasked: a fatal error for the owner, then for every request held."""
        self._process.join(timeout=5)
        for _ in range(50):  # a concurrent join (shutdown's) may be the one that reaps it
            if self._process.exitcode is not None:
                break
            time.sleep(0.1)
        error = EngineProcessError(f"the engine process (pid {self._process.pid}) died "
                                   f"({describe_exit(self._process.exitcode)}); the engine stops")
        log.critical("%s", error)
        try:
            if self.on_fatal_error is not None:
                self.on_fatal_error(error)
        finally:
            self._fail_held(error)

    def _fail_held(self, error: BaseException) -> None:
        with self._lock:
            held, self._futures = list(self._futures.values()), {}
        for future in held:
            resolve_future(future, error=error)


# ---- the child ----


def serve_engine(factory: str, config: EngineConfig, connection: multiprocessing.connection.Connection,
                 lifeline_end: multiprocessing.connection.Connection, log_level: int) -> None:
    """The child's life: build the engine, say it is ready, serve the worker's requests until told to stop."""
    from worker.engine.ranks import exit_when_parent_dies

    exit_when_parent_dies(lifeline_end)
    # Ctrl-C reaches the whole process group, and a service manager may send SIGTERM to every process of the
    # worker: the worker's warm shutdown decides when the engine stops (it finishes what the engine holds
    # first), so this process waits for its word, or for its end. A handler that does nothing, not SIG_IGN,
    # which the ranks' processes would inherit.
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: None)
    logging.basicConfig(level=log_level or logging.INFO, format=LOG_FORMAT)
    try:
        engine = load_factory(factory)(config)
    except BaseException as error:  # noqa: BLE001 - told to the worker, which refuses to start with it
        log.exception("the engine could not start")
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", engine_facts(engine)))
    EngineServer(engine, connection).serve()


class EngineServer:
    """The child's side of the pipe: submits into the engine; a sender thread returns what finished."""

    def __init__(self, engine: Any, connection: multiprocessing.connection.Connection):
        self.engine, self.connection = engine, connection
        self.futures: dict[int, Future] = {}
        self.finished: list[tuple[int, Future]] = []
        self.condition = threading.Condition()
        self.stopped = False
        self.sender = threading.Thread(target=self._send_finished, name="deepbatch-engine-sender", daemon=True)
        self.sender.start()

    def serve(self) -> None:
        while True:
            try:
                kind, payload = self.connection.recv()
            except (EOFError, OSError):
                os._exit(1)  # the worker is gone
            if kind == "submit":
                self._submit(*payload)
            elif kind == "cancel":
                future = self.futures.get(payload)
                if future is not None:
                    future.cancel()
            elif kind == "stop":
                break
        self.engine.shutdown()  # fails what it holds: those answers go back too
        with self.condition:
            self.stopped = True
            self.condition.notify_all()
        self.sender.join()
        self.connection.send(("stopped", None))

    def _submit(self, keys: list[int], prompt_token_ids: list[int], samplings: list[SamplingParams]) -> None:
        try:
            submit_choices = getattr(self.engine, "submit_choices", None)
            if submit_choices is not None:
                futures = list(submit_choices(prompt_token_ids, samplings))
            else:
                futures = [self.engine.submit(prompt_token_ids, sampling) for sampling in samplings]
        except BaseException as error:  # noqa: BLE001 - the request's answer, as the engine in-process raises it
            futures = [Future() for _ in keys]
            for future in futures:
                future.set_exception(error)
        for key, future in zip(keys, futures):
            self.futures[key] = future
            future.add_done_callback(lambda future, key=key: self._on_done(key, future))

    def _on_done(self, key: int, future: Future) -> None:
        """Runs on the engine's step loop: queue it and return."""
        with self.condition:
            self.finished.append((key, future))
            self.condition.notify_all()

    def _send_finished(self) -> None:
        """Sends what finished as one message per wake-up (a step's worth at most), and the stats each second.
        Should sending ever fail, the process ends, which the worker reports (a silent thread would leave its
        requests waiting forever)."""
        try:
            self._send_until_stopped()
        except BaseException:  # noqa: BLE001
            log.exception("the engine process cannot send its answers; it ends")
            os._exit(FATAL_EXIT_CODE)

    def _send_until_stopped(self) -> None:
        stats_sent = 0.0
        while True:
            with self.condition:
                self.condition.wait_for(lambda: self.finished or self.stopped, timeout=STATS_INTERVAL_S)
                finished, self.finished = self.finished, []
                stopped = self.stopped
            if finished:
                self._send_answers([answer(key, future) for key, future in finished])
                for key, _ in finished:
                    self.futures.pop(key, None)
            if time.monotonic() - stats_sent >= STATS_INTERVAL_S:
                self._send_stats()
                stats_sent = time.monotonic()
            if stopped and not finished:
                return

    def _send_answers(self, answers: list[tuple[int, Any, BaseException | None]]) -> None:
        """One message; should a result not pickle (an engine plugged in may return anything), each answer
        alone, the ones that do not pickle as errors (a message that fails to pickle writes nothing)."""
        try:
            self.connection.send(("done", answers))
        except (pickle.PicklingError, TypeError, AttributeError):
            self.connection.send(("done", [pickled_or_error(one) for one in answers]))

    def _send_stats(self) -> None:
        stats = getattr(self.engine, "stats", None)
        if stats is None:
            return
        try:
            values = stats()
        except Exception:  # noqa: BLE001 - stats are for the metrics; the answers matter
            log.warning("the engine's stats() failed", exc_info=True)
            return
        self.connection.send(("stats", values))


def pickled_or_error(one: tuple[int, Any, BaseException | None]) -> tuple[int, Any, BaseException | None]:
    try:
        pickle.dumps(one)
    except Exception as error:  # noqa: BLE001
        key, result, _ = one
        return key, None, TransientEngineError(f"the engine's answer cannot be sent to the worker "
                                               f"({type(result).__name__}: {error})")
    return one


def answer(key: int, future: Future) -> tuple[int, Any, BaseException | None]:
    """(key, result, error) for the worker; an error that would not arrive intact goes as its text."""
    if future.cancelled():
        return key, None, TransientEngineError("cancelled")
    error = future.exception()
    if error is None:
        return key, future.result(), None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - a class the worker could not rebuild
        error = RuntimeError(f"{type(error).__name__}: {error}")
    return key, None, error
