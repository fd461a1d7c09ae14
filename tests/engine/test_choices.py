"""Several choices of one prompt (OpenAI's `n`, LLMEngine.submit_choices): the prompt is prefilled once — the
other choices reuse its blocks through the prefix cache and compute only its last, partial block — and each
choice samples on its own: a seeded choice gives what the same request alone gives."""

from __future__ import annotations

from dataclasses import replace

from tests.engine.helpers import random_prompts
from worker.engine.types import SamplingParams

BLOCK = 16


def test_choices_prefill_the_prompt_once_and_sample_independently(make_engine):
    engine = make_engine(model="tiny-deepseek-v3", kv_block_size=BLOCK)
    prompt = random_prompts([100], seed=5)[0]
    sampled = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    samplings = [replace(sampled, seed=40 + index) for index in range(4)]
    before = engine.stats()["prompt_tokens_computed"]
    futures = engine.submit_choices(prompt, samplings)
    choices = [future.result(timeout=120) for future in futures]
    computed = engine.stats()["prompt_tokens_computed"] - before
    assert computed == 100 + 3 * (100 - 96)  # once, then each other choice's last partial block
    assert all(choice.prompt_tokens == 100 and choice.completion_tokens == 6 for choice in choices)
    assert len({tuple(choice.token_ids) for choice in choices}) > 1  # sampled on their own

    other = random_prompts([9], seed=6)[0]  # a fresh prompt: nothing of it cached
    alone = [engine.generate([other], sampling)[0].token_ids for sampling in samplings]
    together = [future.result(timeout=120).token_ids for future in engine.submit_choices(other, samplings)]
    assert together == alone


def test_a_choices_problem_fails_every_choice(make_engine):
    engine = make_engine(model="tiny-deepseek-v3")
    futures = engine.submit_choices([10**7], [SamplingParams(max_tokens=2)] * 3)
    assert all(future.exception(timeout=30) is not None for future in futures)
