"""Checkpoints written by transformers' `save_pretrained` load into the engine's models unchanged."""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import ARCHITECTURES, prefill_logits, random_prompts, reference_model
from worker.engine.loader import load_model


@pytest.mark.parametrize("model_name", ARCHITECTURES)
def test_save_pretrained_round_trip(tmp_path, model_name):
    reference = reference_model(model_name, seed=3)
    reference.save_pretrained(tmp_path)
    model, hf_config = load_model(str(tmp_path), seed=0, device=torch.device("cpu"), dtype=torch.float32)
    assert hf_config.model_type == reference.config.model_type
    prompt = random_prompts([13])[0]
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(prefill_logits(model, prompt), expected, rtol=1e-4, atol=1e-5)


def test_sharded_checkpoint_loads(tmp_path):
    reference = reference_model("tiny-deepseek-v3", seed=4)
    reference.save_pretrained(tmp_path, max_shard_size="5MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = load_model(str(tmp_path), seed=0, device=torch.device("cpu"), dtype=torch.float32)
    prompt = random_prompts([6])[0]
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(prefill_logits(model, prompt), expected, rtol=1e-4, atol=1e-5)


def test_builtin_name_draws_the_reference_weights():
    model, _ = load_model("tiny-qwen2", seed=0, device=torch.device("cpu"), dtype=torch.float32)
    reference = reference_model("tiny-qwen2", seed=0)
    torch.testing.assert_close(model.state_dict()["model.embed_tokens.weight"], reference.model.embed_tokens.weight)


def test_unknown_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in name, a .gguf file nor a checkpoint directory"):
        load_model(str(tmp_path / "missing"), seed=0, device=torch.device("cpu"), dtype=torch.float32)
