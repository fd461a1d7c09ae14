"""The `null` engine: a benchmarking and testing aid only — it answers every request at once, no model.

Each request completes immediately with exactly `max_tokens` tokens, so a worker running it measures the
queue and database path alone (`DEEPBATCH_ENGINE=null`, bench/pipeline.py). Its answers are filler.
"""

from __future__ import annotations

from concurrent.futures import Future

from worker.engine.types import CPU_BATCH, Completion, EngineConfig, SamplingParams

FILLER_TOKEN_ID = 0


class NullEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.max_batch_size = config.max_batch_size or CPU_BATCH  # answers at once: only the feeder's depth reads it

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Future:
        future: Future = Future()
        future.set_result(Completion(token_ids=[FILLER_TOKEN_ID] * sampling.max_tokens,
                                     text="null " * sampling.max_tokens, finish_reason="length",
                                     prompt_tokens=len(prompt_token_ids)))
        return future

    def shutdown(self) -> None:
        pass


def build_null_engine(config: EngineConfig) -> NullEngine:
    return NullEngine(config)
