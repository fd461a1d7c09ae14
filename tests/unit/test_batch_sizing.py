"""The batch a worker decodes when the settings leave it to the device (worker/engine/sizing.py)."""

from __future__ import annotations

import torch

from schema.settings import LARGEST_AUTO_BATCH_SIZE, Settings
from worker.engine.sizing import MAX_GPU_BATCH, MIN_GPU_BATCH, TYPICAL_SEQUENCE_TOKENS, choose_batch_limits
from worker.engine.types import EngineConfig

GPU = torch.device("cuda", 0)
CONFIG = EngineConfig(model="tiny-qwen2")  # sizing reads the numbers, not the model
BLOCK = CONFIG.kv_block_size


def blocks_for(tokens: int) -> int:
    return tokens // BLOCK


def test_the_cpu_keeps_32_sequences_and_4096_tokens() -> None:
    limits = choose_batch_limits(CONFIG, blocks_for(10_000_000), torch.device("cpu"))
    assert (limits.max_batch_size, limits.max_num_batched_tokens) == (32, 4096)


def test_a_large_gpu_cache_fills_the_largest_batch() -> None:
    # The 1.5B shape on an H200: some 3.9M tokens of KV cache.
    limits = choose_batch_limits(CONFIG, blocks_for(3_900_000), GPU)
    assert (limits.max_batch_size, limits.max_num_batched_tokens) == (MAX_GPU_BATCH, 8192)
    assert "3,900,000 tokens" in limits.reason


def test_a_small_cache_gets_the_power_of_two_it_holds() -> None:
    limits = choose_batch_limits(CONFIG, blocks_for(100 * TYPICAL_SEQUENCE_TOKENS), GPU)
    assert limits.max_batch_size == 64
    assert choose_batch_limits(CONFIG, blocks_for(TYPICAL_SEQUENCE_TOKENS), GPU).max_batch_size == MIN_GPU_BATCH


def test_settings_win_and_the_reason_says_so() -> None:
    limits = choose_batch_limits(EngineConfig(model="tiny-qwen2", max_batch_size=48), blocks_for(3_900_000), GPU)
    assert (limits.max_batch_size, limits.max_num_batched_tokens) == (48, 8192)
    assert "DEEPBATCH_MAX_BATCH_SIZE" in limits.reason


def test_the_workers_threads_cover_the_largest_automatic_batch() -> None:
    assert LARGEST_AUTO_BATCH_SIZE == MAX_GPU_BATCH
    settings = Settings()
    assert settings.max_batch_size is None and settings.target_queue_depth is None
    assert settings.worker_threads == -(-2 * MAX_GPU_BATCH // settings.slice_size) + 2
