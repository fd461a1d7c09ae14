"""Pieces every engine model shares: RMSNorm, rotary embeddings, the decoder stack.

Attention over the paged KV cache, and the choice of how it runs, is worker/engine/layers/attention.py's; the
gated MLP is layers/mlp.py's, the mixture of experts layers/moe.py's.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from worker.engine.kernels import uses_fused_kernels
from worker.engine.layers.attention import AttentionMetadata, PagedAttention
from worker.engine.parallel import Shard, embed_vocab_parallel, slice_checkpoint_tensor


class RMSNorm(nn.Module):
    """transformers' RMSNorm, op for op, so that float32 results agree bit for bit."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if uses_fused_kernels(hidden_states) and hidden_states.dim() == 2:
            return self.add_and_norm(hidden_states, None)[0]
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def normalize_(self, hidden: torch.Tensor) -> torch.Tensor:
        """norm(hidden) written over hidden [tokens, size] (which may be a view of a wider row); returns it."""
        if uses_fused_kernels(hidden):
            from worker.engine.kernels.fused import add_rms_norm

            return add_rms_norm(hidden, None, self.weight, self.variance_epsilon, out=hidden)[0]
        return hidden.copy_(self(hidden))

    def add_and_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + hidden), residual + hidden): the pre-norm block's residual add, fused on the GPU."""
        if uses_fused_kernels(hidden):
            from worker.engine.kernels.fused import add_rms_norm

            return add_rms_norm(hidden, residual, self.weight, self.variance_epsilon)
        if residual is not None:
            hidden = residual + hidden
        return self(hidden), hidden


class RotaryEmbedding(nn.Module):
    """cos/sin of each position, with the frequencies of the config's `rope_parameters` (yarn, llama3, ...).

    transformers' own rope initialisers compute the frequencies, so every rope type it knows matches it.
    """

    def __init__(self, hf_config: PretrainedConfig, rotary_dim: int):
        super().__init__()
        rope_parameters = hf_config.rope_parameters
        rope_type = rope_parameters.get("rope_type", "default")
        # Computed on the CPU and kept out of the module's buffers: the loader builds models on the meta
        # device and fills only checkpoint tensors, so a buffer would be left uninitialised.
        with torch.device("cpu"):
            if rope_type == "default":
                base = rope_parameters["rope_theta"]
                inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
                self.attention_scaling = 1.0
            else:
                inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None)
        # A GGUF of a model with llama 3's rope scaling carries it as a factor per frequency (gguf_file.py).
        factors = getattr(hf_config, "rope_frequency_factors", None)
        if factors is not None:
            inv_freq = inv_freq / torch.tensor(factors, dtype=inv_freq.dtype)
        self.inverse_frequencies = inv_freq.float()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [tokens, rotary_dim / 2]."""
        if self.inverse_frequencies.device != positions.device:
            self.inverse_frequencies = self.inverse_frequencies.to(positions.device)
        angles = positions[:, None].float() * self.inverse_frequencies[None, :]
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates x [tokens, heads, rotary_dim] (on the GPU in 16 bits: in place, by one fused kernel).

    interleaved: pairs are (x0, x1), (x2, x3), ... (DeepSeek); the result is laid out as
    [rotated evens, rotated odds], as transformers' DeepSeek-V3 does. Otherwise pairs are (x_i, x_{i+d/2})
    (Llama's rotate_half). Queries and keys get the same layout, so their dot products are unchanged.
    """
    if uses_fused_kernels(x):
        from worker.engine.kernels.fused import rotate_

        return rotate_(x, cos, sin, interleaved)
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    if interleaved:
        first, second = x[..., 0::2], x[..., 1::2]
    else:
        first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """apply_rotary written over x (a view of a wider row stays one); returns x."""
    if uses_fused_kernels(x):
        return apply_rotary(x, cos, sin, interleaved)
    return x.copy_(apply_rotary(x, cos, sin, interleaved))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then feed-forward (Llama, Qwen2 and DeepSeek alike)."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this block's output, the residual stream before it is added): each add is left to the next
        norm, which fuses it on the GPU. residual None: the first block, whose input is the stream."""
        normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(normed, cos, sin, metadata)
        normed, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(normed), residual


def vocab_part_size(vocab_size: int, shard: Shard) -> int:
    """Vocabulary rows each rank holds of the embedding and the LM head; the last part is padded with
    zero rows when the vocabulary does not divide evenly."""
    return -(-vocab_size // shard.size)


class DecoderStack(nn.Module):
    """Holds what transformers calls `model.*`, so that parameter names match its checkpoints."""

    def __init__(self, hf_config: PretrainedConfig, layers: list[nn.Module], shard: Shard = Shard()):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_part_size(hf_config.vocab_size, shard), hf_config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)


class PagedCausalLM(nn.Module):
    """Embedding → decoder layers → norm → lm_head over the paged KV cache; subclasses build the layers.

    Each layer's `PagedAttention` (layers/attention.py) declares `kv_cache_entry_shape` (what one token
    stores per layer) and receives its cache tensor [blocks, block_size, *entry_shape] from `allocate_kv_cache`.
    """

    model: DecoderStack
    rotary_emb: RotaryEmbedding

    def __init__(self, hf_config: PretrainedConfig, layers: list[nn.Module], rotary_dim: int,
                 shard: Shard = Shard()):
        super().__init__()
        self.config = hf_config
        self.shard = shard
        self.model = DecoderStack(hf_config, layers, shard)
        self.rotary_emb = RotaryEmbedding(hf_config, rotary_dim)
        vocab_part = vocab_part_size(hf_config.vocab_size, shard)
        self.lm_head = nn.Linear(hf_config.hidden_size, vocab_part, bias=False)
        if getattr(hf_config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.vocab_rows = shard.rows(vocab_part)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [tokens, hidden] of the step's new tokens."""
        hidden = embed_vocab_parallel(self.model.embed_tokens, input_ids, self.shard)
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, cos, sin, metadata)
        return self.model.norm.add_and_norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [tokens, vocab]; under tensor parallelism every rank's vocabulary part, gathered."""
        if not self.shard.is_parallel:
            return self.lm_head(hidden)
        return self.shard.all_gather_columns(self.lm_head(hidden))[:, : self.config.vocab_size]

    def rank_part_of(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor | None]:
        """This rank's part of a checkpoint tensor, for the loader: vocabulary rows of the embedding and the
        head, the slices the modules declare (`checkpoint_slices`) of the rest."""
        if not self.shard.is_parallel:
            return name, tensor
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return name, self.vocab_rows(tensor)
        return name, slice_checkpoint_tensor(self, name, tensor)

    def supports_cuda_graphs(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a decode step runs without asking the host anything, so a CUDA graph can hold it."""
        return True

    def attention_modules(self) -> list[PagedAttention]:
        return [module for module in self.modules() if isinstance(module, PagedAttention)]

    def kv_cache_bytes_per_token(self, dtype: torch.dtype) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return sum(math.prod(module.kv_cache_entry_shape) * element_size for module in self.attention_modules())

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """`num_blocks` blocks for sequences plus one spare (block `num_blocks`) that no sequence owns: the
        padding rows of a captured decode step write and read there."""
        for module in self.attention_modules():
            shape = (num_blocks + 1, block_size, *module.kv_cache_entry_shape)
            module.kv_cache = torch.zeros(shape, dtype=dtype, device=device)
