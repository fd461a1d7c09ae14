"""DeepSeek V2 and V3: Multi-head Latent Attention over a latent KV cache; the mixture of experts is
worker/engine/layers/moe.py's.

Why MLA caches the latent: each token stores kv_lora_rank + qk_rope_head_dim numbers per layer (576 for
V3) instead of full keys and values for every head (~40k), which is what makes large decode batches fit.
Decode attends in the latent space ("absorbed" form: kv_b_proj's key half is folded into the query and
its value half applied to the output); prefill decompresses the gathered latents into per-head keys and
values, which is cheaper when many queries share one context.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PretrainedConfig

from worker.engine.kernels import fused_kernels_run
from worker.engine.layers.attention import AttentionMetadata, LatentAttention
from worker.engine.layers.linear import packed_rows
from worker.engine.layers.mlp import GatedMLP
from worker.engine.layers.moe import MixtureOfExperts, has_grouped_mm
from worker.engine.models.common import DecoderLayer, PagedCausalLM, RMSNorm, apply_rotary, apply_rotary_
from worker.engine.parallel import Shard


def softmax_scale(hf_config: PretrainedConfig) -> float:
    """qk_head_dim^-0.5, times yarn's mscale² when the rope is scaled with `mscale_all_dim`."""
    scale = (hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim) ** -0.5
    rope_parameters = hf_config.rope_parameters
    if rope_parameters.get("rope_type", "default") != "default" and rope_parameters.get("mscale_all_dim", 0):
        mscale = 0.1 * rope_parameters["mscale_all_dim"] * math.log(rope_parameters["factor"]) + 1.0
        if rope_parameters["factor"] > 1:
            scale = scale * mscale * mscale
    return scale


def uses_interleaved_rope(hf_config: PretrainedConfig) -> bool:
    """V2 rotates interleaved pairs (complex multiplication); V3 does when `rope_interleave` is set."""
    return hf_config.model_type == "deepseek_v2" or bool(getattr(hf_config, "rope_interleave", True))


class MultiHeadLatentAttention(nn.Module):
    """MLA's projections and rope around its attention over the latent cache (layers/attention.py).

    The two projections of the layer's input, the query's (q_proj, or q_a_proj where the query is compressed)
    and the latent's (kv_a_proj_with_mqa), are one packed matrix product (`q_and_kv_a_proj`), as vLLM and
    SGLang fuse them: in FP8 a decode step then quantizes the input once, not twice, and launches one GEMM
    instead of two (the latent's 576 columns alone filled too few SMs and needed split-K).

    Under tensor parallelism each rank computes its share of the heads: q_b_proj (q_proj), kv_b_proj and
    o_proj are split by heads, the low-rank projections before them are replicated, and so is the latent
    cache (every head reads the whole latent); o_proj's partial sums are added across ranks.
    """

    def __init__(self, hf_config: PretrainedConfig, shard: Shard = Shard()):
        super().__init__()
        self.shard = shard
        self.num_heads = shard.part(hf_config.num_attention_heads, "attention heads")
        self.q_lora_rank = hf_config.q_lora_rank
        self.kv_lora_rank = hf_config.kv_lora_rank
        self.qk_nope_head_dim = hf_config.qk_nope_head_dim
        self.qk_rope_head_dim = hf_config.qk_rope_head_dim
        self.v_head_dim = hf_config.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.interleaved_rope = uses_interleaved_rope(hf_config)
        hidden_size, bias = hf_config.hidden_size, bool(hf_config.attention_bias)
        if self.q_lora_rank is None and bias:
            raise ValueError("DeepSeek with attention_bias and no q_lora_rank (a query projection without a bias "
                             "beside a latent one with a bias) is not supported")
        query_projection = "q_proj" if self.q_lora_rank is None else "q_a_proj"
        self.query_rows = self.q_lora_rank or self.num_heads * self.qk_head_dim
        latent_rows = self.kv_lora_rank + self.qk_rope_head_dim
        self.q_and_kv_a_proj = nn.Linear(hidden_size, self.query_rows + latent_rows, bias=bias)
        self.packed_projections = packed_rows(
            q_and_kv_a_proj=[(query_projection, self.query_rows), ("kv_a_proj_with_mqa", latent_rows)])
        if self.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, hidden_size, bias=bias)
        query_heads = shard.rows(self.num_heads * self.qk_head_dim)
        self.checkpoint_slices = {
            "q_proj.weight": query_heads, "q_b_proj.weight": query_heads,
            "kv_b_proj.weight": shard.rows(self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)),
            "o_proj.weight": shard.rows(self.num_heads * self.v_head_dim, dim=1),
            "o_proj.bias": shard.first_rank_only()}
        self.attn = LatentAttention(self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim,
                                    self.v_head_dim, softmax_scale(hf_config))

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query, cache_entry = self.q_and_kv_a_proj(hidden).split(
            [self.query_rows, self.kv_lora_rank + self.qk_rope_head_dim], dim=-1)
        if self.q_lora_rank is not None:
            query = self.q_b_proj(self.q_a_layernorm(query))
        query = query.view(num_tokens, self.num_heads, self.qk_head_dim)
        query_nope, query_rope = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        # The cache entry [normalised latent | rotated key rope] is made where the projection wrote it, rather
        # than concatenated from the two afterwards.
        latent, key_rope = cache_entry.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        self.kv_a_layernorm.normalize_(latent)
        apply_rotary_(key_rope[:, None, :], cos, sin, self.interleaved_rope)
        query_rope = apply_rotary(query_rope, cos, sin, self.interleaved_rope)
        output = self.attn(query_nope, query_rope, cache_entry, self.kv_b_proj, metadata)
        return self.shard.all_reduce(self.o_proj(output.reshape(num_tokens, -1)))


class DeepseekForCausalLM(PagedCausalLM):
    """DeepSeek V2 or V3 (the first `first_k_dense_replace` layers dense, the rest MoE)."""

    def __init__(self, hf_config: PretrainedConfig, shard: Shard = Shard()):
        mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
        layers = []
        for layer_index in range(hf_config.num_hidden_layers):
            if layer_index >= hf_config.first_k_dense_replace:
                mlp = MixtureOfExperts(hf_config, shard)
            else:
                mlp = GatedMLP(hf_config.hidden_size, hf_config.intermediate_size, hf_config.hidden_act, mlp_bias,
                               shard)
            attention = MultiHeadLatentAttention(hf_config, shard)
            layers.append(DecoderLayer(attention, mlp, hf_config.hidden_size, hf_config.rms_norm_eps))
        super().__init__(hf_config, layers, rotary_dim=hf_config.qk_rope_head_dim, shard=shard)

    def supports_cuda_graphs(self, device: torch.device, dtype: torch.dtype) -> bool:
        """The MoE layers' fallback without a grouped GEMM (ours for 16 bits on a GPU, or torch's) asks the host
        for group sizes: no graphs then."""
        has_experts = self.config.num_hidden_layers > self.config.first_k_dense_replace
        return not has_experts or fused_kernels_run(device, dtype) or has_grouped_mm(device, dtype)

    def rank_part_of(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor | None]:
        """Routed experts go whole to the rank that owns them: a per-expert checkpoint tensor is renamed to
        its index among this rank's experts (None for another rank's), a stacked one [experts, ...] is cut
        to this rank's rows; every other tensor is sliced as the base class says."""
        if not self.shard.is_parallel:
            return name, tensor
        num_local = self.shard.part(self.config.n_routed_experts, "routed experts")
        first_local = self.shard.rank * num_local
        parts = name.split(".")
        at = parts.index("experts") + 1 if "experts" in parts[:-1] else 0
        if at and parts[at].isdigit():
            local_index = int(parts[at]) - first_local
            if not 0 <= local_index < num_local:
                return name, None
            return ".".join(parts[:at] + [str(local_index)] + parts[at + 1 :]), tensor
        if at and parts[-1].removesuffix("_scale_inv") in ("gate_up_proj", "down_proj"):
            return name, tensor[first_local : first_local + num_local]
        return super().rank_part_of(name, tensor)

    @staticmethod
    def checkpoint_expert_target(name: str) -> tuple[str, int, str] | None:
        """For a per-expert checkpoint name `...mlp.experts.<e>.<gate|up|down>_proj.weight`: the stacked
        parameter's name, the expert index, and which projection; None for every other name."""
        parts = name.split(".")
        if len(parts) < 4 or parts[-1] not in ("weight", "weight_scale_inv") or parts[-4] != "experts" \
                or not parts[-3].isdigit():
            return None
        projection = parts[-2]
        stacked = "down_proj" if projection == "down_proj" else "gate_up_proj"
        if parts[-1] == "weight_scale_inv":  # an FP8 checkpoint's block scales (layers/linear.py)
            stacked += "_scale_inv"
        return ".".join(parts[:-3] + [stacked]), int(parts[-3]), projection
