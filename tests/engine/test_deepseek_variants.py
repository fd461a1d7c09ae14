"""DeepSeek options the tiny built-ins leave at their defaults: V2's group-limited routing, V3's score
correction bias and non-interleaved rope, yarn rope scaling. Each is checked against transformers' logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.helpers import prefill_logits, random_prompts
from worker.engine.configs import tiny_deepseek_v2_config, tiny_deepseek_v3_config
from worker.engine.loader import load_model

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

VARIANTS = {
    "v2-group-limited": lambda: tiny_deepseek_v2_config(topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "v2-yarn": lambda: tiny_deepseek_v2_config(rope_parameters=dict(YARN), routed_scaling_factor=1.5),
    "v3-yarn": lambda: tiny_deepseek_v3_config(rope_parameters=dict(YARN)),
    "v3-no-interleave": lambda: tiny_deepseek_v3_config(rope_interleave=False, norm_topk_prob=False),
    "v3-no-groups": lambda: tiny_deepseek_v3_config(n_group=1, topk_group=1, num_experts_per_tok=3),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_logits_match_transformers(tmp_path, variant):
    torch.manual_seed(7)
    reference = AutoModelForCausalLM.from_config(VARIANTS[variant]()).eval()
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zero by default: make it matter
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    reference.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), seed=0, device=torch.device("cpu"), dtype=torch.float32)
    prompt = random_prompts([11], seed=8)[0]
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(prefill_logits(model, prompt), expected, rtol=1e-4, atol=1e-5)
