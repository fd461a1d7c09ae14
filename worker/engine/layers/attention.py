"""Attention over the paged KV cache, in one place: storing each step's new entries and choosing the back-end.

Models compute their queries and cache entries and hand them to a layer here (`Attention` for grouped-query
attention, `LatentAttention` for DeepSeek's MLA), as nano-vllm's layers/attention.py does; no model file
asks which back-end runs. The back-ends:
- the paged Triton kernel (worker/engine/kernels/paged_attention.py), which reads the cache through the
  block tables: on a GPU, and on the CPU under Triton's interpreter (tests). CUDA graphs capture decode
  steps of this back-end (worker/engine/gpu_runner.py);
- the torch fallback, which gathers each group's cache slots into dense tensors and calls torch's
  scaled_dot_product_attention: the CPU's, and the reference for greedy parity with transformers.
`choose_backend` picks one for an engine; the runner then describes each step for it in `AttentionMetadata`
(`paged_groups` for the kernel, `groups` for the fallback), which is what a layer follows.

The model runner describes one step as a flat list of new tokens plus `AttentionMetadata`: where each new
token's entry goes in the cache (`slot_mapping`) and, per group, which cache slots each sequence reads.
Sequences are split into a decode group (one new token each) and a prefill group (several), so that a step
mixing a long prompt with many decodes does not pad every decode to the prompt's length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionGroup:
    """Sequences of one step whose queries are padded to the same length (the torch fallback).

    query_token_indices: [sequences, max_query_len] index of each query token in the step's flat tokens;
        padding repeats the sequence's last token so that every row stays finite.
    query_is_real: [sequences, max_query_len] False on padding.
    key_slots: [sequences, max_context_len] flat cache slot of each context position (padding reads slot 0).
    attend_mask: [sequences, max_query_len, max_context_len] True where a query may see a key (causal).
    real_query_token_indices: the flat token index of every real query, in row-major order.
    """

    query_token_indices: torch.Tensor
    query_is_real: torch.Tensor
    key_slots: torch.Tensor
    attend_mask: torch.Tensor
    real_query_token_indices: torch.Tensor
    is_decode: bool


@dataclass
class PagedGroup:
    """Sequences of one step attended by one launch of the paged-attention kernel.

    Per sequence (int32, on the device): where its new tokens start in the step's flat tokens, how
    many there are, how many positions its context holds once they are in, and its block table
    [sequences, most blocks]. `max_query_len` (a host int) sizes the launch grid.
    """

    query_starts: torch.Tensor
    query_lens: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int


@dataclass
class AttentionMetadata:
    """How a step's new tokens meet the cache: the dense `groups` (fallback) or the kernel's `paged_groups`."""

    slot_mapping: torch.Tensor  # [tokens] flat cache slot where each new token's entry is written
    groups: list[AttentionGroup] = field(default_factory=list)
    paged_groups: list[PagedGroup] = field(default_factory=list)
    block_size: int = 16

    @property
    def uses_paged_kernel(self) -> bool:
        return bool(self.paged_groups)


@dataclass(frozen=True)
class AttentionBackend:
    paged_kernel: bool  # the Triton kernel over the block tables; False: the torch fallback
    cuda_graphs: bool  # decode steps replayed from CUDA graphs (paged kernel on a GPU only)


def choose_backend(use_paged_kernel: bool | None, use_cuda_graphs: bool, device: torch.device) -> AttentionBackend:
    """The paged kernel on a GPU unless told otherwise (True on the CPU needs TRITON_INTERPRET=1: tests);
    CUDA graphs where asked for and the kernel runs on a GPU."""
    paged_kernel = device.type == "cuda" if use_paged_kernel is None else use_paged_kernel
    return AttentionBackend(paged_kernel, paged_kernel and use_cuda_graphs and device.type == "cuda")


def write_kv_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, new_entries: torch.Tensor) -> None:
    """Stores each new token's entry [tokens, ...] at its slot of a cache [blocks, block_size, ...]."""
    cache.view(-1, *cache.shape[2:])[slot_mapping] = new_entries.to(cache.dtype)


def gather_kv_cache(cache: torch.Tensor, key_slots: torch.Tensor) -> torch.Tensor:
    """The cache entries [sequences, context, ...] at `key_slots` [sequences, context]."""
    return cache.view(-1, *cache.shape[2:])[key_slots]


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attend_mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked attention: query [seqs, q, heads, d], key/value [seqs, ctx, kv_heads, d] → [seqs, q, heads, dv]."""
    output = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=attend_mask[:, None, :, :],
        scale=scale,
        enable_gqa=query.shape[2] != key.shape[2],
    )
    return output.transpose(1, 2)


def attend_each_group(
    query: torch.Tensor,
    metadata: AttentionMetadata,
    group_attention: Callable[[torch.Tensor, AttentionGroup], torch.Tensor],
    output_head_dim: int,
) -> torch.Tensor:
    """Runs `group_attention` on each group's padded queries and scatters the real rows back to [tokens, ...]."""
    output = query.new_empty(query.shape[0], query.shape[1], output_head_dim)
    for group in metadata.groups:
        group_output = group_attention(query[group.query_token_indices], group)
        output[group.real_query_token_indices] = group_output[group.query_is_real]
    return output


def attend_paged(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    metadata: AttentionMetadata,
    scale: float,
    key_dim_a: int,
    value_dim: int,
) -> torch.Tensor:
    """Attention of query [tokens, heads, dim] over the paged cache, one kernel launch per paged group.

    key_cache / value_cache: [blocks, block_size, kv_heads, dim] views; value_cache None means the
    values are the keys' first `value_dim` dimensions (MLA's latent). `key_dim_a` splits the key
    dimensions into two power-of-two parts (MLA: latent | rope); the whole dimension otherwise.
    """
    from worker.engine.kernels.paged_attention import paged_attention  # needs Triton

    output = query.new_empty(query.shape[0], query.shape[1], value_dim)
    for group in metadata.paged_groups:
        paged_attention(
            query, key_cache, value_cache, output, group.block_tables, group.query_starts, group.query_lens,
            group.context_lens, group.max_query_len, scale, metadata.block_size, key_dim_a, value_dim,
        )
    return output


class PagedAttention(nn.Module):
    """A layer's share of the KV cache: what one token stores (`kv_cache_entry_shape`) and the cache tensor
    [blocks, block_size, *entry shape] the model hands it (`PagedCausalLM.allocate_kv_cache`). No parameters,
    so checkpoints name the projections of the model's attention module as before."""

    def __init__(self, kv_cache_entry_shape: tuple[int, ...], scale: float):
        super().__init__()
        self.kv_cache_entry_shape = kv_cache_entry_shape
        self.scale = scale
        self.kv_cache: torch.Tensor | None = None

    def store(self, new_entries: torch.Tensor, metadata: AttentionMetadata) -> None:
        write_kv_cache(self.kv_cache, metadata.slot_mapping, new_entries)

    def gather(self, group: AttentionGroup) -> torch.Tensor:
        return gather_kv_cache(self.kv_cache, group.key_slots)


class Attention(PagedAttention):
    """Grouped-query (or multi-head) attention; a token's entry is its key and value per KV head,
    [2, kv_heads, head_dim]."""

    def __init__(self, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__((2, num_kv_heads, head_dim), scale)
        self.head_dim = head_dim

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """query [tokens, heads, head_dim], key/value [tokens, kv_heads, head_dim] → [tokens, heads, head_dim]."""
        self.store(torch.stack((key, value), dim=1), metadata)
        if metadata.uses_paged_kernel:
            key_cache, value_cache = self.kv_cache[:, :, 0], self.kv_cache[:, :, 1]
            return attend_paged(query, key_cache, value_cache, metadata, self.scale, self.head_dim, self.head_dim)
        return attend_each_group(query, metadata, self._attend_group, self.head_dim)

    def _attend_group(self, group_query: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        keys, values = self.gather(group).unbind(dim=2)
        return attend(group_query, keys, values, group.attend_mask, self.scale)


class LatentAttention(PagedAttention):
    """DeepSeek's Multi-head Latent Attention over its latent cache; a token's entry is
    [kv_lora_rank normalised latent | qk_rope_head_dim rotated key], shared by every head.

    The paged kernel and the fallback's decodes attend in latent space (the "absorbed" form: kv_b_proj's key
    half folded into the query, its value half applied to the output), reading the latent once for all
    heads. The fallback's prefills decompress the gathered latents into per-head keys and values, as
    transformers does, which is cheaper when many queries share one context.
    """

    def __init__(self, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 scale: float):
        super().__init__((kv_lora_rank + qk_rope_head_dim,), scale)
        self.kv_lora_rank, self.v_head_dim = kv_lora_rank, v_head_dim
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim

    def forward(self, query_nope: torch.Tensor, query_rope: torch.Tensor, cache_entry: torch.Tensor,
                kv_b_proj: nn.Linear, metadata: AttentionMetadata) -> torch.Tensor:
        """query_* [tokens, heads, dim], cache_entry [tokens, kv_lora_rank + rope dim] (normalised latent and
        rotated key); kv_b_proj the up-projection [heads × (nope + v), kv_lora_rank] → [tokens, heads, v_head_dim]."""
        self.store(cache_entry, metadata)
        if metadata.uses_paged_kernel:
            return self._attend_paged(query_nope, query_rope, kv_b_proj, metadata)
        query = torch.cat((query_nope, query_rope), dim=-1)

        def attend_group(group_query: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
            cached = self.gather(group)  # [sequences, context, lora + rope]
            if group.is_decode:
                return self._attend_absorbed(group_query, cached, kv_b_proj, group.attend_mask)
            return self._attend_decompressed(group_query, cached, kv_b_proj, group.attend_mask)

        return attend_each_group(query, metadata, attend_group, self.v_head_dim)

    def _up_projections(self, kv_b_proj: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's key half [heads, nope, lora] and value half [heads, v, lora]."""
        up_projection = kv_b_proj.weight.view(-1, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        key_up, value_up = up_projection.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        return key_up, value_up

    def _attend_paged(self, query_nope: torch.Tensor, query_rope: torch.Tensor, kv_b_proj: nn.Linear,
                      metadata: AttentionMetadata) -> torch.Tensor:
        """The absorbed form for every query, decode and prefill alike: the latent cache is read once per
        sequence for all heads, and never decompressed."""
        key_up, value_up = self._up_projections(kv_b_proj)
        # [heads, tokens, lora | rope], filled in place: the latent product written into its columns and the
        # rope copied beside it, instead of a concatenation of both (which read and wrote the latent again).
        num_tokens, num_heads = query_nope.shape[:2]
        absorbed = query_nope.new_empty(num_heads, num_tokens, self.kv_lora_rank + self.qk_rope_head_dim)
        torch.bmm(query_nope.transpose(0, 1), key_up, out=absorbed[..., : self.kv_lora_rank])
        absorbed[..., self.kv_lora_rank:].copy_(query_rope.transpose(0, 1))
        absorbed_query = absorbed.transpose(0, 1)  # [tokens, heads, lora + rope]
        latent_cache = self.kv_cache[:, :, None, :]  # one shared "head": [blocks, block_size, 1, lora + rope]
        latent_output = attend_paged(absorbed_query, latent_cache, None, metadata, self.scale,
                                     self.kv_lora_rank, self.kv_lora_rank)
        return torch.bmm(latent_output.transpose(0, 1), value_up.transpose(1, 2)).transpose(0, 1)

    def _attend_decompressed(self, query: torch.Tensor, cached: torch.Tensor, kv_b_proj: nn.Linear,
                             attend_mask: torch.Tensor) -> torch.Tensor:
        """Up-projects the gathered latents to per-head keys and values, as transformers does."""
        sequences, context = cached.shape[:2]
        latent, key_rope = cached.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        key_value = kv_b_proj(latent).view(sequences, context, query.shape[2], -1)
        key_nope, value = key_value.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key_rope = key_rope[:, :, None, :].expand(-1, -1, query.shape[2], -1)
        key = torch.cat((key_nope, key_rope), dim=-1)
        return attend(query, key, value, attend_mask, self.scale)

    def _attend_absorbed(self, query: torch.Tensor, cached: torch.Tensor, kv_b_proj: nn.Linear,
                         attend_mask: torch.Tensor) -> torch.Tensor:
        """Attends in latent space: one shared latent 'head' serves as key and value for every query head."""
        key_up, value_up = self._up_projections(kv_b_proj)
        query_nope, query_rope = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        query_latent = torch.einsum("sqhn,hnl->sqhl", query_nope, key_up)
        absorbed_query = torch.cat((query_latent, query_rope), dim=-1)
        shared_key = cached[:, :, None, :]
        shared_value = cached[:, :, None, : self.kv_lora_rank]
        latent_output = attend(absorbed_query, shared_key, shared_value, attend_mask, self.scale)
        return torch.einsum("sqhl,hvl->sqhv", latent_output, value_up)
