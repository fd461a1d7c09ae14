"""The GPU path: the paged-attention kernel and the runner built on it.

On a machine with a GPU the kernel is compiled; elsewhere (CI) it runs under Triton's interpreter on
the CPU, which executes the same kernel code with numpy, so its indexing, masking and online softmax are
checked everywhere. The kernel is compared with dense attention in float64; the runner, in float32,
must give transformers' greedy tokens exactly, as the CPU path does.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.engine.helpers import ARCHITECTURES, random_prompts
from tests.engine.test_greedy_equivalence import MIXED_LENGTHS, assert_matches_reference
from worker.engine.kernels.paged_attention import LaunchShape, launch_shape, paged_attention
from worker.engine.types import SamplingParams

# tests/conftest.py turns Triton's interpreter on where there is no GPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dense_reference(query, key_cache, value_cache, block_tables, query_starts, query_lens, context_lens, scale,
                    page_size, value_dim):
    """Causal attention of each sequence's queries over its gathered context, in float64."""
    output = torch.zeros(query.shape[0], query.shape[1], value_dim, dtype=torch.float64)
    group = query.shape[1] // key_cache.shape[2]
    for sequence in range(len(query_starts)):
        start, length, context = int(query_starts[sequence]), int(query_lens[sequence]), int(context_lens[sequence])
        positions = torch.arange(context)
        blocks, slots = block_tables[sequence, positions // page_size].long(), positions % page_size
        keys = key_cache[blocks, slots].double().repeat_interleave(group, dim=1)
        values = (keys[..., :value_dim] if value_cache is None
                  else value_cache[blocks, slots].double().repeat_interleave(group, dim=1))
        scores = torch.einsum("qhd,khd->hqk", query[start : start + length].double(), keys) * scale
        query_positions = context - length + torch.arange(length)
        scores = scores.masked_fill(positions[None, None, :] > query_positions[None, :, None], float("-inf"))
        output[start : start + length] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return output


LAYOUTS = {
    # name: (heads, kv heads, key dims (a, b), value dim, MLA: values are the keys' prefix)
    "gqa": (12, 2, (64, 0), 64, False),
    "mha": (4, 4, (32, 0), 32, False),
    "gqa-odd-head-dim": (6, 2, (24, 0), 24, False),
    "mla": (16, 1, (64, 32), 64, True),
    "mla-narrow-rope": (16, 1, (16, 8), 16, True),
}
STEPS = {
    # name: (new tokens per sequence, context after the step per sequence)
    "decode": ([1, 1, 1], [5, 33, 100]),
    "prefill-and-cached-prefix": ([7, 40, 1, 20], [7, 50, 17, 20]),
}


# A group split across programs, as DeepSeek-V3's 128 MLA heads are: 16 heads in slices of 6 (6, 6, 4).
SPLIT_GROUP = LaunchShape(tokens=2, block_n=16, warps=4, stages=1, heads=6)
# Decode contexts split into 3 runs of 16-position tiles: the 5-position context leaves two runs empty, the
# 100-position one ends in a short run. (Prefill steps are never split: the same launch reads them whole.)
KV_SPLIT_LAUNCHES = {
    "mla-kv-split": ("mla", LaunchShape(tokens=1, block_n=16, warps=4, stages=1, kv_splits=3)),
    "gqa-kv-split": ("gqa", LaunchShape(tokens=2, block_n=16, warps=4, stages=1, kv_splits=3)),
}


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS) + ["mla-split-group"] + sorted(KV_SPLIT_LAUNCHES))
def test_kernel_matches_dense_attention(layout, step):
    launch = SPLIT_GROUP if layout == "mla-split-group" else None
    layout, launch = KV_SPLIT_LAUNCHES.get(layout, ("mla" if launch else layout, launch))
    heads, kv_heads, (dim_a, dim_b), value_dim, mla = LAYOUTS[layout]
    query_lens_list, context_lens_list = STEPS[step]
    generator = torch.Generator().manual_seed(zlib.crc32(f"{layout}/{step}".encode()))
    num_blocks, page_size, width = 64, 16, 8
    if mla:
        key_cache, value_cache = torch.randn(num_blocks, page_size, 1, dim_a + dim_b, generator=generator), None
    else:
        cache = torch.randn(num_blocks, page_size, 2, kv_heads, dim_a, generator=generator)
        key_cache, value_cache = cache[:, :, 0], cache[:, :, 1]
    block_tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:width] for _ in query_lens_list])
    query_lens = torch.tensor(query_lens_list, dtype=torch.int32)
    context_lens = torch.tensor(context_lens_list, dtype=torch.int32)
    query_starts = torch.cumsum(query_lens, 0, dtype=torch.int32) - query_lens
    query = torch.randn(int(query_lens.sum()), heads, dim_a + dim_b, generator=generator)
    output = torch.full((query.shape[0], heads, value_dim), float("nan"))
    scale = (dim_a + dim_b) ** -0.5
    on_device = [tensor.to(DEVICE) if tensor is not None else None for tensor in
                 (query, key_cache, value_cache, output, block_tables.int(), query_starts, query_lens, context_lens)]
    paged_attention(*on_device, max_query_len=max(query_lens_list), scale=scale, page_size=page_size,
                    dim_a=dim_a, value_dim=value_dim, launch=launch)
    result = on_device[3].cpu()
    expected = dense_reference(query, key_cache, value_cache, block_tables, query_starts, query_lens, context_lens,
                               scale, page_size, value_dim)
    assert not result.isnan().any(), "an output row was never written"
    assert ((result.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_deepseek_v3s_128_mla_heads_are_split_to_fit_one_program():
    decode, prefill = launch_shape(128, 512, is_decode=True), launch_shape(128, 512, is_decode=False)
    assert (decode.heads, decode.tokens, prefill.heads, prefill.tokens) == (64, 1, 64, 1)
    assert launch_shape(16, 512, is_decode=False) == LaunchShape(tokens=4, block_n=64, warps=8, stages=2, heads=16)


@pytest.mark.parametrize("model_name", ARCHITECTURES)
def test_paged_runner_matches_transformers(make_engine, model_name):
    """The whole GPU path (eager: graphs need a GPU), with chunked prefill and preemption in the mix."""
    engine = make_engine(model=model_name, use_paged_kernel=True, device=str(DEVICE), dtype="float32",
                         max_num_batched_tokens=32, num_kv_blocks=12, kv_block_size=8, use_cuda_graphs=False)
    prompts = random_prompts(MIXED_LENGTHS)
    completions = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert_matches_reference(model_name, prompts, completions, str(DEVICE))


def test_paged_runner_prefix_cache_hits_match_transformers(make_engine):
    engine = make_engine(model="tiny-deepseek-v3", use_paged_kernel=True, device=str(DEVICE), dtype="float32",
                         kv_block_size=8, num_kv_blocks=64)
    shared_prefix = random_prompts([35], seed=5)[0]
    engine.generate([shared_prefix + [7, 8, 9]], SamplingParams(max_tokens=4, ignore_eos=True))
    prompts = [shared_prefix + suffix for suffix in random_prompts([4, 11, 1], seed=6)]
    completions = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert engine.block_manager.prefix_cache_hit_blocks >= 4 * len(prompts)
    assert_matches_reference("tiny-deepseek-v3", prompts, completions, str(DEVICE))
