"""Reads a GGUF file (llama.cpp, Ollama, LM Studio) as the engine's model: config and tensors.

Three llama.cpp architectures load: `llama`, `qwen2` and `deepseek2` (DeepSeek-V2/V3: MLA and MoE).
The metadata becomes the transformers config of the same model, so the engine builds it as it builds a
safetensors checkpoint, and every tensor comes out under its transformers name, dequantised by the `gguf`
package (numpy, whole tensors at once) to float32; the loader casts it to the engine's dtype. Where
llama.cpp's converter changed a tensor, this undoes it:

- `llama` files permute the rows of Q and K (llama.cpp rotates adjacent pairs, transformers the two
  halves of each head): the rows are put back.
- `deepseek2` files stack the routed experts into one tensor per projection, and newer ones split
  `kv_b_proj` into `attn_k_b` (transposed) and `attn_v_b`: the engine's stacked experts take the stacks
  as they are, and the two halves are joined back into `kv_b_proj`.

The tokenizer is rebuilt from the same metadata by gguf_tokenizer.py, which reads this file's fields (this
module imports nothing of it: worker/engine/tokenizer.py joins the two).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "deepseek2")
# What the gguf package dequantises and such files use; anything else is refused before loading starts.
Q = GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ4_NL, Q.IQ4_XS,
})

# GGUF tensor name (per layer: after `blk.<i>.`) → transformers name (after `model.layers.<i>.`).
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # deepseek2: multi-head latent attention and the mixture of experts
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
STACKED_EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # joined into experts.gate_up_proj / down_proj
SPLIT_KV_B = ("attn_k_b", "attn_v_b")  # joined into self_attn.kv_b_proj
ROPE_FREQUENCY_FACTORS = "rope_freqs.weight"  # llama 3.1's rope scaling, as a factor per frequency


class GGUFError(ValueError):
    """A GGUF file the engine cannot run; the message names the file and what is unsupported."""


def is_gguf(model: str) -> bool:
    """A file that starts with GGUF's magic, whatever its name (Ollama keeps its models as sha256 blobs)."""
    path = Path(model)
    if not path.is_file():
        return False
    with path.open("rb") as file:
        return file.read(4) == b"GGUF"


@lru_cache(maxsize=2)
def open_gguf(path: str) -> GGUFFile:
    """One reader per file and process: the model and the tokenizer both read it, and the package's
    reader spends seconds parsing a large vocabulary's metadata."""
    return GGUFFile(path)


class GGUFFile:
    """One GGUF file, memory-mapped: its metadata fields, tensors by name, and what they make."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, OSError) as error:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({error})") from None
        self.architecture = self.field("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                            f"the engine loads {', '.join(SUPPORTED_ARCHITECTURES)}")
        self.tensors: dict[str, ReaderTensor] = {tensor.name: tensor for tensor in self.reader.tensors}
        unsupported = sorted({t.tensor_type.name for t in self.tensors.values()
                              if t.tensor_type not in SUPPORTED_TENSOR_TYPES})
        if unsupported:
            supported = ", ".join(sorted(kind.name for kind in SUPPORTED_TENSOR_TYPES))
            raise GGUFError(f"{self.path}: tensor type(s) {', '.join(unsupported)} cannot be dequantised; "
                            f"supported: {supported}")

    def field(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.architecture}.{key}", default)

    def array(self, name: str) -> np.ndarray:
        """A tensor dequantised to float32, in PyTorch's dimension order ([out, in] for a weight)."""
        tensor = self.tensors[name]
        return dequantize(np.asarray(tensor.data), tensor.tensor_type)

    def torch_tensor(self, name: str) -> torch.Tensor:
        array = self.array(name)
        if not array.flags.writeable:  # a float32 tensor is a view of the read-only memory map
            array = array.copy()
        return torch.from_numpy(array)

    @cached_property
    def config(self) -> PretrainedConfig:
        return deepseek2_config(self) if self.architecture == "deepseek2" else llama_family_config(self)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor under its transformers name, as the loader takes them."""
        for name in self.tensors:
            yield from self._renamed(name)

    def _renamed(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        stem, _, kind = name.rpartition(".")
        if name == ROPE_FREQUENCY_FACTORS:
            return  # in the config (llama_family_config)
        if stem in TOP_TENSORS:
            yield f"{TOP_TENSORS[stem]}.{kind}", self.torch_tensor(name)
            return
        parts = stem.split(".")
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
            raise GGUFError(f"{self.path}: tensor {name!r} has no place in a {self.architecture} model")
        prefix, short = f"model.layers.{parts[1]}", parts[2]
        if short in STACKED_EXPERTS:
            yield from self._stacked_experts(prefix, short, name)
        elif short == SPLIT_KV_B[0]:
            yield f"{prefix}.self_attn.kv_b_proj.weight", self._joined_kv_b(f"blk.{parts[1]}")
        elif short == SPLIT_KV_B[1]:
            return  # joined with attn_k_b
        elif short == "exp_probs_b":  # V3's router bias: a buffer in transformers, not a `.bias`
            yield f"{prefix}.mlp.gate.e_score_correction_bias", self.torch_tensor(name)
        elif short in LAYER_TENSORS:
            tensor = self.torch_tensor(name)
            if self.architecture == "llama" and short in ("attn_q", "attn_k"):
                heads = self.config.num_attention_heads if short == "attn_q" else self.config.num_key_value_heads
                tensor = unpermute_rotary_rows(tensor, heads)
            yield f"{prefix}.{LAYER_TENSORS[short]}.{kind}", tensor
        else:
            raise GGUFError(f"{self.path}: tensor {name!r} has no place in a {self.architecture} model")

    def _stacked_experts(self, prefix: str, short: str, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The engine stacks gate and up as experts.gate_up_proj [experts, 2 × intermediate, hidden]."""
        if short == "ffn_down_exps":
            yield f"{prefix}.mlp.experts.down_proj", self.torch_tensor(name)
        elif short == "ffn_gate_exps":
            up_name = name.replace("ffn_gate_exps", "ffn_up_exps")
            yield f"{prefix}.mlp.experts.gate_up_proj", torch.cat(
                [self.torch_tensor(name), self.torch_tensor(up_name)], dim=1)

    def _joined_kv_b(self, block: str) -> torch.Tensor:
        """kv_b_proj [heads × (nope + v), kv_lora_rank] from attn_k_b [heads, kv_lora_rank, nope] and
        attn_v_b [heads, v, kv_lora_rank], as llama.cpp's converter split it."""
        key_half = self.torch_tensor(f"{block}.attn_k_b.weight").transpose(1, 2)
        value_half = self.torch_tensor(f"{block}.attn_v_b.weight")
        return torch.cat([key_half, value_half], dim=1).reshape(-1, key_half.shape[-1])


def unpermute_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of a llama Q or K projection (weight or bias): within each head it
    interleaved the two halves' rows; transformers wants them back as halves."""
    rows_per_half = weight.shape[0] // heads // 2
    return weight.reshape(heads, rows_per_half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def common_config_fields(gguf: GGUFFile) -> dict[str, Any]:
    """What every architecture's metadata says the same way."""
    tokens = gguf.field("tokenizer.ggml.tokens")
    fields = dict(
        vocab_size=gguf.arch_field("vocab_size") or len(tokens or []) or gguf.tensors["token_embd.weight"].shape[1],
        hidden_size=gguf.arch_field("embedding_length"),
        intermediate_size=gguf.arch_field("feed_forward_length"),
        num_hidden_layers=gguf.arch_field("block_count"),
        num_attention_heads=gguf.arch_field("attention.head_count"),
        max_position_embeddings=gguf.arch_field("context_length", 4096),
        rms_norm_eps=gguf.arch_field("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=gguf.arch_field("rope.freq_base", 10000.0),
        bos_token_id=gguf.field("tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf.field("tokenizer.ggml.eos_token_id"),
        tie_word_embeddings="output.weight" not in gguf.tensors,
    )
    scaling = gguf.arch_field("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        fields["rope_scaling"] = {"rope_type": scaling, "factor": gguf.arch_field("rope.scaling.factor")}
        if scaling == "yarn":
            fields["rope_scaling"]["original_max_position_embeddings"] = gguf.arch_field(
                "rope.scaling.original_context_length")
    elif scaling not in (None, "none"):
        raise GGUFError(f"{gguf.path}: rope scaling {scaling!r} is not supported (linear and yarn are)")
    return fields


def llama_family_config(gguf: GGUFFile) -> PretrainedConfig:
    fields = common_config_fields(gguf)
    fields["num_key_value_heads"] = gguf.arch_field("attention.head_count_kv", fields["num_attention_heads"])
    head_dim = gguf.arch_field("attention.key_length")
    if gguf.architecture == "qwen2":
        config: PretrainedConfig = Qwen2Config(**fields)
    else:
        has_bias = "blk.0.attn_output.bias" in gguf.tensors
        config = LlamaConfig(**fields, attention_bias=has_bias, mlp_bias="blk.0.ffn_down.bias" in gguf.tensors,
                             **({"head_dim": head_dim} if head_dim else {}))
    if ROPE_FREQUENCY_FACTORS in gguf.tensors:
        config.rope_frequency_factors = gguf.array(ROPE_FREQUENCY_FACTORS).tolist()
    return config


def deepseek2_config(gguf: GGUFFile) -> PretrainedConfig:
    fields = common_config_fields(gguf)
    rope_dim = gguf.arch_field("rope.dimension_count")
    # Files from before llama.cpp split kv_b give the per-head key and value lengths; newer ones give the
    # latent attention's (kv_lora_rank + rope) as key_length and the per-head ones under *_mla.
    key_length = gguf.arch_field("attention.key_length_mla") or gguf.arch_field("attention.key_length")
    value_length = gguf.arch_field("attention.value_length_mla") or gguf.arch_field("attention.value_length")
    groups = gguf.arch_field("expert_group_count", 1) or 1
    fields.update(
        num_key_value_heads=fields["num_attention_heads"],
        moe_intermediate_size=gguf.arch_field("expert_feed_forward_length"),
        n_routed_experts=gguf.arch_field("expert_count"),
        num_experts_per_tok=gguf.arch_field("expert_used_count"),
        n_shared_experts=gguf.arch_field("expert_shared_count", 0),
        first_k_dense_replace=gguf.arch_field("leading_dense_block_count", 0),
        q_lora_rank=gguf.arch_field("attention.q_lora_rank") or None,
        kv_lora_rank=gguf.arch_field("attention.kv_lora_rank"),
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=key_length - rope_dim,
        v_head_dim=value_length,
        routed_scaling_factor=gguf.arch_field("expert_weights_scale", 1.0),
        norm_topk_prob=bool(gguf.arch_field("expert_weights_norm", False)),
        n_group=groups,
        topk_group=gguf.arch_field("expert_group_used_count", groups) or groups,
    )
    if "rope_scaling" in fields and fields["rope_scaling"]["rope_type"] == "yarn":
        # llama.cpp keeps 0.1 × mscale_all_dim; DeepSeek's configs set mscale to the same value.
        mscale = gguf.arch_field("rope.scaling.yarn_log_multiplier", 0.0) / 0.1
        fields["rope_scaling"].update(mscale=mscale, mscale_all_dim=mscale, beta_fast=32, beta_slow=1)
    if gguf.arch_field("expert_gating_func", 1) == 2:  # sigmoid: V3's router, with its correction bias
        return DeepseekV3Config(**fields)
    return DeepseekV2Config(**fields, topk_method="group_limited_greedy" if groups > 1 else "greedy")

