"""Block-scaled FP8 matrix products for Hopper, as DeepSeek-V3 runs them: weights in float8_e4m3fn with one
float32 scale per 128×128 block, activations quantized per token in groups of 128 columns.

Dense projections go to torch's blockwise `_scaled_mm` (cuBLAS) where it computes them right
(`torch_blockwise_takes`): it is faster than this module's kernel at a decode step's shapes, but returns
wrong products without complaint where K ends inside a scale block (V2-Lite's 10944 = 85.5 × 128) or spans a
number of blocks that is not a multiple of 4 (1408 = 11 blocks). This module's kernel masks partial blocks in
every dimension, so it serves every other shape, including a tensor-parallel shard. The routed experts'
grouped products, built on the same tile (`block_scaled_tile`), are in grouped_gemm.py.

Layouts: x [M, K] → x_fp8 [M, K] and x_scale [M, ceil(K/128)] (x ≈ x_fp8 · x_scale per group);
weight [N, K] with weight_scale_inv [ceil(N/128), ceil(K/128)] (weight ≈ weight_fp8 · scale per block);
stacked experts add a leading expert dimension to both. The kernels accumulate in float32: each
128-wide slice of K is one FP8 tensor-core product, rescaled by its two scales before it is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The scale block of weights (rows and columns) is also the activation group.
from worker.engine.kernels.fp8_blocks import BLOCK, FP8_DTYPE, FP8_MAX, SCALE_FLOOR, dequantize_blocks


@triton.jit
def quantized_groups(values, fp8_max, scale_floor):
    """values [groups, 128] in float32 → (their FP8 values, still float32, and each group's scale): each
    group's absolute maximum sets its scale."""
    scale = tl.maximum(tl.max(tl.abs(values), axis=1) / fp8_max, scale_floor)
    return tl.clamp(values / scale[:, None], -fp8_max, fp8_max), scale


@triton.jit
def rounded_silu_and_mul(gate, up):
    """silu(gate) · up for gate in float32 and up in a 16-bit dtype, rounded to it where fused.silu_and_mul
    rounds (SiLU's output, the product), in float32: what quantizing its stored output reads back."""
    return ((gate * tl.sigmoid(gate)).to(up.dtype) * up).to(up.dtype).to(tl.float32)


@triton.jit
def _quantize_groups_kernel(x, x_fp8, x_scale, num_columns, stride_x, stride_fp8, stride_scale, stride_scale_group,
                            fp8_max, scale_floor, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                            SILU_AND_MUL: tl.constexpr):
    """One program per row, GROUPS groups at a time: each group's absolute maximum sets its scale. (A
    program per group and row, one warp each, spent 1.3 ms of a 14.6 ms V2-Lite FP8 decode step.)
    SILU_AND_MUL: x's row holds [gate | up], num_columns each, and silu(gate) · up is quantized as
    fused.silu_and_mul's output would be, without the 16-bit row in between."""
    row = tl.program_id(0).to(tl.int64)
    in_group = tl.arange(0, GROUP)[None, :]
    for first_group in range(0, tl.cdiv(num_columns, GROUP), GROUPS):
        groups = first_group + tl.arange(0, GROUPS)
        columns = groups[:, None] * GROUP + in_group
        inside = columns < num_columns
        values = tl.load(x + row * stride_x + columns, mask=inside, other=0.0)
        if SILU_AND_MUL:
            up = tl.load(x + row * stride_x + num_columns + columns, mask=inside, other=0.0)
            values = rounded_silu_and_mul(values.to(tl.float32), up)
        quantized, scale = quantized_groups(values.to(tl.float32), fp8_max, scale_floor)
        tl.store(x_fp8 + row * stride_fp8 + columns, quantized.to(x_fp8.dtype.element_ty), mask=inside)
        tl.store(x_scale + row * stride_scale + groups * stride_scale_group, scale, mask=groups * GROUP < num_columns)


def _quantized_rows(x: torch.Tensor, num_columns: int, scales_by_group: bool,
                    silu_and_mul: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of _quantize_groups_kernel over x's rows: (FP8 values [M, num_columns], scales)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_rows = x.shape[0]
    num_groups = triton.cdiv(num_columns, BLOCK)
    x_fp8 = torch.empty(num_rows, num_columns, dtype=FP8_DTYPE, device=x.device)
    if scales_by_group:
        x_scale = torch.empty(num_groups, num_rows, dtype=torch.float32, device=x.device).t()
    else:
        x_scale = torch.empty(num_rows, num_groups, dtype=torch.float32, device=x.device)
    if num_rows:
        _quantize_groups_kernel[(num_rows,)](
            x, x_fp8, x_scale, num_columns, x.stride(0), x_fp8.stride(0), *x_scale.stride(), FP8_MAX, SCALE_FLOOR,
            GROUP=BLOCK, GROUPS=min(16, triton.next_power_of_2(num_groups)), SILU_AND_MUL=silu_and_mul,
            num_warps=4)
    return x_fp8, x_scale


def quantize_per_token_group(x: torch.Tensor, scales_by_group: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8 [M, K], x_scale [M, ceil(K/128)] float32) for x [M, K], as DeepSeek-V3 quantizes activations.
    scales_by_group lays x_scale out a group's scales after another (strides (1, M)), as torch's blockwise
    scaled matmul takes them."""
    return _quantized_rows(x, x.shape[1], scales_by_group, silu_and_mul=False)


class QuantizedRows(NamedTuple):
    """Rows already quantized per token group (quantize_per_token_group's pair), and the dtype a product of
    them returns."""

    values: torch.Tensor
    scales: torch.Tensor
    output_dtype: torch.dtype


def quantize_silu_and_mul(gate_up: torch.Tensor) -> QuantizedRows:
    """silu(gate) * up for gate_up [rows, 2 * width] holding [gate | up], quantized per token group: what
    quantize_per_token_group(fused.silu_and_mul(gate_up)) gives, in one kernel (an FP8 down projection's input)."""
    values, scales = _quantized_rows(gate_up, gate_up.shape[1] // 2, scales_by_group=False, silu_and_mul=True)
    return QuantizedRows(values, scales, gate_up.dtype)


@triton.jit
def block_scaled_tile(a_rows, b_columns, a_scale_rows, b_scale_columns, row_inside, column_inside,
                       num_inner, stride_ak, stride_bk, stride_a_scale_k, stride_b_scale_k,
                       k_first_block, k_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, B_ROWS: tl.constexpr, SCALED: tl.constexpr):
    """Σ over K blocks [k_first_block, k_first_block + k_blocks) of (a_fp8 · b_fp8) · a_scale · b_scale.
    B_ROWS loads b as [BLOCK_N, BLOCK_K] (its rows, contiguous in memory) and transposes in registers.
    Unscaled (16-bit operands, no scale is read), it is the plain product a · b."""
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    inner = tl.arange(0, BLOCK_K)
    for k_block in range(k_first_block, k_first_block + k_blocks):
        k = k_block * BLOCK_K + inner
        k_inside = k < num_inner
        a = tl.load(a_rows[:, None] + k[None, :] * stride_ak, mask=row_inside[:, None] & k_inside[None, :],
                    other=0.0)
        if B_ROWS:
            b = tl.trans(tl.load(b_columns[:, None] + k[None, :] * stride_bk,
                                 mask=column_inside[:, None] & k_inside[None, :], other=0.0))
        else:
            b = tl.load(b_columns[None, :] + k[:, None] * stride_bk,
                        mask=column_inside[None, :] & k_inside[:, None], other=0.0)
        if SCALED:
            a_scale = tl.load(a_scale_rows + k_block * stride_a_scale_k, mask=row_inside, other=0.0)
            b_scale = tl.load(b_scale_columns + k_block * stride_b_scale_k, mask=column_inside, other=0.0)
            accumulator += tl.dot(a, b) * a_scale[:, None] * b_scale[None, :]
        else:
            accumulator = tl.dot(a, b, accumulator)
    return accumulator


@triton.jit
def _gemm_kernel(a, a_scale, b, b_scale, out, num_rows, num_columns, num_inner, k_blocks_per_split,
                 stride_am, stride_ak, stride_a_scale_m, stride_a_scale_k, stride_bn, stride_bk,
                 stride_b_scale_n, stride_b_scale_k, stride_out_split, stride_out_m,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, B_ROWS: tl.constexpr):
    """out[split] [M, N] = a [M, K] · b [N, K]ᵀ over this split's K blocks (program axis 2)."""
    tile_m, tile_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_inside, column_inside = rows < num_rows, columns < num_columns
    k_first_block = split * k_blocks_per_split
    k_blocks = tl.minimum(k_blocks_per_split, tl.cdiv(num_inner, BLOCK_K) - k_first_block)
    accumulator = block_scaled_tile(
        a + rows.to(tl.int64) * stride_am, b + columns.to(tl.int64) * stride_bn,
        a_scale + rows * stride_a_scale_m, b_scale + (columns // BLOCK_K) * stride_b_scale_n,
        row_inside, column_inside, num_inner, stride_ak, stride_bk, stride_a_scale_k, stride_b_scale_k,
        k_first_block, k_blocks, BLOCK_M, BLOCK_N, BLOCK_K, B_ROWS, True)
    targets = out + split * stride_out_split + rows.to(tl.int64)[:, None] * stride_out_m + columns[None, :]
    tl.store(targets, accumulator.to(out.dtype.element_ty), mask=row_inside[:, None] & column_inside[None, :])


@dataclass(frozen=True)
class GemmTiles:
    """One launch configuration of the kernels: the output tile, warps, software-pipeline stages, and
    whether b is loaded by rows (see `_block_scaled_tile`)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    b_rows: bool = False
    block_k: int = BLOCK  # FP8 products need the scale block; 16-bit ones may take less
    # Grouped FP8 only: the weights' rows are the tensor cores' wide side and an expert's few rows the narrow
    # one (_swapped_grouped_kernel), so a tile of block_m rows no longer pads them to 64. block_n divides 128.
    swapped: bool = False

    def launch(self) -> dict:
        launch = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                  "num_warps": self.num_warps, "num_stages": self.num_stages}
        return launch if self.swapped else {**launch, "B_ROWS": self.b_rows}


def gemm_tiles(num_rows: int, num_columns: int) -> GemmTiles:
    """Tiles for a dense projection, from bench/fp8_tiles.py's sweep on an H200 (CUDA graphs, V2-Lite and V3
    shapes at 64–512 rows; bench/results/fp8-tiles-*.json): 64-row tiles win from 64 rows up (up to 2× over
    32-row ones at V3's q_b_proj), 64 columns where N is small enough that 128 would leave SMs idle."""
    if num_rows <= 16:
        return GemmTiles(16, 64)
    if num_rows <= 64:
        return GemmTiles(64, 64, num_warps=4, num_stages=4)
    return GemmTiles(64, 64 if num_columns <= 4096 else 128, num_warps=4, num_stages=3)


@lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def split_k_count(num_tiles: int, k_blocks: int, num_sms: int) -> int:
    """How many slices of K run in parallel: enough programs to fill the device when M and N are small, each
    slice at least 4 blocks of K long."""
    if num_tiles >= num_sms or k_blocks < 8:
        return 1
    return max(1, min(k_blocks // 4, triton.cdiv(num_sms, num_tiles)))


def block_scaled_matmul(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                        weight_scale_inv: torch.Tensor, output_dtype: torch.dtype,
                        config: GemmTiles | None = None) -> torch.Tensor:
    """x_fp8 [M, K] (scales [M, K/128]) · weight [N, K]ᵀ (scales [N/128, K/128]) → [M, N] in output_dtype.
    `config` overrides the tiles `gemm_tiles` picks (the benchmark's sweep)."""
    num_rows, num_inner = x_fp8.shape
    num_columns = weight.shape[0]
    config = config or gemm_tiles(num_rows, num_columns)
    tiles = (triton.cdiv(num_rows, config.block_m), triton.cdiv(num_columns, config.block_n))
    k_blocks = triton.cdiv(num_inner, BLOCK)
    splits = split_k_count(tiles[0] * tiles[1], k_blocks, multiprocessor_count(x_fp8.device))
    k_blocks_per_split = triton.cdiv(k_blocks, splits)
    splits = triton.cdiv(k_blocks, k_blocks_per_split)
    out_dtype = output_dtype if splits == 1 else torch.float32
    out = torch.empty(splits, num_rows, num_columns, dtype=out_dtype, device=x_fp8.device)
    if num_rows:
        _gemm_kernel[(*tiles, splits)](
            x_fp8, x_scale, weight, weight_scale_inv, out, num_rows, num_columns, num_inner, k_blocks_per_split,
            x_fp8.stride(0), x_fp8.stride(1), x_scale.stride(0), x_scale.stride(1), weight.stride(0),
            weight.stride(1), weight_scale_inv.stride(0), weight_scale_inv.stride(1), out.stride(0), out.stride(1),
            **config.launch())
    return out[0] if splits == 1 else sum_splits(out, output_dtype)


@triton.jit
def _sum_splits_kernel(partial, out, num_splits, num_elements, stride_split, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < num_elements
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(num_splits):
        total += tl.load(partial + split * stride_split + offsets, mask=inside, other=0.0)
    tl.store(out + offsets, total.to(out.dtype.element_ty), mask=inside)


def sum_splits(partial: torch.Tensor, output_dtype: torch.dtype) -> torch.Tensor:
    """partial [splits, M, N] float32 (contiguous) summed over its splits into [M, N] of output_dtype, in one
    kernel: torch's sum then cast were two (0.6 ms of a V2-Lite FP8 decode step at batch 256)."""
    num_splits, num_rows, num_columns = partial.shape
    out = torch.empty(num_rows, num_columns, dtype=output_dtype, device=partial.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(num_rows * num_columns, block),)](
        partial, out, num_splits, num_rows * num_columns, partial.stride(0), BLOCK=block, num_warps=4)
    return out


def torch_blockwise_takes(num_rows: int, num_columns: int, num_inner: int, dtype: torch.dtype) -> bool:
    """Whether torch's blockwise scaled matmul (cuBLAS) computes this product right. It returns wrong products,
    without complaint, where K ends inside a scale block (V2-Lite's 10944) and where K's blocks are not a
    multiple of 4 (1408 = 11 blocks, on an H200): the weight scales' rows, read as they lie, are then not
    16-byte aligned. Rows and columns are kept to multiples of 16 for the same alignment."""
    return (num_inner % (4 * BLOCK) == 0 and num_rows % 16 == 0 and num_columns % 16 == 0
            and dtype == torch.bfloat16)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] · weight [N, K]ᵀ (+ bias) with x quantized per token group: the GPU path of an FP8 linear.
    torch's blockwise scaled matmul where it takes the shape: at V2-Lite's projections at 256 rows, in CUDA
    graphs on an H200, this module's kernel took 1.3–1.8× cuBLAS's bf16 time; everything else here."""
    leading = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if x.is_cuda and torch_blockwise_takes(rows.shape[0], weight.shape[0], rows.shape[1], x.dtype):
        x_fp8, x_scale = quantize_per_token_group(rows, scales_by_group=True)
        out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale_inv.t(), out_dtype=x.dtype)
    else:
        x_fp8, x_scale = quantize_per_token_group(rows)
        out = block_scaled_matmul(x_fp8, x_scale, weight, weight_scale_inv, x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*leading, weight.shape[0])


def reference_block_scaled_matmul(x: torch.Tensor, weight: torch.Tensor,
                                  weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """What the kernels compute, in float32 torch ops (for tests and the benchmark): x quantized per token
    group, both operands dequantized, one matrix product."""
    num_rows, num_inner = x.shape
    groups = torch.nn.functional.pad(x.float(), (0, -num_inner % BLOCK)).view(num_rows, -1, BLOCK)
    scale = (groups.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=SCALE_FLOOR)
    x_dequantized = ((groups / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale).view(num_rows, -1)
    return x_dequantized[:, :num_inner] @ dequantize_blocks(weight, weight_scale_inv, torch.float32).T
