"""Qwen2 and Llama (the DeepSeek-R1-Distill family): grouped-query attention with rope over the paged cache.

The two differ only in biases: Qwen2 always has q/k/v biases and none on o_proj; Llama follows
`attention_bias` for all four and `mlp_bias` for the feed-forward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from worker.engine.layers.attention import Attention, AttentionMetadata
from worker.engine.layers.linear import packed_rows
from worker.engine.layers.mlp import GatedMLP
from worker.engine.models.common import DecoderLayer, PagedCausalLM, apply_rotary
from worker.engine.parallel import Shard, TensorParallelError, TensorSlice


def head_dim_of(hf_config: PretrainedConfig) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def kv_heads_of_rank(num_kv_heads: int, shard: Shard) -> tuple[int, int]:
    """(first KV head, KV heads) a rank keeps: its share when there are at least as many KV heads as
    ranks; otherwise the one KV head its query heads read, replicated on the ranks that share it."""
    if num_kv_heads >= shard.size:
        count = shard.part(num_kv_heads, "key/value heads")
        return shard.rank * count, count
    if shard.size % num_kv_heads:
        raise TensorParallelError(f"tensor_parallel_size={shard.size} is neither a divisor nor a multiple of the "
                                  f"model's {num_kv_heads} key/value heads")
    return shard.rank * num_kv_heads // shard.size, 1


class GroupedQueryAttention(nn.Module):
    """The query, key and value projections, rope, and the output projection around the paged attention
    layer (which caches each token's key and value per KV head). The query, key and value projections are one packed matrix product (`qkv_proj`). Under tensor parallelism each rank
    computes its share of the query heads with the KV heads they read; o_proj's partial sums are added
    across ranks."""

    def __init__(self, hf_config: PretrainedConfig, shard: Shard = Shard()):
        super().__init__()
        self.shard = shard
        self.num_heads = shard.part(hf_config.num_attention_heads, "attention heads")
        first_kv_head, self.num_kv_heads = kv_heads_of_rank(hf_config.num_key_value_heads, shard)
        self.head_dim = head_dim_of(hf_config)
        is_qwen2 = hf_config.model_type == "qwen2"
        qkv_bias = True if is_qwen2 else bool(getattr(hf_config, "attention_bias", False))
        output_bias = False if is_qwen2 else bool(getattr(hf_config, "attention_bias", False))
        hidden_size = hf_config.hidden_size
        query_rows, key_value_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, query_rows + 2 * key_value_rows, bias=qkv_bias)
        self.packed_projections = packed_rows(
            qkv_proj=[("q_proj", query_rows), ("k_proj", key_value_rows), ("v_proj", key_value_rows)])
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=output_bias)
        query_slice = shard.rows(query_rows)
        key_value_slice = TensorSlice(0, first_kv_head * self.head_dim, key_value_rows)
        self.checkpoint_slices = {
            "q_proj.weight": query_slice, "q_proj.bias": query_slice, "k_proj.weight": key_value_slice,
            "k_proj.bias": key_value_slice, "v_proj.weight": key_value_slice, "v_proj.bias": key_value_slice,
            "o_proj.weight": shard.rows(query_rows, dim=1), "o_proj.bias": shard.first_rank_only()}
        self.attn = Attention(self.num_kv_heads, self.head_dim, scale=self.head_dim**-0.5)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query, key, value = self.qkv_proj(hidden).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1)
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        query = apply_rotary(query, cos, sin, interleaved=False)
        key = apply_rotary(key, cos, sin, interleaved=False)
        output = self.attn(query, key, value, metadata)
        return self.shard.all_reduce(self.o_proj(output.view(num_tokens, -1)))


class Qwen2ForCausalLM(PagedCausalLM):
    """Qwen2 or Llama, named like transformers' `*ForCausalLM` so its checkpoints load unchanged."""

    def __init__(self, hf_config: PretrainedConfig, shard: Shard = Shard()):
        mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
        layers = [
            DecoderLayer(
                GroupedQueryAttention(hf_config, shard),
                GatedMLP(hf_config.hidden_size, hf_config.intermediate_size, hf_config.hidden_act, mlp_bias, shard),
                hf_config.hidden_size,
                hf_config.rms_norm_eps,
            )
            for _ in range(hf_config.num_hidden_layers)
        ]
        super().__init__(hf_config, layers, rotary_dim=head_dim_of(hf_config), shard=shard)
