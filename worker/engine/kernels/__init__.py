"""Triton kernels of the GPU path: paged attention and fused elementwise steps. Imported only on a GPU
(or under Triton's interpreter in tests), so a CPU install needs no Triton; this package's own module says
only where they run, and imports no Triton."""

from __future__ import annotations

import torch


def uses_fused_kernels(tensor: torch.Tensor) -> bool:
    """16-bit activations on the GPU take the fused Triton kernels (worker/engine/kernels/fused.py); the CPU
    and float32 keep transformers' op-for-op torch code."""
    return fused_kernels_run(tensor.device, tensor.dtype)


def fused_kernels_run(device: torch.device, dtype: torch.dtype) -> bool:
    """uses_fused_kernels for a model's device and dtype, before any tensor exists."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
