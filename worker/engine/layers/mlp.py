"""The gated feed-forward (Llama, Qwen2, DeepSeek's dense layers and shared experts) and its activation."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from worker.engine.kernels import uses_fused_kernels
from worker.engine.layers.linear import packed_rows
from worker.engine.parallel import Shard


def activate_gate_up(gate_up: torch.Tensor, act_fn: nn.Module, is_silu: bool) -> torch.Tensor:
    """act(gate) * up for gate_up [..., 2 * width] holding [gate | up]: one fused kernel for SiLU on 16-bit GPU
    rows, transformers' two ops elsewhere."""
    if is_silu and uses_fused_kernels(gate_up) and gate_up.dim() == 2:
        from worker.engine.kernels.fused import silu_and_mul

        return silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), the feed-forward of Llama, Qwen2 and DeepSeek's dense layers.

    gate and up are one packed projection (one matrix product instead of two); checkpoints keep them
    apart and the loader fills the packed rows (`packed_projections`). Under tensor parallelism each rank
    holds a slice of the intermediate size: gate/up split by rows (column parallel), down by columns (row
    parallel), and the ranks' partial outputs are summed (`reduce_output`; off when the caller sums
    them with others, as the MoE layer does with its routed experts).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False,
                 shard: Shard = Shard(), reduce_output: bool = True):
        super().__init__()
        self.shard, self.reduce_output = shard, reduce_output
        local_size = shard.part(intermediate_size, "MLP intermediate rows")
        self.gate_up_proj = nn.Linear(hidden_size, 2 * local_size, bias=bias)
        self.down_proj = nn.Linear(local_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]
        self.is_silu = hidden_act == "silu"
        self.packed_projections = packed_rows(gate_up_proj=[("gate_proj", local_size), ("up_proj", local_size)])
        rows, columns = shard.rows(local_size), shard.rows(local_size, dim=1)
        self.checkpoint_slices = {"gate_proj.weight": rows, "gate_proj.bias": rows, "up_proj.weight": rows,
                                  "up_proj.bias": rows, "down_proj.weight": columns,
                                  "down_proj.bias": shard.first_rank_only()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.down_proj(activate_gate_up(self.gate_up_proj(x), self.act_fn, self.is_silu))
        return self.shard.all_reduce(output) if self.reduce_output else output
