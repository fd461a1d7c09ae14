"""Engines whose outputs hold what PostgreSQL's text cannot: loaded by workers through
DEEPBATCH_ENGINE=tests.integration.odd_engines:<class> (the worker runs from the repository root).

Both answer at once, like the `null` engine they extend, so the pipeline alone is exercised:
`OddOutputEngine` cycles through ODD_OUTPUTS (NUL, lone surrogates, the escape character, ...) for
tests/integration/test_unstorable_outputs.py; `NulEngine` puts a NUL in one output of every
NUL_EVERY for bench/nul_outputs.py (`NUL_EVERY=0` in the environment: never, the baseline).
`UnsendableEngine`, for an engine in a process of its own (tests/engine/test_engine_process.py), answers a
prompt that starts with UNSENDABLE_TOKEN with a result no pickle can carry, and its stats() fails.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import Future

from worker.engine.null_engine import NullEngine
from worker.engine.types import Completion, EngineConfig, SamplingParams

ODD_OUTPUTS = (
    "nul \x00 inside", "\x00", "\x00\x00 twice", "lone high \ud800", "\udfff lone low", "pair split \ud83d\ude00",
    "escape \uffff0000 look-alike", "\uffff", "replacement \ufffd kept", "json \\u0000 literal",
    "tab\tnew\nline\r", "emoji 😀 and é", "plain",
)


class OneAfterAnother(NullEngine):
    """A NullEngine whose n-th answer (in submission order) has the text `text_for(n)`."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.counter, self.counter_lock = itertools.count(), threading.Lock()

    def text_for(self, number: int, filler: str) -> str:
        raise NotImplementedError

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Future:
        completion = super().submit(prompt_token_ids, sampling).result()
        with self.counter_lock:
            number = next(self.counter)
        future: Future = Future()
        future.set_result(Completion(completion.token_ids, self.text_for(number, completion.text),
                                     completion.finish_reason, completion.prompt_tokens))
        return future


class OddOutputEngine(OneAfterAnother):
    def text_for(self, number: int, filler: str) -> str:
        return ODD_OUTPUTS[number % len(ODD_OUTPUTS)]


class NulEngine(OneAfterAnother):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.nul_every = int(os.environ.get("NUL_EVERY", "25"))

    def text_for(self, number: int, filler: str) -> str:
        if self.nul_every and number % self.nul_every == 0:
            return filler[:-1] + "\x00"
        return filler


UNSENDABLE_TOKEN = 13


class UnsendableEngine(NullEngine):
    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Future:
        future = super().submit(prompt_token_ids, sampling)
        if prompt_token_ids[0] == UNSENDABLE_TOKEN:
            future.result().logprobs = threading.Lock()  # what a buggy engine might hand back
        return future

    def stats(self) -> dict[str, float]:
        raise RuntimeError("stats are broken")
