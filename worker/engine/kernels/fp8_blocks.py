"""DeepSeek-V3's FP8 weight format: float8_e4m3fn with one float32 scale per 128×128 block.

What both the FP8 layer (worker/engine/layers/linear.py) and its GEMM kernel (fp8_gemm.py) read and
write; pure torch, so each can import it without importing the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
SCALE_FLOOR = 1e-10  # the scale of an all-zero block


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype == FP8_DTYPE


def scale_shape(rows: int, columns: int) -> tuple[int, int]:
    return -(-rows // BLOCK), -(-columns // BLOCK)


def padded_blocks(weight: torch.Tensor) -> torch.Tensor:
    """weight [..., N, K] zero-padded to whole blocks and viewed as [..., N/128, 128, K/128, 128]."""
    rows, columns = weight.shape[-2:]
    block_rows, block_columns = scale_shape(rows, columns)
    padded = F.pad(weight, (0, block_columns * BLOCK - columns, 0, block_rows * BLOCK - rows))
    return padded.view(*weight.shape[:-2], block_rows, BLOCK, block_columns, BLOCK)


def quantize_weight_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [..., N, K], scale_inv [..., N/128, K/128] float32): each block's largest magnitude maps to 448."""
    rows, columns = weight.shape[-2:]
    blocks = padded_blocks(weight.float())
    scale = (blocks.abs().amax(dim=(-3, -1), keepdim=True) / FP8_MAX).clamp(min=SCALE_FLOOR)
    quantized = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    block_rows, block_columns = scale_shape(rows, columns)
    quantized = quantized.view(*weight.shape[:-2], block_rows * BLOCK, block_columns * BLOCK)[..., :rows, :columns]
    return quantized.contiguous(), scale.view(*weight.shape[:-2], block_rows, block_columns)


def dequantize_blocks(weight: torch.Tensor, weight_scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The FP8 weight [..., N, K] times its block scales, in `dtype`."""
    rows, columns = weight.shape[-2:]
    scale = weight_scale_inv.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return (weight.float() * scale[..., :rows, :columns]).to(dtype)
