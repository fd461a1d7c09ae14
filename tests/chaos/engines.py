"""Engines for the chaos tests, loaded by workers through DEEPBATCH_ENGINE=tests.chaos.engines:<factory>.

They wrap the real engine and misbehave on request: a prompt containing FAIL_TRANSIENTLY fails with a
transient error while the file named by DEEPBATCH_TEST_FAIL_MARKER exists; one containing KILL_WORKER
kills the worker process.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path

from worker.engine.engine import LLMEngine
from worker.engine.types import EngineConfig, SamplingParams, TransientEngineError

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
