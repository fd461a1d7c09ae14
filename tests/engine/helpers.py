"""Helpers of the engine tests: transformers references with the engine's weights, and prompts."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from worker.engine.block_manager import BlockManager, PrefixMatch
from worker.engine.configs import builtin_config
from worker.engine.loader import random_reference_model
from worker.engine.model_runner import ModelRunner
from worker.engine.scheduler import ScheduledSequence
from worker.engine.sequence import Sequence
from worker.engine.types import SamplingParams

ARCHITECTURES = ["tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-qwen2", "tiny-llama"]


def reference_model(model_name: str, seed: int = 0, device: str = "cpu") -> PreTrainedModel:
    """transformers' model with the weights the engine's loader draws for `model_name` on `device`."""
    return random_reference_model(builtin_config(model_name), seed, torch.device(device), torch.float32)


def reference_greedy(model: PreTrainedModel, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (no padding, EOS ignored)."""
    output = model.generate(
        torch.tensor([prompt_token_ids], device=model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return output[0, len(prompt_token_ids) :].tolist()


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 100_000, (length,), generator=generator).tolist() for length in lengths]


def prefill_logits(model, prompt_token_ids: list[int]) -> torch.Tensor:
    """Logits [tokens, vocab] of every prompt position, through the paged cache and the model runner."""
    block_size = 8
    runner = ModelRunner(model, block_size, num_blocks=16, device=torch.device("cpu"), dtype=torch.float32)
    sequence = Sequence(prompt_token_ids, SamplingParams())
    BlockManager(16, block_size).admit(sequence, PrefixMatch(), len(prompt_token_ids))
    batch = runner.prepare_batch([ScheduledSequence(sequence, len(prompt_token_ids))])
    with torch.inference_mode():
        return model.compute_logits(runner.forward(batch))
