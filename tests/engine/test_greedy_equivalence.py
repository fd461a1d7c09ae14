"""Greedy outputs of the engine equal transformers' `generate`, token for token, on every architecture.

Each case runs several requests of mixed prompt lengths in one continuous batch; further cases force
chunked prefill, preemption by recompute (too few KV blocks) and prefix-cache hits.
"""

from __future__ import annotations

import time

import pytest

from tests.engine.helpers import ARCHITECTURES, random_prompts, reference_greedy, reference_model
from worker.engine.types import SamplingParams

MAX_NEW_TOKENS = 8
MIXED_LENGTHS = [3, 21, 40, 9, 17]


def assert_matches_reference(model_name: str, prompts: list[list[int]], completions, device: str = "cpu") -> None:
    """transformers' greedy tokens, from the same random weights drawn on the engine's device."""
    reference = reference_model(model_name, device=device)
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == reference_greedy(reference, prompt, len(completion.token_ids))
        assert completion.finish_reason == "length"
        assert completion.prompt_tokens == len(prompt)


@pytest.mark.parametrize("model_name", ARCHITECTURES)
def test_continuous_batch_matches_transformers(make_engine, model_name):
    engine = make_engine(model=model_name)
    prompts = random_prompts(MIXED_LENGTHS)
    completions = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    assert engine.stats()["batch_size"] == len(prompts)  # all ran in one batch
    assert all(len(c.token_ids) == MAX_NEW_TOKENS for c in completions)
    assert_matches_reference(model_name, prompts, completions)


def test_staggered_arrivals_mix_prefill_and_decode(make_engine):
    """Requests arriving while others decode join the running batch (prefill and decode in one step)."""
    engine = make_engine(model="tiny-deepseek-v3", max_wait_ms=0)
    prompts = random_prompts(MIXED_LENGTHS, seed=2)
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    futures = []
    for prompt in prompts:
        futures.append(engine.submit(prompt, sampling))
        time.sleep(0.01)  # later prompts arrive while earlier ones decode
    completions = [future.result() for future in futures]
    assert_matches_reference("tiny-deepseek-v3", prompts, completions)


def test_chunked_prefill_matches_transformers(make_engine):
    engine = make_engine(model="tiny-deepseek-v3", max_num_batched_tokens=8)
    prompts = random_prompts([30, 5, 19], seed=3)
    completions = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert_matches_reference("tiny-deepseek-v3", prompts, completions)


@pytest.mark.parametrize("model_name", ["tiny-deepseek-v3", "tiny-qwen2"])
def test_preemption_by_recompute_matches_transformers(make_engine, model_name):
    engine = make_engine(model=model_name, num_kv_blocks=6, kv_block_size=8)
    prompts = random_prompts([20, 14, 25, 9], seed=4)
    completions = engine.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert_matches_reference(model_name, prompts, completions)


@pytest.mark.parametrize("model_name", ["tiny-deepseek-v3", "tiny-llama"])
def test_prefix_cache_hits_match_transformers(make_engine, model_name):
    engine = make_engine(model=model_name, kv_block_size=8)
    shared_prefix = random_prompts([35], seed=5)[0]
    first = shared_prefix + [7, 8, 9]
    engine.generate([first], SamplingParams(max_tokens=4, ignore_eos=True))
    prompts = [shared_prefix + suffix for suffix in random_prompts([4, 11, 1], seed=6)]
    completions = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    # 35 shared tokens fill 4 blocks of 8, which each later prompt reuses.
    assert engine.block_manager.prefix_cache_hit_blocks >= 4 * len(prompts)
    assert_matches_reference(model_name, prompts, completions)
