"""Fused elementwise kernels for the GPU: residual add + RMSNorm, rotary embedding, SiLU-and-multiply.

Why: at decode batch sizes each of these is a handful of tiny torch kernels per layer (RMSNorm alone is
seven: cast, square, mean, rsqrt, multiply, cast, scale), and together they cost a third of a decode
step. One Triton program per token row does each in a single pass. They are used for 16-bit activations
on the GPU only; the CPU and float32 runs keep transformers' op-for-op torch code, which the engine's
equivalence tests compare token for token.

Each kernel rounds where transformers rounds (to the activation dtype after the normalisation, after
the residual add), so bfloat16 results differ from the torch ops only by fused multiply-adds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x, residual, out, residual_out, weight, stride_x, stride_residual, stride_out,
                         stride_residual_out, hidden_size, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    inside = columns < hidden_size
    values = tl.load(x + row * stride_x + columns, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        values = values + tl.load(residual + row * stride_residual + columns, mask=inside, other=0.0)
        tl.store(residual_out + row * stride_residual_out + columns, values, mask=inside)
    values = values.to(tl.float32)
    inverse_rms = tl.rsqrt(tl.sum(values * values, axis=0) / hidden_size + eps)
    normalised = (values * inverse_rms).to(out.dtype.element_ty).to(tl.float32)
    scale = tl.load(weight + columns, mask=inside, other=0.0).to(tl.float32)
    tl.store(out + row * stride_out + columns, (normalised * scale).to(out.dtype.element_ty), mask=inside)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) for x [tokens, hidden]; residual None means x alone. `out` may be
    x itself (each program reads its whole row before it writes)."""
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(x) if residual is not None else x
    hidden_size = x.shape[-1]
    block = triton.next_power_of_2(hidden_size)
    _add_rms_norm_kernel[(x.shape[0],)](
        x, residual if residual is not None else x, out, residual_out, weight,
        x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0), residual_out.stride(0),
        hidden_size, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8),
    )
    return out, residual_out


@triton.jit
def _rotary_kernel(x, cos, sin, stride_token, stride_head, stride_cos, num_heads,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr, INTERLEAVED: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    pairs = tl.arange(0, HALF_PAD)[None, :]
    inside = (heads < num_heads) & (pairs < HALF)
    cosine = tl.load(cos + token * stride_cos + pairs, mask=pairs < HALF, other=0.0).to(tl.float32)
    sine = tl.load(sin + token * stride_cos + pairs, mask=pairs < HALF, other=0.0).to(tl.float32)
    rows = x + token * stride_token + heads * stride_head
    if INTERLEAVED:
        first = tl.load(rows + 2 * pairs, mask=inside, other=0.0).to(tl.float32)
        second = tl.load(rows + 2 * pairs + 1, mask=inside, other=0.0).to(tl.float32)
    else:
        first = tl.load(rows + pairs, mask=inside, other=0.0).to(tl.float32)
        second = tl.load(rows + HALF + pairs, mask=inside, other=0.0).to(tl.float32)
    # Written as [rotated firsts | rotated seconds] either way, as apply_rotary lays them out.
    tl.store(rows + pairs, (first * cosine - second * sine).to(x.dtype.element_ty), mask=inside)
    tl.store(rows + HALF + pairs, (second * cosine + first * sine).to(x.dtype.element_ty), mask=inside)


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """apply_rotary in place on x [tokens, heads, rotary_dim] (any token and head strides); returns x.

    Each program reads all of its token's pairs before writing, so the in-place interleaved case
    (whose output layout differs from its input's) is safe.
    """
    tokens, heads, rotary_dim = x.shape
    half = rotary_dim // 2
    _rotary_kernel[(tokens,)](
        x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads,
        HALF=half, HALF_PAD=triton.next_power_of_2(half), HEADS_PAD=triton.next_power_of_2(heads),
        INTERLEAVED=interleaved, num_warps=4,
    )
    return x


@triton.jit
def _silu_and_mul_kernel(gate_up, out, stride_in, stride_out, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < width
    gate = tl.load(gate_up + row * stride_in + columns, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row * stride_in + width + columns, mask=inside, other=0.0)
    activated = (gate * tl.sigmoid(gate)).to(out.dtype.element_ty)
    tl.store(out + row * stride_out + columns, activated * up, mask=inside)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [rows, 2 * width] holding [gate | up]."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, width)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(width, block))](gate_up, out, gate_up.stride(0), out.stride(0), width,
                                                           BLOCK=block, num_warps=4)
    return out
