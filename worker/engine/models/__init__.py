"""Model definitions the engine runs over its paged KV cache, picked by the checkpoint's `model_type`."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from worker.engine.parallel import Shard

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen2", "llama")


def build_model(hf_config: PretrainedConfig, shard: Shard = Shard()) -> nn.Module:
    """An engine model for a transformers config (this rank's part of it); its parameters are uninitialised
    until loaded."""
    model_type = hf_config.model_type
    if model_type in ("deepseek_v3", "deepseek_v2"):
        from worker.engine.models.deepseek import DeepseekForCausalLM

        return DeepseekForCausalLM(hf_config, shard)
    if model_type in ("qwen2", "llama"):
        from worker.engine.models.qwen2 import Qwen2ForCausalLM

        return Qwen2ForCausalLM(hf_config, shard)
    raise ValueError(f"model_type {model_type!r} is not supported; the engine runs {', '.join(SUPPORTED_MODEL_TYPES)}")
