"""Where and in what precision an engine runs: `auto` means the GPU in bf16 when there is one, else fp32 on the CPU."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def host_values_on(device: torch.device, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of host values (a list) on `device`, queued on the stream rather than waited for: torch's
    blocking copy to a GPU synchronizes the stream first, which would wait for a decode step launched ahead of
    this one and undo the overlap. From pinned memory the copy is asynchronous for the driver too (from
    pageable memory it may wait); torch's pinned-memory cache keeps the buffer until the copy has run."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
