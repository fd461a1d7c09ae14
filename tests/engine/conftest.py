"""Fixtures of the engine tests: the DeepSeek tokenizer and engines that shut down after the test.

The reference is transformers' own model built by `from_config` under the same seed the engine's
loader uses, so both run identical weights; greedy decoding in float32 must then agree token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import triton.runtime.interpreter as triton_interpreter

from worker.engine.engine import LLMEngine
from worker.engine.tokenizer import load_tokenizer
from worker.engine.types import EngineConfig


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("tiny-deepseek-v3")


@pytest.fixture
def make_engine(tokenizer) -> Iterator[Callable[..., LLMEngine]]:
    """Builds engines from EngineConfig fields (small max_wait_ms) and shuts them all down afterwards."""
    engines: list[LLMEngine] = []

    def build(**fields) -> LLMEngine:
        fields.setdefault("max_wait_ms", 50.0)
        engine = LLMEngine(EngineConfig(**fields), tokenizer=tokenizer)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.shutdown()


@pytest.fixture(autouse=True)
def interpreter_scalars(monkeypatch):
    """Triton's interpreter keeps scalars as one-element arrays and turns them into loop bounds with
    int(), which numpy 2 refuses for arrays of one dimension; take the element instead."""
    original = triton_interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(triton_interpreter, "_patch_lang_tensor", patched)
