"""The inference engine: pure torch, no Celery, no SQL.

`build_engine(config)` returns an object with `submit(prompt_token_ids, sampling) -> Future[Completion]`
and `shutdown()`; everything the worker needs from the engine goes through that narrow interface.
"""

from worker.engine.types import (
    Completion,
    EngineConfig,
    EngineError,
    PermanentEngineError,
    PromptTooLongError,
    SamplingParams,
    TransientEngineError,
)

__all__ = [
    "Completion",
    "EngineConfig",
    "EngineError",
    "PermanentEngineError",
    "PromptTooLongError",
    "SamplingParams",
    "TransientEngineError",
]
