"""The transformers reference engine: dynamic batches, checkpoint directories, typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.engine.configs import tiny_deepseek_v3_config
from worker.engine.reference import ReferenceEngine
from worker.engine.types import EngineConfig, PromptTooLongError, SamplingParams


@pytest.fixture(scope="module")
def engine():
    engine = ReferenceEngine(EngineConfig(model="tiny-deepseek-v3", max_model_len=64, max_wait_ms=50))
    yield engine
    engine.shutdown()


def test_concurrent_greedy_requests_match_one_at_a_time(engine: ReferenceEngine) -> None:
    prompts = [engine.encoder.encode_prompt(f"Prompt number {i} " * (i + 1)) for i in range(4)]
    sampling = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    together = [future.result() for future in [engine.submit(prompt, sampling) for prompt in prompts]]
    alone = [engine.submit(prompt, sampling).result() for prompt in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert all(c.completion_tokens == 5 and c.finish_reason == "length" for c in together)


def test_a_prompt_over_the_context_fails_permanently_without_blocking_others(engine: ReferenceEngine) -> None:
    too_long = engine.submit(list(range(2, 80)), SamplingParams(max_tokens=2))
    fine = engine.submit([0, 5, 6], SamplingParams(max_tokens=2, temperature=0))
    with pytest.raises(PromptTooLongError, match="max_model_len is 64"):
        too_long.result()
    assert fine.result().completion_tokens <= 2


def test_loads_a_checkpoint_directory(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_deepseek_v3_config())
    model.save_pretrained(tmp_path)
    engine = ReferenceEngine(EngineConfig(model=str(tmp_path)))
    try:
        loaded = dict(engine.model.named_parameters())
        for name, parameter in model.named_parameters():
            assert torch.equal(loaded[name], parameter), name
    finally:
        engine.shutdown()


def test_out_of_memory_splits_the_batch_until_it_fits(engine: ReferenceEngine, monkeypatch) -> None:
    real_generate, sizes = engine._generate, []

    def generate_up_to_two(group):
        sizes.append(len(group))
        if len(group) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(group)

    monkeypatch.setattr(engine, "_generate", generate_up_to_two)
    sampling = SamplingParams(max_tokens=2, temperature=0)
    futures = [engine.submit([0, 100 + i], sampling) for i in range(5)]
    assert all(future.result().completion_tokens == 2 for future in futures)
    assert any(size > 2 for size in sizes), sizes  # a batch ran out of memory and was split
