"""Engines for the chaos tests, loaded by workers through DEEPBATCH_ENGINE=tests.chaos.engines:<factory>.

They wrap the real engine and misbehave on request: a prompt containing FAIL_TRANSIENTLY fails with a
transient error while the file named by DEEPBATCH_TEST_FAIL_MARKER exists; one containing KILL_WORKER
kills the worker process. The slow batching engine has no model at all, so that rates are cheap to measure.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

from worker.engine.engine import LLMEngine
from worker.engine.types import Completion, EngineConfig, SamplingParams, TransientEngineError

FAIL_TRANSIENTLY = "FAIL_TRANSIENTLY"


class FlakyEngine(LLMEngine):
    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Future:
        marker = os.environ.get("DEEPBATCH_TEST_FAIL_MARKER")
        if marker and Path(marker).exists() and FAIL_TRANSIENTLY in self.tokenizer.decode(prompt_token_ids):
            future: Future = Future()
            future.set_exception(TransientEngineError("injected: CUDA out of memory"))
            return future
        return super().submit(prompt_token_ids, sampling)


def flaky_engine(config: EngineConfig) -> FlakyEngine:
    return FlakyEngine(config)


class PoisonEngine(LLMEngine):
    """A prompt containing KILL_WORKER takes the whole worker process down, as a segfaulting kernel would."""

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Future:
        if "KILL_WORKER" in self.tokenizer.decode(prompt_token_ids):
            os._exit(137)
        return super().submit(prompt_token_ids, sampling)


def poison_engine(config: EngineConfig) -> PoisonEngine:
    return PoisonEngine(config)


def broken_at_start(config: EngineConfig) -> LLMEngine:
    """An engine that cannot start, as one whose GPU has failed: the worker must exit, saying why."""
    raise RuntimeError("injected: no usable GPU (Xid 79)")


class SlowBatchEngine:
    """A batching engine without a model, slow on purpose and cheap on the CPU: every `DEEPBATCH_TEST_STEP_S`
    it finishes the oldest `max_batch_size` requests waiting, as an engine whose requests each take one
    step. Rates through the worker are then the engine's, known in advance (batch size ÷ step)."""

    def __init__(self, config: EngineConfig):
        self.max_batch_size = config.max_batch_size
        self.step_s = float(os.environ.get("DEEPBATCH_TEST_STEP_S", "0.5"))
        self.waiting: deque[tuple[Future, int, int]] = deque()
        self.condition = threading.Condition()
        self.stopped = False
        threading.Thread(target=self._run, name="slow-engine", daemon=True).start()

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Future:
        future: Future = Future()
        with self.condition:
            self.waiting.append((future, len(prompt_token_ids), sampling.max_tokens))
            self.condition.notify()
        return future

    def _run(self) -> None:
        while True:
            with self.condition:
                self.condition.wait_for(lambda: self.waiting or self.stopped)
                if self.stopped:
                    return
                batch = [self.waiting.popleft() for _ in range(min(self.max_batch_size, len(self.waiting)))]
            time.sleep(self.step_s)
            for future, prompt_tokens, max_tokens in batch:
                future.set_result(Completion([1] * max_tokens, "ok", "length", prompt_tokens))

    def shutdown(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()


def slow_engine(config: EngineConfig) -> SlowBatchEngine:
    return SlowBatchEngine(config)


class BrokenDeviceEngine:
    """A GPU gone bad: every request fails at once, with the error an illegal memory access leaves behind."""

    def __init__(self, config: EngineConfig):
        self.max_batch_size = config.max_batch_size

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Future:
        future: Future = Future()
        future.set_exception(RuntimeError("CUDA error: an illegal memory access was encountered"))
        return future

    def shutdown(self) -> None:
        pass


def broken_device_engine(config: EngineConfig) -> BrokenDeviceEngine:
    return BrokenDeviceEngine(config)
