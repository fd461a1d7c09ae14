"""DeepSeek's mixture of experts: the router, the routed experts (stacked weights, grouped products, expert
parallel) and the layer that adds the shared expert.

Routing follows transformers 5.23 exactly: V3 scores experts with a sigmoid, adds
`e_score_correction_bias` for the choice only, limits the choice to the `topk_group` best of `n_group`
groups (a group scores the sum of its two best experts), optionally renormalises and scales by
`routed_scaling_factor`. V2 scores with a softmax and picks greedily (or per group by the group's best
expert with `group_limited_greedy`), then scales; transformers' V2 does not renormalise.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from worker.engine.kernels import uses_fused_kernels
from worker.engine.kernels.fp8_blocks import is_fp8
from worker.engine.layers.linear import dequantized
from worker.engine.layers.mlp import GatedMLP, activate_gate_up
from worker.engine.parallel import Shard

# torch.mm's out_dtype (a 16-bit product written in float32) came with torch 2.8.
MM_HAS_OUT_DTYPE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 8)


class TopKRouter(nn.Module):
    """Picks each token's experts and their weights (float32), as transformers' V2/V3 routers do."""

    def __init__(self, hf_config: PretrainedConfig):
        super().__init__()
        self.is_v3 = hf_config.model_type == "deepseek_v3"
        self.num_experts = hf_config.n_routed_experts
        self.top_k = hf_config.num_experts_per_tok
        self.num_groups = hf_config.n_group or 1
        self.top_k_groups = hf_config.topk_group or self.num_groups
        self.topk_method = getattr(hf_config, "topk_method", None)
        self.norm_topk_prob = bool(hf_config.norm_topk_prob)
        self.routed_scaling_factor = hf_config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, hf_config.hidden_size))
        if self.is_v3:
            self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [tokens, top_k] float32, expert ids [tokens, top_k])."""
        router_logits = self._logits(hidden)
        if self.is_v3:
            return self._route_v3(router_logits)
        return self._route_v2(router_logits)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits, as transformers computes them from float32 copies. On a GPU with weights in the
        activations' 16-bit dtype, one GEMM writes float32 directly: 16-bit products are exact in float32 and
        both accumulate in float32, so only the order of the sums differs, and the copies (a cast of the
        activations and a SIMT float32 GEMM, 0.4 ms of a V2-Lite decode step at batch 512) are gone."""
        if (MM_HAS_OUT_DTYPE and hidden.is_cuda and hidden.dim() == 2
                and hidden.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype == hidden.dtype):
            return torch.mm(hidden, self.weight.t(), out_dtype=torch.float32)
        return nn.functional.linear(hidden.float(), self.weight.float())

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[tokens, experts] True for the experts of each token's `topk_group` best groups."""
        best_groups = torch.topk(group_scores, k=self.top_k_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1)
        experts_per_group = self.num_experts // self.num_groups
        expert_mask = group_mask.unsqueeze(-1).expand(-1, self.num_groups, experts_per_group)
        return expert_mask.reshape(-1, self.num_experts).bool()

    def _route_v3(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = router_logits.sigmoid()
        scores_for_choice = scores + self.e_score_correction_bias.float()
        if self.num_groups > 1:
            grouped = scores_for_choice.view(-1, self.num_groups, self.num_experts // self.num_groups)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            scores_for_choice = scores_for_choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
        expert_ids = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, expert_ids

    def _route_v2(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
        if self.topk_method == "group_limited_greedy":
            grouped = scores.view(-1, self.num_groups, self.num_experts // self.num_groups)
            scores = scores.masked_fill(~self._group_mask(grouped.max(dim=-1).values), 0.0)
        weights, expert_ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return weights * self.routed_scaling_factor, expert_ids


def has_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """torch's grouped GEMM runs on the CPU, and on the GPU in bfloat16 (Hopper's grouped kernels)."""
    return hasattr(torch, "_grouped_mm") and (device.type == "cpu" or dtype == torch.bfloat16)


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, rows_per_expert: torch.Tensor) -> torch.Tensor:
    """rows [N, in] sorted by expert times weights [experts, in, out] → [N, out], one GEMM per group.

    Rows past the last group (another rank's pairs, under expert parallelism) are not computed: their
    output rows hold whatever the memory held. torch's grouped GEMM does this in one call, with no host
    synchronisation (so a CUDA graph can hold it); where it is missing, rows are padded into a dense
    [experts, most rows, in] block for one batched matmul, which needs the largest group's size on the host.
    """
    if has_grouped_mm(rows.device, rows.dtype):
        offsets = torch.cumsum(rows_per_expert, dim=0, dtype=torch.int32)
        return torch._grouped_mm(rows, weights, offs=offsets)
    num_experts = weights.shape[0]
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=rows.device), rows_per_expert)
    num_grouped = expert_of_row.shape[0]
    group_starts = torch.cumsum(rows_per_expert, dim=0) - rows_per_expert
    position_in_group = torch.arange(num_grouped, device=rows.device) - group_starts[expert_of_row]
    most_rows = int(rows_per_expert.max()) if num_grouped else 0
    padded = rows.new_zeros(num_experts, most_rows, rows.shape[1])
    padded[expert_of_row, position_in_group] = rows[:num_grouped]
    out = rows.new_empty(rows.shape[0], weights.shape[2])
    out[:num_grouped] = torch.bmm(padded, weights)[expert_of_row, position_in_group]
    return out


class RoutedExperts(nn.Module):
    """All routed experts' weights as stacked tensors, named like transformers' in-memory layout.

    gate_up_proj: [experts, 2 * moe_intermediate, hidden] (gate rows first); down_proj: [experts, hidden,
    moe_intermediate]. Token-expert pairs are sorted by expert so that each expert runs one GEMM. In FP8
    (worker/engine/layers/linear.py) both are float8_e4m3fn with `<name>_scale_inv` [experts, N/128, K/128].
    Under expert parallelism a pair may carry the id `experts` (one past the last) and weight zero: it was
    routed to another rank's experts and adds nothing here.
    """

    expert_weight_names = ("gate_up_proj", "down_proj")

    def __init__(self, hf_config: PretrainedConfig, experts_in_model: int | None = None):
        super().__init__()
        num_experts, hidden_size = hf_config.n_routed_experts, hf_config.hidden_size
        # Every rank's experts: under expert parallelism each pair still goes to one of these, so a step's
        # mean rows an expert is its pairs over this count, not over this rank's experts.
        self.experts_in_model = experts_in_model or num_experts
        intermediate_size = hf_config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hf_config.hidden_act]
        self.is_silu = hf_config.hidden_act == "silu"

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        if uses_fused_kernels(hidden):
            return self._fused_forward(hidden, expert_ids, expert_weights)
        return self._torch_forward(hidden, expert_ids, expert_weights)

    def _torch_forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                       expert_weights: torch.Tensor) -> torch.Tensor:
        top_k, num_experts = expert_ids.shape[1], self.gate_up_proj.shape[0]
        # Another rank's pairs are multiplied by the last expert and weighted zero: rows wasted, but this path
        # serves only the CPU and float32, and needs no count from the host.
        flat_expert_ids = expert_ids.flatten().clamp(max=num_experts - 1)
        pair_order = torch.argsort(flat_expert_ids, stable=True)
        token_of_pair = pair_order // top_k
        # Counted with index_add_ rather than bincount, which asks the host for the largest id.
        rows_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=hidden.device)
        rows_per_expert.index_add_(0, flat_expert_ids, torch.ones_like(flat_expert_ids))
        gate_up = self._project(hidden[token_of_pair], "gate_up_proj", rows_per_expert)
        gate, up = gate_up.chunk(2, dim=-1)
        expert_output = self._project(self.act_fn(gate) * up, "down_proj", rows_per_expert)
        expert_output = expert_output * expert_weights.flatten()[pair_order, None]
        return torch.zeros_like(hidden).index_add_(0, token_of_pair, expert_output.to(hidden.dtype))

    def _fused_forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                       expert_weights: torch.Tensor) -> torch.Tensor:
        """The same on the GPU with worker/engine/kernels/moe.py's sort and combine around the GEMMs."""
        from worker.engine.kernels.moe import combine_expert_outputs, sort_pairs_by_expert

        num_experts = self.gate_up_proj.shape[0]
        # Another rank's pairs (id num_experts) sort after every group: no GEMM computes their rows, and the
        # combine, which skips pairs of weight zero, never reads them.
        sorted_position, token_of_row, rows_per_group = sort_pairs_by_expert(expert_ids, num_experts + 1)
        rows_per_expert = rows_per_group[:num_experts]
        if is_fp8(self.gate_up_proj) and hidden.is_cuda:
            expert_output = self._fp8_products(hidden, token_of_row, rows_per_expert)
        else:
            gate_up = self._project(hidden[token_of_row], "gate_up_proj", rows_per_expert)
            expert_output = self._project(activate_gate_up(gate_up, self.act_fn, self.is_silu), "down_proj",
                                          rows_per_expert)
        return combine_expert_outputs(expert_output, sorted_position, expert_weights)

    def _fp8_products(self, hidden: torch.Tensor, token_of_row: torch.Tensor,
                      rows_per_expert: torch.Tensor) -> torch.Tensor:
        """Both FP8 products on the GPU, with what they share made once: the tokens quantized before their
        rows are gathered (a row's quantization is the same wherever it goes: 6× fewer rows to quantize at
        top-6), one tile map for both products, and SiLU's output quantized as it is made: in gate_up's own
        kernel where its tiles allow (fuses_gate_up), else in the kernel after it."""
        from worker.engine.kernels.fp8_gemm import QuantizedRows, quantize_per_token_group, quantize_silu_and_mul
        from worker.engine.kernels.grouped_gemm import (expert_tiles, fp8_gate_up_silu, fp8_grouped_linear,
                                                        fuses_gate_up, grouped_tiles)

        values, scales = quantize_per_token_group(hidden)
        rows = QuantizedRows(values[token_of_row], scales[token_of_row], hidden.dtype)
        num_rows = token_of_row.shape[0]
        config = grouped_tiles(num_rows // self.gate_up_proj.shape[0])
        tiles = expert_tiles(rows_per_expert, num_rows, config.block_m)
        gate_up_weights = (self.gate_up_proj, self.gate_up_proj_scale_inv, rows_per_expert, config, tiles)
        if self.is_silu and fuses_gate_up(config, self.gate_up_proj.shape[1] // 2):
            activated = fp8_gate_up_silu(rows, *gate_up_weights)
        else:
            gate_up = fp8_grouped_linear(rows, *gate_up_weights)
            activated = (quantize_silu_and_mul(gate_up) if self.is_silu
                         else activate_gate_up(gate_up, self.act_fn, self.is_silu))
        return fp8_grouped_linear(activated, self.down_proj, self.down_proj_scale_inv, rows_per_expert, config, tiles)

    def _project(self, rows: torch.Tensor, weight_name: str, rows_per_expert: torch.Tensor) -> torch.Tensor:
        """rows sorted by expert times each one's stacked weight: on a GPU the grouped kernel (FP8, or 16-bit
        where the fused kernels run); elsewhere torch's grouped GEMM, of the dequantized weights for FP8."""
        weight = getattr(self, weight_name)
        if is_fp8(weight):
            if rows.is_cuda:
                from worker.engine.kernels.grouped_gemm import fp8_grouped_linear

                return fp8_grouped_linear(rows, weight, getattr(self, f"{weight_name}_scale_inv"), rows_per_expert)
            return grouped_matmul(rows, dequantized(self, weight_name, rows.dtype).transpose(1, 2), rows_per_expert)
        if uses_fused_kernels(rows):
            from worker.engine.kernels.grouped_gemm import GROUPED_16_BIT_MAX_ROWS, grouped_linear

            few_rows = rows.shape[0] <= GROUPED_16_BIT_MAX_ROWS * self.experts_in_model
            if few_rows or not has_grouped_mm(rows.device, rows.dtype):
                return grouped_linear(rows, weight, rows_per_expert)
        return grouped_matmul(rows, weight.transpose(1, 2), rows_per_expert)


class MixtureOfExperts(nn.Module):
    """Routed experts plus the shared expert(s). Under tensor parallelism the routed experts are split whole
    across ranks (expert parallel: rank r owns experts [r·E/N, (r+1)·E/N)); every rank routes every token
    and computes its own experts' share. The shared expert is split like a dense MLP (tensor parallel)
    rather than run on one rank: it runs for every token, so splitting it spreads its weights and its
    work evenly and leaves no rank waiting on another. Both partial outputs are summed locally and
    added across ranks in one all-reduce.
    """

    def __init__(self, hf_config: PretrainedConfig, shard: Shard = Shard()):
        super().__init__()
        self.shard = shard
        self.gate = TopKRouter(hf_config)
        self.num_local_experts = shard.part(hf_config.n_routed_experts, "routed experts")
        self.first_local_expert = shard.rank * self.num_local_experts
        local_config = hf_config
        if shard.is_parallel:  # RoutedExperts sizes itself from the config: give it this rank's count
            local_config = copy.copy(hf_config)
            local_config.n_routed_experts = self.num_local_experts
        self.experts = RoutedExperts(local_config, experts_in_model=hf_config.n_routed_experts)
        num_shared = hf_config.n_shared_experts or 0
        self.shared_experts = (
            GatedMLP(
                hf_config.hidden_size,
                hf_config.moe_intermediate_size * num_shared,
                hf_config.hidden_act,
                bool(getattr(hf_config, "mlp_bias", False)),
                shard,
                reduce_output=False,
            )
            if num_shared
            else None
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        expert_weights, expert_ids = self.gate(hidden)
        if self.shard.is_parallel:
            expert_ids, expert_weights = self._this_ranks_pairs(expert_ids, expert_weights)
        output = self.experts(hidden, expert_ids, expert_weights)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden)
        return self.shard.all_reduce(output)

    def _this_ranks_pairs(self, expert_ids: torch.Tensor,
                          expert_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token-expert pair, with its expert's index among this rank's experts; a pair routed to another
        rank gets the index `num_local_experts` and weight zero, which RoutedExperts leaves out. The shapes do
        not depend on the routing, so a CUDA graph holds them, and no rank multiplies another's rows."""
        local_ids = expert_ids - self.first_local_expert
        is_local = (local_ids >= 0) & (local_ids < self.num_local_experts)
        return (torch.where(is_local, local_ids, self.num_local_experts),
                torch.where(is_local, expert_weights, 0.0))
