"""Linear projections in FP8 with 128×128 block scales, as DeepSeek-V3 publishes its weights.

An `Fp8Linear` holds `weight` in float8_e4m3fn [out, in] and `weight_scale_inv` in float32
[ceil(out/128), ceil(in/128)] (weight ≈ fp8 · scale per block), the names and layout of DeepSeek-V3's
checkpoint, so its tensors load by name. A partial last block (576 = 4.5 × 128 rows) has its own
scale like any other, so any shape works, including a tensor-parallel shard. On a GPU the product
runs in the block-scaled FP8 kernel (worker/engine/kernels/fp8_gemm.py) with activations quantized
per token in groups of 128; on the CPU the weight is dequantized and multiplied as it is. The CPU keeps
the dequantized copy between steps (converting float8 on a CPU runs at ~50M elements/s, seconds per
step for a 135M model), dropped when the weight is written again: the CPU path is for tests.

Models are built with plain `nn.Linear`s; `quantize_linears` swaps them afterwards: on the meta
device before an FP8 checkpoint loads (shapes only), or on loaded weights for `--quantization fp8`.
Kept in 16 bits, as in DeepSeek-V3's checkpoint: the LM head, and MLA's kv_b_proj, whose weight the
attention reads directly to fold into queries and outputs (a checkpoint's FP8 kv_b_proj is
dequantized at load). Embeddings, norms and the router are not `nn.Linear`s and stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.kernels.fp8_blocks import (
    BLOCK,
    dequantize_blocks,
    is_fp8,
    quantize_weight_blocks,
    scale_shape,
)

KEPT_LINEAR_NAMES = ("lm_head", "kv_b_proj")


def dequantized(module: nn.Module, weight_name: str, dtype: torch.dtype) -> torch.Tensor:
    """`module.<weight_name>` dequantized with `<weight_name>_scale_inv`, kept until either is written again
    (their version counters move) or another dtype is asked for."""
    weight, weight_scale_inv = getattr(module, weight_name), getattr(module, weight_name + "_scale_inv")
    key = (weight_name, dtype, weight._version, weight_scale_inv._version)
    cache = module.__dict__.setdefault("_dequantized_cache", {})
    if cache.get(weight_name, (None,))[0] != key:
        cache[weight_name] = (key, dequantize_blocks(weight, weight_scale_inv, dtype))
    return cache[weight_name][1]


def fp8_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class Fp8Linear(nn.Module):
    """y = x · dequant(weight)ᵀ + bias, with weight FP8 block-scaled (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if weight_scale_inv.shape != scale_shape(*weight.shape):
            raise ValueError(f"weight_scale_inv of shape {tuple(weight_scale_inv.shape)} does not fit a weight "
                             f"of shape {tuple(weight.shape)} in {BLOCK}×{BLOCK} blocks")
        self.weight = fp8_parameter(weight)
        self.weight_scale_inv = fp8_parameter(weight_scale_inv)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """The linear's weight quantized (shapes only on the meta device); its bias kept."""
        weight, weight_scale_inv = quantize_weight_blocks(linear.weight.detach())
        return cls(weight, weight_scale_inv, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from worker.engine.kernels.fp8_gemm import fp8_linear

            return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)
        return F.linear(x, dequantized(self, "weight", x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 {BLOCK}x{BLOCK} blocks"


def quantize_stacked_experts(module: nn.Module, experts_at_once: int = 16) -> None:
    """Each stacked expert weight [experts, N, K] named in `module.expert_weight_names` becomes FP8, with
    `<name>_scale_inv` [experts, N/128, K/128] beside it. Quantized `experts_at_once` experts at a time: the
    float32 working copies of DeepSeek-V3's 256 experts at once (45 GB a layer) do not fit beside them."""
    for name in module.expert_weight_names:
        weight = getattr(module, name).detach()
        parts = [quantize_weight_blocks(weight[first:first + experts_at_once])
                 for first in range(0, weight.shape[0], experts_at_once)]
        setattr(module, name, fp8_parameter(torch.cat([part[0] for part in parts])))
        setattr(module, f"{name}_scale_inv", fp8_parameter(torch.cat([part[1] for part in parts])))


@torch.no_grad()
def quantize_linears(model: nn.Module) -> nn.Module:
    """Swaps every `nn.Linear` (but KEPT_LINEAR_NAMES) for an `Fp8Linear` and makes stacked experts FP8, in
    place, one module at a time so that only one 16-bit weight is copied at once."""
    for module in list(model.modules()):
        if hasattr(module, "expert_weight_names") and not is_fp8(getattr(module, module.expert_weight_names[0])):
            quantize_stacked_experts(module)
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name not in KEPT_LINEAR_NAMES:
                setattr(module, child_name, Fp8Linear.from_linear(child))
    return model


def packed_rows(**packed: list[tuple[str, int]]) -> dict[str, tuple[str, int, int]]:
    """Where each checkpoint projection lives in a packed one: {name: (packed name, first row, rows)}."""
    where = {}
    for packed_name, shards in packed.items():
        first_row = 0
        for name, rows in shards:
            where[name] = (packed_name, first_row, rows)
            first_row += rows
    return where
