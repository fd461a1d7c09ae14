"""Triton kernels around the routed experts' grouped GEMM: sorting token-expert pairs by expert, and adding
each token's weighted expert outputs back together.

Why: in a decode step of the DeepSeek-V2-Lite shape at batch 512 the torch ops around the grouped GEMM cost
about 3 ms of 23.7 (bench/results/decode-profile-cuda-shape-deepseek-v2-lite-b512.json): the radix argsort
of the pairs (0.87 ms over the 26 MoE layers), the float32 product of the expert outputs with their weights
and its cast back (0.9 ms), and index_add_'s scattered adds (1.2 ms). Two kernels replace them. Both have
fixed launch shapes, so CUDA graphs hold them.

Used for 16-bit activations on the GPU; the CPU keeps the torch ops (worker/engine/layers/moe.py), which
tests compare these kernels with under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SORT_BLOCK = 1024


@triton.jit
def _sort_pairs_kernel(expert_ids, sorted_position, token_of_row, rows_per_expert, num_pairs, top_k,
                       BLOCK: tl.constexpr):
    # One program per expert. Its rows start after every pair routed to a lower expert, so no program
    # waits for another's count: a stable counting sort in one launch.
    expert = tl.program_id(0)
    first_row = 0
    for start in range(0, num_pairs, BLOCK):
        pairs = start + tl.arange(0, BLOCK)
        ids = tl.load(expert_ids + pairs, mask=pairs < num_pairs, other=expert)
        first_row += tl.sum((ids < expert).to(tl.int32), axis=0)
    placed = 0
    for start in range(0, num_pairs, BLOCK):
        pairs = start + tl.arange(0, BLOCK)
        ids = tl.load(expert_ids + pairs, mask=pairs < num_pairs, other=-1)
        mine = ids == expert
        position = first_row + placed + tl.cumsum(mine.to(tl.int32), axis=0) - 1
        tl.store(sorted_position + pairs, position, mask=mine)
        tl.store(token_of_row + position, pairs // top_k, mask=mine)
        placed += tl.sum(mine.to(tl.int32), axis=0)
    tl.store(rows_per_expert + expert, placed)


def sort_pairs_by_expert(expert_ids: torch.Tensor,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-expert pairs (expert_ids [tokens, top_k], each id < num_experts) as rows sorted by expert,
    stable: (sorted_position [tokens * top_k]: the row of each pair, token_of_row [tokens * top_k],
    rows_per_expert [num_experts]), all int64."""
    flat_ids = expert_ids.reshape(-1).contiguous()
    num_pairs = flat_ids.numel()
    sorted_position = torch.empty(num_pairs, dtype=torch.int64, device=flat_ids.device)
    token_of_row = torch.empty(num_pairs, dtype=torch.int64, device=flat_ids.device)
    rows_per_expert = torch.empty(num_experts, dtype=torch.int64, device=flat_ids.device)
    _sort_pairs_kernel[(num_experts,)](flat_ids, sorted_position, token_of_row, rows_per_expert, num_pairs,
                                      expert_ids.shape[1], BLOCK=SORT_BLOCK, num_warps=4)
    return sorted_position, token_of_row, rows_per_expert


@triton.jit
def _combine_kernel(expert_output, sorted_position, expert_weights, out, stride_row, stride_out, width,
                    TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < width
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for choice in tl.static_range(TOP_K):
        row = tl.load(sorted_position + token * TOP_K + choice).to(tl.int64)
        weight = tl.load(expert_weights + token * TOP_K + choice).to(tl.float32)
        # A pair of weight zero (another rank's, under expert parallelism) is skipped: its row may be unwritten.
        weighted = (tl.zeros([BLOCK], dtype=tl.float32) + weight) != 0
        values = tl.load(expert_output + row * stride_row + columns, mask=inside & weighted,
                         other=0.0).to(tl.float32)
        total += weight * values
    tl.store(out + token * stride_out + columns, total.to(out.dtype.element_ty), mask=inside)


def combine_expert_outputs(expert_output: torch.Tensor, sorted_position: torch.Tensor,
                           expert_weights: torch.Tensor) -> torch.Tensor:
    """Each token's Σ weight · output of its experts' rows: expert_output [pairs, hidden] in expert order,
    sorted_position from sort_pairs_by_expert, expert_weights [tokens, top_k] → [tokens, hidden].

    Summed in float32 and rounded once, where index_add_ rounded after every expert. Pairs of weight zero
    are not read, so their rows need never have been computed."""
    num_tokens, top_k = expert_weights.shape
    width = expert_output.shape[1]
    out = expert_output.new_empty(num_tokens, width)
    if not num_tokens:
        return out
    block = min(1024, triton.next_power_of_2(width))
    _combine_kernel[(num_tokens, triton.cdiv(width, block))](
        expert_output, sorted_position, expert_weights.contiguous(), out, expert_output.stride(0), out.stride(0),
        width, TOP_K=top_k, BLOCK=block, num_warps=4)
    return out
