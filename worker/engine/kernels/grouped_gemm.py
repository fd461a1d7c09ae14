"""The routed experts' grouped products on a GPU: rows sorted by expert, each expert's rows times its own
stacked weight, in one launch and with no host synchronisation, so that a CUDA graph can hold a decode step.

FP8 (`fp8_grouped_linear`): block-scaled weights, activations quantized per token group, as fp8_gemm's dense
kernel computes them; at 17–32 rows an expert the swapped kernel puts the weights on the tensor cores' wide
side. 16-bit (`grouped_linear`): the same kernel unscaled, which at a decode step's few rows an expert reads
the weights faster than torch's grouped GEMM does. The tile map (`expert_tiles`) says which expert's rows
each program of the grid takes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.engine.kernels.fp8_blocks import BLOCK, FP8_DTYPE, FP8_MAX, SCALE_FLOOR
from worker.engine.kernels.fp8_gemm import (GemmTiles, QuantizedRows, block_scaled_tile, quantize_per_token_group,
                                            quantized_groups, rounded_silu_and_mul)


def grouped_tiles(rows_per_expert: int) -> GemmTiles:
    """Tiles for the routed experts, by the mean rows an expert gets, from bench/fp8_tiles.py's sweeps on an
    H200 (bench/results/fp8-tiles-*.json): V3's decode (2–8 rows an expert) wants thin, wide tiles;
    V2-Lite's at 48 rows 64 × 128 with 8 warps, 33% faster than the 32 × 64 tiles it had. At 24 (V2-Lite's
    batch 256) the swapped kernel's 32 × 128 tiles were the best of 108 configurations for both projections,
    7% faster than the best unswapped (gate_up 108.9 against 116.6 µs, down 61.6 against 66.1;
    fp8-tiles-nvidia-h200-deepseek-v2-lite-experts-swapped.json); at V3's shapes it is unmeasured."""
    if rows_per_expert <= 4:
        return GemmTiles(16, 128, num_warps=4, num_stages=4)
    if rows_per_expert <= 16:
        return GemmTiles(16, 256, num_warps=4, num_stages=4)
    if rows_per_expert <= 32:
        return GemmTiles(32, 128, num_warps=4, num_stages=3, swapped=True)
    return GemmTiles(64, 128, num_warps=8, num_stages=4)


# The mean rows an expert up to which grouped_linear beats torch's grouped GEMM (cutlass) in bf16; past it
# torch's wins, as the products stop being bound by reading the weights. On an H200 at V2-Lite's shapes
# (bench/results/grouped-bf16-tiles-nvidia-h200-deepseek-v2-lite.json): 1.36× at 24 rows, 1.18–1.23× at 48,
# 0.89–0.94× at 72.
GROUPED_16_BIT_MAX_ROWS = 48


def grouped_tiles_16_bit(rows_per_expert: int) -> GemmTiles:
    """Tiles for 16-bit routed experts (grouped_linear), by the mean rows an expert gets: 64 × 128 with 8
    warps was within 1.5% of the best of 72 configurations for both projections at 24 and 48 rows."""
    if rows_per_expert <= GROUPED_16_BIT_MAX_ROWS:
        return GemmTiles(64, 128, num_warps=8, num_stages=3, block_k=64)
    return GemmTiles(64, 256, num_warps=8, num_stages=4, block_k=64)


@triton.jit
def _grouped_gemm_kernel(a, a_scale, b, b_scale, out, tile_experts, tile_first_rows, group_ends,
                         num_columns, num_inner, num_experts,
                         stride_am, stride_ak, stride_a_scale_m, stride_a_scale_k, stride_be, stride_bn,
                         stride_bk, stride_b_scale_e, stride_b_scale_n, stride_b_scale_k, stride_out_m,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         B_ROWS: tl.constexpr, SCALED: tl.constexpr):
    """One tile of one expert's rows: tile_experts says whose (num_experts: an unused tile of the grid)."""
    tile, tile_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_experts + tile)
    if expert >= num_experts:
        return
    rows = tl.load(tile_first_rows + tile) + tl.arange(0, BLOCK_M)
    columns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_inside, column_inside = rows < tl.load(group_ends + expert), columns < num_columns
    expert_offset = expert.to(tl.int64)
    accumulator = block_scaled_tile(
        a + rows.to(tl.int64) * stride_am, b + expert_offset * stride_be + columns.to(tl.int64) * stride_bn,
        a_scale + rows * stride_a_scale_m,
        b_scale + expert_offset * stride_b_scale_e + (columns // BLOCK_K) * stride_b_scale_n,
        row_inside, column_inside, num_inner, stride_ak, stride_bk, stride_a_scale_k, stride_b_scale_k,
        0, tl.cdiv(num_inner, BLOCK_K), BLOCK_M, BLOCK_N, BLOCK_K, B_ROWS, SCALED)
    targets = out + rows.to(tl.int64)[:, None] * stride_out_m + columns[None, :]
    tl.store(targets, accumulator.to(out.dtype.element_ty), mask=row_inside[:, None] & column_inside[None, :])


@triton.jit
def _swapped_grouped_kernel(a, a_scale, b, b_scale, out, tile_experts, tile_first_rows, group_ends, num_columns,
                            num_inner, num_experts, stride_am, stride_ak, stride_a_scale_m, stride_a_scale_k,
                            stride_be, stride_bn, stride_bk, stride_b_scale_e, stride_b_scale_n, stride_b_scale_k,
                            stride_out_m,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The grouped FP8 product computed as its transpose, out[rows, columns]ᵀ = b[columns] · a[rows]ᵀ: the
    tensor cores' wide side (64 at least) takes BLOCK_N weight rows, the narrow one an expert's BLOCK_M rows.
    BLOCK_N divides the 128-row scale block, so each K block has one weight scale for the whole tile."""
    tile, tile_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_experts + tile)
    if expert >= num_experts:
        return
    rows = tl.load(tile_first_rows + tile) + tl.arange(0, BLOCK_M)
    row_inside = rows < tl.load(group_ends + expert)
    columns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    column_inside = columns < num_columns
    inner = tl.arange(0, BLOCK_K)
    expert_offset = expert.to(tl.int64)
    weight_rows = b + expert_offset * stride_be + columns.to(tl.int64)[:, None] * stride_bn
    row_columns = a + rows.to(tl.int64)[None, :] * stride_am
    weight_scales = b_scale + expert_offset * stride_b_scale_e + ((tile_n * BLOCK_N) // BLOCK_K) * stride_b_scale_n
    accumulator = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k_block in range(0, tl.cdiv(num_inner, BLOCK_K)):
        k = k_block * BLOCK_K + inner
        k_inside = k < num_inner
        weights = tl.load(weight_rows + k[None, :] * stride_bk, mask=column_inside[:, None] & k_inside[None, :],
                          other=0.0)
        activations = tl.load(row_columns + k[:, None] * stride_ak, mask=row_inside[None, :] & k_inside[:, None],
                              other=0.0)
        a_scales = tl.load(a_scale + rows * stride_a_scale_m + k_block * stride_a_scale_k, mask=row_inside,
                           other=0.0)
        weight_scale = tl.load(weight_scales + k_block * stride_b_scale_k)
        accumulator += tl.dot(weights, activations) * (weight_scale * a_scales[None, :])
    targets = out + rows.to(tl.int64)[None, :] * stride_out_m + columns[:, None]
    tl.store(targets, accumulator.to(out.dtype.element_ty), mask=row_inside[None, :] & column_inside[:, None])


@triton.jit
def _swapped_gate_up_kernel(a, a_scale, b, b_scale, out, out_scale, tile_experts, tile_first_rows, group_ends,
                            width, num_inner, num_experts, stride_am, stride_ak, stride_a_scale_m,
                            stride_a_scale_k, stride_be, stride_bn, stride_bk, stride_b_scale_e, stride_b_scale_n,
                            stride_b_scale_k, stride_out_m, stride_out_scale_m, fp8_max, scale_floor,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BFLOAT16: tl.constexpr):
    """gate_up's product, SiLU and the down projection's quantization in one program per 128 gate rows: it
    takes the 128 up rows paired with them too (b holds [gate | up], `width` rows each), so its 128 outputs of
    silu(gate) · up are one quantization group of each activated row. Rounded to 16 bits where the separate
    kernels round (gate_up's output, SiLU, the product), its FP8 values and scales are theirs."""
    tile, group = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_experts + tile)
    if expert >= num_experts:
        return
    half = tl.bfloat16 if BFLOAT16 else tl.float16
    rows = tl.load(tile_first_rows + tile) + tl.arange(0, BLOCK_M)
    row_inside = rows < tl.load(group_ends + expert)
    columns = group * BLOCK_K + tl.arange(0, BLOCK_K)
    inner = tl.arange(0, BLOCK_K)
    expert_offset = expert.to(tl.int64)
    gate_rows = b + expert_offset * stride_be + columns.to(tl.int64)[:, None] * stride_bn
    up_rows = gate_rows + width * stride_bn
    row_columns = a + rows.to(tl.int64)[None, :] * stride_am
    gate_scales = b_scale + expert_offset * stride_b_scale_e + group * stride_b_scale_n
    up_scales = gate_scales + (width // BLOCK_K) * stride_b_scale_n
    gate = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    up = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for k_block in range(0, tl.cdiv(num_inner, BLOCK_K)):
        k = k_block * BLOCK_K + inner
        k_inside = k < num_inner
        activations = tl.load(row_columns + k[:, None] * stride_ak, mask=row_inside[None, :] & k_inside[:, None],
                              other=0.0)
        row_scales = tl.load(a_scale + rows * stride_a_scale_m + k_block * stride_a_scale_k, mask=row_inside,
                             other=0.0)[None, :]
        gate_weights = tl.load(gate_rows + k[None, :] * stride_bk, mask=k_inside[None, :], other=0.0)
        up_weights = tl.load(up_rows + k[None, :] * stride_bk, mask=k_inside[None, :], other=0.0)
        gate += tl.dot(gate_weights, activations) * (tl.load(gate_scales + k_block * stride_b_scale_k) * row_scales)
        up += tl.dot(up_weights, activations) * (tl.load(up_scales + k_block * stride_b_scale_k) * row_scales)
    activated = rounded_silu_and_mul(gate.to(half).to(tl.float32), up.to(half))
    quantized, scale = quantized_groups(tl.trans(activated), fp8_max, scale_floor)
    targets = out + rows.to(tl.int64)[:, None] * stride_out_m + columns[None, :]
    tl.store(targets, quantized.to(out.dtype.element_ty), mask=row_inside[:, None])
    tl.store(out_scale + rows * stride_out_scale_m + group, scale, mask=row_inside)


@triton.jit
def _expert_tiles_kernel(rows_per_expert, tile_experts, tile_first_rows, group_ends, num_experts, max_tiles,
                         BLOCK_M: tl.constexpr, EXPERTS_PAD: tl.constexpr, TILES: tl.constexpr):
    # One program: the experts' row counts fit one vector, and the tiles are walked TILES at a time.
    experts = tl.arange(0, EXPERTS_PAD)
    is_expert = experts < num_experts
    counts = tl.load(rows_per_expert + experts, mask=is_expert, other=0).to(tl.int32)
    ends = tl.cumsum(counts, axis=0)
    tl.store(group_ends + experts, ends, mask=is_expert)
    tiles_per_expert = (counts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles_per_expert, axis=0)
    # Row of tile t of expert e: its group's first row + (t - e's first tile) · BLOCK_M.
    first_row_base = (ends - counts) - (tile_ends - tiles_per_expert) * BLOCK_M
    for start in range(0, max_tiles, TILES):
        tiles = start + tl.arange(0, TILES)
        expert = tl.sum(((tile_ends[None, :] <= tiles[:, None]) & is_expert[None, :]).to(tl.int32), axis=1)
        base = tl.sum(tl.where(experts[None, :] == expert[:, None], first_row_base[None, :], 0), axis=1)
        tl.store(tile_experts + tiles, expert, mask=tiles < max_tiles)
        tl.store(tile_first_rows + tiles, base + tiles * BLOCK_M, mask=tiles < max_tiles)


def expert_tiles(rows_per_expert: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """(expert of each row tile, its first row, each expert's end row), int32, computed on the device for a
    grid sized from shapes alone (ceil(rows / BLOCK_M) + experts tiles at most), so that the host never waits.
    A tile past the last expert's gets the expert id num_experts (the kernel skips it). One launch: the
    torch ops it replaces were ~14 small kernels per grouped product."""
    num_experts = rows_per_expert.shape[0]
    max_tiles = triton.cdiv(num_rows, block_m) + num_experts
    device = rows_per_expert.device
    tile_experts = torch.empty(max_tiles, dtype=torch.int32, device=device)
    tile_first_rows = torch.empty(max_tiles, dtype=torch.int32, device=device)
    group_ends = torch.empty(num_experts, dtype=torch.int32, device=device)
    _expert_tiles_kernel[(1,)](rows_per_expert, tile_experts, tile_first_rows, group_ends, num_experts, max_tiles,
                               BLOCK_M=block_m, EXPERTS_PAD=triton.next_power_of_2(num_experts), TILES=64,
                               num_warps=4)
    return tile_experts, tile_first_rows, group_ends


def fp8_grouped_linear(rows: torch.Tensor | QuantizedRows, weights: torch.Tensor, weight_scales_inv: torch.Tensor,
                       rows_per_expert: torch.Tensor, config: GemmTiles | None = None,
                       tiles: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """rows [R, K] sorted by expert · weights [experts, N, K]ᵀ (scales [experts, N/128, K/128]) → [R, N].
    rows may come quantized already (QuantizedRows). `config` overrides the tiles `grouped_tiles` picks (the
    benchmark's sweep, or a caller running two products over the same groups); `tiles` is expert_tiles' map
    for config.block_m, made once for such products."""
    num_rows = rows.values.shape[0] if isinstance(rows, QuantizedRows) else rows.shape[0]
    config = config or grouped_tiles(num_rows // max(weights.shape[0], 1))
    if config.block_k != BLOCK:
        raise ValueError(f"FP8 tiles must span the {BLOCK}-column scale block, not {config.block_k}")
    if config.swapped and BLOCK % config.block_n:
        raise ValueError(f"swapped tiles' {config.block_n} weight rows must divide the {BLOCK}-row scale block")
    quantized = rows if isinstance(rows, QuantizedRows) else QuantizedRows(*quantize_per_token_group(rows), rows.dtype)
    return _grouped_product(quantized.values, quantized.scales, weights, weight_scales_inv, rows_per_expert, config,
                            quantized.output_dtype, tiles)


def fuses_gate_up(config: GemmTiles, width: int) -> bool:
    """Whether fp8_gate_up_silu can run gate_up with these tiles: swapped ones of a whole 128-row scale block,
    and gate and up each in whole blocks (so that an up row's block pairs with its gate row's)."""
    return config.swapped and config.block_n == BLOCK and width % BLOCK == 0


def fp8_gate_up_silu(rows: QuantizedRows, weights: torch.Tensor, weight_scales_inv: torch.Tensor,
                     rows_per_expert: torch.Tensor, config: GemmTiles,
                     tiles: tuple[torch.Tensor, ...] | None = None) -> QuantizedRows:
    """silu(gate) · up of the grouped FP8 gate_up product (weights [experts, 2 · width, K], gate rows first),
    quantized per token group for the down projection, in one launch: exactly what
    quantize_silu_and_mul(fp8_grouped_linear(rows, ...)) gives, without gate_up's output in memory. Only
    where fuses_gate_up(config, width)."""
    num_rows, num_inner = rows.values.shape
    num_experts, width = weights.shape[0], weights.shape[1] // 2
    if not fuses_gate_up(config, width):
        raise ValueError(f"gate_up with {width} rows a half cannot be fused with tiles {config}")
    tile_experts, tile_first_rows, group_ends = tiles or expert_tiles(rows_per_expert, num_rows, config.block_m)
    values = torch.empty(num_rows, width, dtype=FP8_DTYPE, device=weights.device)
    scales = torch.empty(num_rows, width // BLOCK, dtype=torch.float32, device=weights.device)
    if num_rows:
        _swapped_gate_up_kernel[(tile_experts.shape[0], width // BLOCK)](
            rows.values, rows.scales, weights, weight_scales_inv, values, scales, tile_experts, tile_first_rows,
            group_ends, width, num_inner, num_experts, *rows.values.stride(), *rows.scales.stride(),
            *weights.stride(), *weight_scales_inv.stride(), values.stride(0), scales.stride(0), FP8_MAX,
            SCALE_FLOOR, BLOCK_M=config.block_m, BLOCK_K=BLOCK, BFLOAT16=rows.output_dtype == torch.bfloat16,
            num_warps=config.num_warps, num_stages=config.num_stages)
    return QuantizedRows(values, scales, rows.output_dtype)


def grouped_linear(rows: torch.Tensor, weights: torch.Tensor, rows_per_expert: torch.Tensor,
                   config: GemmTiles | None = None) -> torch.Tensor:
    """The same product in 16 bits, unscaled: rows [R, K] sorted by expert · weights [experts, N, K]ᵀ."""
    config = config or grouped_tiles_16_bit(rows.shape[0] // max(weights.shape[0], 1))
    if config.swapped:
        raise ValueError("the swapped grouped kernel multiplies FP8 operands only")
    return _grouped_product(rows, None, weights, None, rows_per_expert, config, rows.dtype)


def _grouped_product(a: torch.Tensor, a_scale: torch.Tensor | None, weights: torch.Tensor,
                     weight_scales: torch.Tensor | None, rows_per_expert: torch.Tensor, config: GemmTiles,
                     output_dtype: torch.dtype, tiles: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """One launch of the grouped kernel; without scales the kernel reads none (a stands in for their pointers)."""
    num_rows, num_inner = a.shape
    num_experts, num_columns = weights.shape[:2]
    tile_experts, tile_first_rows, group_ends = tiles or expert_tiles(rows_per_expert, num_rows, config.block_m)
    out = torch.empty(num_rows, num_columns, dtype=output_dtype, device=a.device)
    scaled = a_scale is not None
    a_scale_strides = a_scale.stride() if scaled else (0, 0)
    weight_scale_strides = weight_scales.stride() if scaled else (0, 0, 0)
    grid = (tile_experts.shape[0], triton.cdiv(num_columns, config.block_n))
    if num_rows and config.swapped:
        _swapped_grouped_kernel[grid](
            a, a_scale, weights, weight_scales, out, tile_experts, tile_first_rows, group_ends, num_columns,
            num_inner, num_experts, a.stride(0), a.stride(1), *a_scale_strides, *weights.stride(),
            *weight_scale_strides, out.stride(0), **config.launch())
    elif num_rows:
        _grouped_gemm_kernel[grid](
            a, a_scale if scaled else a, weights, weight_scales if scaled else weights, out, tile_experts,
            tile_first_rows, group_ends, num_columns, num_inner, num_experts, a.stride(0), a.stride(1),
            *a_scale_strides, *weights.stride(), *weight_scale_strides, out.stride(0), SCALED=scaled,
            **config.launch())
    return out
