"""Attention over the paged KV cache on the GPU: one Triton kernel for decode, prefill and MLA.

Why our own kernel: torch's fused attention needs keys and values contiguous per sequence, which a
paged cache is not, and gathering them into dense tensors every layer costs more memory traffic than
the attention itself. This kernel walks each sequence's block table instead.

One program handles `BLOCK_T` query tokens of one sequence for the query heads that share one
key/value head (GQA's group; for MLA every head shares the single latent "head"), so each key block is
read once for the whole group — or, where the group is too large for one program's registers and shared
memory (DeepSeek-V3's 128 MLA heads with a 512-wide latent need 288 KiB, an H200 has 227), for each of
`SPLITS` slices of `SUB` heads, which then read the block once each. The rows of its tiles are (token, head-in-group) pairs. Keys are read
in tiles of `BLOCK_N` positions through the block table, with an online softmax (FlashAttention's
recurrence). The query dimension may come in two parts (`DIM_A` + `DIM_B`): MLA's absorbed query is
512 latent + 64 rope dimensions, and Triton tiles must be powers of two. With `VALUE_IS_KEY_PREFIX`
the values are the first `DIM_V` dimensions of the keys (MLA's latent), so they are not loaded twice.

A decode step with fewer programs than the GPU has SMs splits each context into runs of whole key tiles, taken
by programs of their own (`KV_SPLITS`); each writes its unnormalised output, running maximum and sum, and a
second kernel combines them (FlashDecoding's split-KV).

Queries are causal over the whole context: token t of a sequence whose context after this step holds
`context_len` positions (cached prefix + new tokens) sees positions up to `context_len - query_len + t`.
That one rule serves decode (one new token), chunked prefill and prefix-cache hits alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


# The block-table width changes from step to step; specialising on it would compile a variant per width.
@triton.jit(do_not_specialize=["stride_block_table"])
def _paged_attention_kernel(
    query, stride_query_token, stride_query_head,
    key_cache, stride_key_block, stride_key_slot, stride_key_head,
    value_cache, stride_value_block, stride_value_slot, stride_value_head,
    output, stride_output_token, stride_output_head,
    partial_values, partial_max, partial_sum,
    block_tables, stride_block_table,
    query_starts, query_lens, context_lens,
    scale_log2,
    GROUP: tl.constexpr, SUB: tl.constexpr, SUB_PAD: tl.constexpr, SPLITS: tl.constexpr,
    KV_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr, DIM_V: tl.constexpr,
    PAD_A: tl.constexpr, PAD_B: tl.constexpr, PAD_V: tl.constexpr,
    VALUE_IS_KEY_PREFIX: tl.constexpr, PRECISION: tl.constexpr,
):
    sequence = tl.program_id(0)
    kv_head = tl.program_id(1) // SPLITS
    first_head = (tl.program_id(1) % SPLITS) * SUB  # of the group's heads, the first this program takes
    first_token = (tl.program_id(2) // KV_SPLITS) * BLOCK_T
    kv_split = tl.program_id(2) % KV_SPLITS
    query_len = tl.load(query_lens + sequence)
    if first_token >= query_len:
        return
    context_len = tl.load(context_lens + sequence)
    query_start = tl.load(query_starts + sequence)

    rows = tl.arange(0, BLOCK_T * SUB_PAD)
    token = first_token + rows // SUB_PAD
    head_in_group = first_head + rows % SUB_PAD
    head = kv_head * GROUP + head_in_group
    row_is_real = (token < query_len) & (rows % SUB_PAD < SUB) & (head_in_group < GROUP)
    query_position = context_len - query_len + token  # causal limit of each row
    query_rows = query + (query_start + token)[:, None] * stride_query_token + head[:, None] * stride_query_head

    # Tiles are powers of two of at least 16 (PAD_*, for the tensor cores); dimensions past the real ones
    # load as zeros.
    dims_a = tl.arange(0, PAD_A)
    query_a = tl.load(query_rows + dims_a[None, :], mask=row_is_real[:, None] & (dims_a[None, :] < DIM_A), other=0.0)
    if DIM_B > 0:
        dims_b = tl.arange(0, PAD_B)
        query_b = tl.load(query_rows + DIM_A + dims_b[None, :],
                          mask=row_is_real[:, None] & (dims_b[None, :] < DIM_B), other=0.0)
    dims_v = tl.arange(0, PAD_V)

    row_max = tl.full([BLOCK_T * SUB_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_T * SUB_PAD], tl.float32)
    accumulator = tl.zeros([BLOCK_T * SUB_PAD, PAD_V], tl.float32)
    # Keys past the last real query's position are masked for every row: stop there.
    last_token = tl.minimum(first_token + BLOCK_T, query_len) - 1
    key_end = context_len - query_len + last_token + 1
    # With KV_SPLITS, this program takes one of that many runs of whole key tiles (the last ones may be empty).
    split_len = tl.cdiv(tl.cdiv(key_end, KV_SPLITS), BLOCK_N) * BLOCK_N
    key_begin = kv_split * split_len
    key_end = tl.minimum(key_begin + split_len, key_end)
    block_table = block_tables + sequence * stride_block_table
    for key_start in range(key_begin, key_end, BLOCK_N):
        positions = key_start + tl.arange(0, BLOCK_N)
        position_is_real = positions < key_end
        # int64: a cache of tens of GB holds more elements than int32 offsets reach
        block_ids = tl.load(block_table + positions // PAGE_SIZE, mask=position_is_real, other=0).to(tl.int64)
        slots = positions % PAGE_SIZE
        key_rows = key_cache + block_ids * stride_key_block + slots * stride_key_slot + kv_head * stride_key_head
        key_a = tl.load(key_rows[None, :] + dims_a[:, None],
                        mask=position_is_real[None, :] & (dims_a[:, None] < DIM_A), other=0.0)
        scores = tl.dot(query_a, key_a, input_precision=PRECISION)
        if DIM_B > 0:
            key_b = tl.load(key_rows[None, :] + DIM_A + dims_b[:, None],
                            mask=position_is_real[None, :] & (dims_b[:, None] < DIM_B), other=0.0)
            scores += tl.dot(query_b, key_b, input_precision=PRECISION)
        visible = (positions[None, :] <= query_position[:, None]) & position_is_real[None, :]
        scores = tl.where(visible, scores * scale_log2, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        correction = tl.exp2(row_max - new_max)
        probabilities = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probabilities, axis=1)
        if VALUE_IS_KEY_PREFIX:  # PAD_V == PAD_A: the zero-padded key tile is the value tile
            values = tl.trans(key_a)
        else:
            value_rows = (value_cache + block_ids * stride_value_block + slots * stride_value_slot
                          + kv_head * stride_value_head)
            values = tl.load(value_rows[:, None] + dims_v[None, :],
                             mask=position_is_real[:, None] & (dims_v[None, :] < DIM_V), other=0.0)
        accumulator = accumulator * correction[:, None] + tl.dot(
            probabilities.to(values.dtype), values, input_precision=PRECISION)
        row_max = new_max

    if KV_SPLITS == 1:
        accumulator = accumulator / row_sum[:, None]
        output_rows = output + (query_start + token)[:, None] * stride_output_token + head[:, None] * stride_output_head
        tl.store(output_rows + dims_v[None, :], accumulator.to(output.dtype.element_ty),
                 mask=row_is_real[:, None] & (dims_v[None, :] < DIM_V))
    else:  # the split's running state, for _combine_splits_kernel: [sequences, heads, KV_SPLITS (, DIM_V)], one
        # query token per sequence (splits are for decode)
        partial_row = (sequence * NUM_HEADS + head) * KV_SPLITS + kv_split
        tl.store(partial_values + partial_row[:, None] * DIM_V + dims_v[None, :], accumulator,
                 mask=row_is_real[:, None] & (dims_v[None, :] < DIM_V))
        tl.store(partial_max + partial_row, row_max, mask=row_is_real)
        tl.store(partial_sum + partial_row, row_sum, mask=row_is_real)


@triton.jit
def _combine_splits_kernel(partial_values, partial_max, partial_sum, output, stride_output_token,
                           stride_output_head, query_starts, query_lens, NUM_HEADS: tl.constexpr,
                           KV_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, DIM_V: tl.constexpr,
                           PAD_V: tl.constexpr):
    """One (sequence, head) of a decode step: the softmax-weighted sum of its KV_SPLITS partial results (an
    empty split's maximum is -inf, its weight 0)."""
    sequence = tl.program_id(0)
    head = tl.program_id(1)
    if tl.load(query_lens + sequence) == 0:
        return
    token = tl.load(query_starts + sequence)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, PAD_V)
    row = (sequence * NUM_HEADS + head) * KV_SPLITS
    real = splits < KV_SPLITS
    maxima = tl.load(partial_max + row + splits, mask=real, other=float("-inf"))
    overall = tl.max(maxima, axis=0)
    weights = tl.where(maxima > float("-inf"), tl.exp2(maxima - overall), 0.0)
    total = tl.sum(weights * tl.load(partial_sum + row + splits, mask=real, other=0.0), axis=0)
    values = tl.load(partial_values + (row + splits)[:, None] * DIM_V + dims[None, :],
                     mask=(weights > 0)[:, None] & (dims[None, :] < DIM_V), other=0.0)
    result = tl.sum(weights[:, None] * values, axis=0) / total
    tl.store(output + token * stride_output_token + head * stride_output_head + dims,
             result.to(output.dtype.element_ty), mask=dims < DIM_V)


def next_power_of_two(value: int) -> int:
    return 1 << (value - 1).bit_length()


# Query rows (token × head pairs) one program may hold beside a 512-wide MLA accumulator: 64 fit an H200's
# registers and shared memory, 128 do not. Narrower heads take twice as many.
MAX_WIDE_ROWS = 64
MAX_ROWS = 128


@dataclass(frozen=True)
class LaunchShape:
    tokens: int  # query tokens per program
    block_n: int  # key positions per tile
    warps: int
    stages: int  # software-pipelining depth of the key loop
    heads: int | None = None  # of a key/value head's group, the query heads per program; None: the whole group
    kv_splits: int | None = None  # decode: runs of each context taken by programs of their own; None: by the SMs
    split_below: float = 1.0  # decode, kv_splits None: programs an SM below which contexts are split


def launch_shape(group: int, value_dim: int, is_decode: bool) -> LaunchShape:
    """The launch for a head layout: the fastest of bench/paged_attention.py's sweep on an H100. Tiles need
    at least 16 rows for the tensor cores; MLA's 512-wide accumulator limits how many query rows fit in
    registers, so its prefill programs take fewer tokens, and a group past MAX_WIDE_ROWS / MAX_ROWS heads
    is split across programs."""
    heads = min(group, MAX_WIDE_ROWS if value_dim > 256 else MAX_ROWS)
    heads_pad = next_power_of_two(heads)
    if is_decode and heads_pad <= 16 and value_dim <= 128:
        # Grouped-query heads: 128-position tiles, three stages deep, read the 1.5B shape's cache 1.12-1.34× as
        # fast as 64-position tiles at 64-512 sequences on an H200, and need no split at 128 programs
        # (bench/results/paged-attention-nvidia-h200-gqa-decode-*.json). Keys and values of up to 128 dims
        # keep three such stages within shared memory.
        return LaunchShape(tokens=16 // heads_pad, block_n=128, warps=4, stages=3, heads=heads, split_below=0.5)
    if is_decode and heads_pad <= 16:
        return LaunchShape(tokens=16 // heads_pad, block_n=64, warps=4, stages=2, heads=heads)
    # A decode step's program holds one token; past 16 heads its rows take the prefill programs' warps
    # (V3's 64-head slices: not yet timed on a GPU).
    if value_dim > 256:
        return LaunchShape(tokens=1 if is_decode else max(1, 64 // heads_pad), block_n=64, warps=8, stages=2,
                           heads=heads)
    return LaunchShape(tokens=1 if is_decode else max(1, 128 // heads_pad), block_n=32, warps=8, stages=2,
                       heads=heads)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    output: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    page_size: int,
    dim_a: int,
    value_dim: int,
    launch: LaunchShape | None = None,
) -> None:
    """Attention of `query` [tokens, heads, dim] over the paged cache, written into `output` [tokens, heads, dv].

    key_cache / value_cache: [blocks, page_size, kv_heads, dim] views (any strides but a contiguous
    last dimension). value_cache None: values are the first `value_dim` key dimensions (MLA).
    The per-sequence tensors are int32 on the query's device; `max_query_len` sizes the grid.
    """
    if value_cache is None and value_dim != dim_a:
        raise ValueError(f"values that are the keys' prefix need value_dim == dim_a, got {value_dim} and {dim_a}")
    num_sequences = query_starts.shape[0]
    if num_sequences == 0:
        return
    num_kv_heads = key_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    dim_b = query.shape[2] - dim_a
    launch = launch or launch_shape(group, value_dim, is_decode=max_query_len == 1)
    values = key_cache if value_cache is None else value_cache
    heads = min(launch.heads or group, group)
    splits = triton.cdiv(group, heads)
    kv_splits = 1
    if max_query_len == 1:
        kv_splits = launch.kv_splits or decode_kv_splits(num_sequences * num_kv_heads * splits, query.device,
                                                         launch.split_below)
    num_heads = query.shape[1]
    partial_values = partial_max = partial_sum = output  # unused unless the context is split
    if kv_splits > 1:
        partial_values = query.new_empty(num_sequences, num_heads, kv_splits, value_dim, dtype=torch.float32)
        partial_max = query.new_empty(num_sequences, num_heads, kv_splits, dtype=torch.float32)
        partial_sum = torch.empty_like(partial_max)
    grid = (num_sequences, num_kv_heads * splits, triton.cdiv(max_query_len, launch.tokens) * kv_splits)
    _paged_attention_kernel[grid](
        query, query.stride(0), query.stride(1),
        key_cache, key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        values, values.stride(0), values.stride(1), values.stride(2),
        output, output.stride(0), output.stride(1),
        partial_values, partial_max, partial_sum,
        block_tables, block_tables.stride(0),
        query_starts, query_lens, context_lens,
        scale * LOG2_E,
        GROUP=group, SUB=heads, SUB_PAD=next_power_of_two(heads), SPLITS=splits,
        KV_SPLITS=kv_splits, NUM_HEADS=num_heads,
        BLOCK_T=launch.tokens, BLOCK_N=launch.block_n,
        PAGE_SIZE=page_size, DIM_A=dim_a, DIM_B=dim_b, DIM_V=value_dim,
        PAD_A=max(16, next_power_of_two(dim_a)), PAD_B=max(16, next_power_of_two(dim_b)) if dim_b else 0,
        PAD_V=max(16, next_power_of_two(value_dim)),
        VALUE_IS_KEY_PREFIX=value_cache is None,
        # float32 runs check the engine against transformers: full-precision products, not tf32.
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=launch.warps, num_stages=launch.stages,
    )
    if kv_splits > 1:
        _combine_splits_kernel[(num_sequences, num_heads)](
            partial_values, partial_max, partial_sum, output, output.stride(0), output.stride(1), query_starts,
            query_lens, NUM_HEADS=num_heads, KV_SPLITS=kv_splits, SPLITS_PAD=max(2, next_power_of_two(kv_splits)),
            DIM_V=value_dim, PAD_V=max(16, next_power_of_two(value_dim)), num_warps=4,
        )


# A decode step's programs (sequences × key/value heads × head slices) are few at small batches: 64 of the
# 1.5B shape's sequences make 128 programs for an H200's 132 SMs, each walking its whole context alone, and
# the kernel read the cache at a quarter of the bandwidth. With fewer programs than SMs each context is split
# into runs of whole key tiles, up to PROGRAMS_PER_SM programs an SM, taken by programs of their own and
# combined after (FlashDecoding). On an H200 that took the 1.5B shape's decode step at batch 64 from 2.65 to
# 2.37 ms with 64-position tiles; splitting V2-Lite's 256 MLA programs into 3 runs each made its step slower
# (14.14 to 14.51 ms). Grouped-query heads now take 128-position tiles, which need no split at 128 programs
# (LaunchShape.split_below): the same 2.4 ms at batch 64, 2.80 to 2.64 ms at 128.
PROGRAMS_PER_SM = 4
MAX_KV_SPLITS = 8


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_kv_splits(programs: int, device: torch.device, split_below: float = 1.0) -> int:
    """How many runs to split each context of a decode step into: none off a GPU (the interpreter's tests
    choose theirs) or where there are split_below programs an SM or more, else enough for PROGRAMS_PER_SM
    programs an SM. A function of the batch, not of the context lengths, so a CUDA graph captured at one
    batch size replays any contexts."""
    multiprocessors = multiprocessor_count(device) if device.type == "cuda" else 0
    if programs >= split_below * multiprocessors:
        return 1
    return min(MAX_KV_SPLITS, -(-PROGRAMS_PER_SM * multiprocessors // programs))
