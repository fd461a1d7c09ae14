"""Decode steps replayed from CUDA graphs compute what the eager path computes. Needs a GPU: CI has none,
so these run on a GPU machine (README: Tests; the figures are in the engine benchmark's notes)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import random_prompts
from tests.engine.test_greedy_equivalence import MIXED_LENGTHS, assert_matches_reference
from worker.engine.block_manager import BlockManager, PrefixMatch
from worker.engine.gpu_runner import GpuModelRunner
from worker.engine.loader import load_model
from worker.engine.scheduler import ScheduledSequence
from worker.engine.sequence import Sequence
from worker.engine.types import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("model_name", ["tiny-qwen2", "tiny-llama"])
def test_graph_decode_matches_transformers_in_float32(make_engine, model_name):
    engine = make_engine(model=model_name, device="cuda", dtype="float32", max_batch_size=8, num_kv_blocks=256)
    assert engine.runner.graphs, "no graphs were captured"
    prompts = random_prompts(MIXED_LENGTHS + [30, 2, 11])  # 8 prompts: the graph of 8, then smaller ones
    completions = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert_matches_reference(model_name, prompts, completions, "cuda")


@pytest.mark.parametrize("model_name", ["tiny-deepseek-v3", "tiny-deepseek-v2"])
def test_graph_decode_logits_match_the_eager_step_in_bfloat16(model_name):
    """MoE models capture only in bfloat16 (grouped GEMM), where transformers is no exact oracle: the same
    decode step, replayed and run eagerly, must agree to bfloat16 rounding."""
    device, dtype, block_size = torch.device("cuda"), torch.bfloat16, 16
    model, _ = load_model(model_name, seed=0, device=device, dtype=dtype)
    block_manager = BlockManager(num_blocks=64, block_size=block_size)
    runner = GpuModelRunner(model, block_size, 64, device, dtype, max_batch_size=16, max_model_len=256)
    assert runner.graphs, "no graphs were captured"
    sequences = [Sequence(prompt, SamplingParams()) for prompt in random_prompts([6, 21, 13], seed=3)]
    prefill = []
    for sequence in sequences:
        block_manager.admit(sequence, PrefixMatch(), len(sequence.token_ids) + 1)  # room for one more token
        prefill.append(ScheduledSequence(sequence, len(sequence.token_ids)))
    runner.execute(prefill)
    for item in prefill:
        item.sequence.num_computed_tokens += item.num_new_tokens
        item.sequence.token_ids.append(7)  # the token to decode next
    decode = [ScheduledSequence(sequence, 1) for sequence in sequences]
    with torch.inference_mode():
        eager = runner.sampled_logits(runner.prepare_batch(decode)).float()
        replayed = runner._replay(sequences, runner._graph_size_for(decode), None).float()
    assert replayed.shape == eager.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(replayed, eager, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("model_name", ["tiny-qwen2", "tiny-deepseek-v3"])
def test_overlapped_replayed_steps_give_the_tokens_of_steps_run_one_at_a_time(make_engine, model_name):
    """Replayed decode steps launched ahead of their reads take their input tokens on the device (written into
    the graph's captured inputs): the outputs equal those of steps waited for one at a time, with sequences
    finishing mid-run so that the replayed graph's size changes between steps."""
    engine = make_engine(model=model_name, device="cuda", dtype="bfloat16", max_batch_size=8, num_kv_blocks=256,
                         enable_prefix_caching=False)
    assert engine.runner.graphs, "no graphs were captured"
    assert engine._overlap_steps, "the warm-up's check turned overlapped steps off"
    prompts = random_prompts([5, 9, 3, 12, 7, 20, 4, 15])
    samplings = [SamplingParams(max_tokens=length, ignore_eos=True) for length in (8, 3, 12, 1, 16, 6, 20, 10)]
    launches = []
    original_launch = engine.runner.launch
    engine.runner.launch = lambda scheduled, previous: launches.append(previous) or original_launch(scheduled, previous)
    overlapped = engine.generate(prompts, samplings)
    assert sum(previous is not None for previous in launches) > 5
    engine._overlap_steps = False
    assert engine.generate(prompts, samplings) == overlapped
