"""How big the engine's KV cache and batches are, when the settings leave it to the device.

A batch job only decodes, and decode is memory-bound: each step streams every weight once, whatever
the batch, so throughput grows with the number of sequences decoding together until the KV cache or
the compute runs out. A fixed default of 32 sequences left most of an H200 idle (the engine did
45,803 tok/s at 512 on the 1.5B shape), while 512 on a small GPU would only thrash the cache through
preemption. So, as vLLM picks per-device defaults, the batch is sized from the cache actually allocated:
as many sequences as the cache holds at `TYPICAL_SEQUENCE_TOKENS` each, a power of two between
`MIN_GPU_BATCH` and `MAX_GPU_BATCH`. The CPU keeps 32 sequences and 4,096 tokens a step: there the
matrix work, not the weights' bandwidth, sets the pace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.types import CPU_BATCH, EngineConfig

CPU_KV_CACHE_BYTES = 4 << 30  # ceiling of the KV cache when it lives in host memory
CPU_BATCHED_TOKENS = 4096
# A batch job's prompt plus completion rarely passes this; a sequence that does is preempted, not lost.
TYPICAL_SEQUENCE_TOKENS = 2048
MIN_GPU_BATCH = 32
# The largest batch CUDA graphs are captured for; past it an H200's decode step turns compute-bound on
# the models measured (bench/results/engine-cuda-*.json).
MAX_GPU_BATCH = 512
GPU_BATCHED_TOKENS = 8192  # prefill chunk plus decodes in one step: long enough to keep the GPU busy


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    max_num_batched_tokens: int
    reason: str  # for the start-up line: where the numbers came from


def choose_num_kv_blocks(config: EngineConfig, bytes_per_block: int, device: torch.device) -> int:
    """`num_kv_blocks` when set; on a GPU what `gpu_memory_utilization` leaves free; on the CPU enough
    for the batch's full-length sequences, up to CPU_KV_CACHE_BYTES."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    blocks_per_sequence = -(-config.max_model_len // config.kv_block_size)
    if device.type == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        budget = free_bytes - (1 - config.gpu_memory_utilization) * total_bytes
        return max(blocks_per_sequence, int(budget // bytes_per_block) - 1)  # one spare block for padding
    wanted = (config.max_batch_size or CPU_BATCH) * blocks_per_sequence
    return max(blocks_per_sequence, min(wanted, CPU_KV_CACHE_BYTES // bytes_per_block))


def choose_batch_limits(config: EngineConfig, num_blocks: int, device: torch.device) -> BatchLimits:
    """The settings where given; otherwise the device's defaults (module docstring)."""
    if device.type != "cuda":
        batch, tokens = CPU_BATCH, CPU_BATCHED_TOKENS
        reason = "CPU defaults"
    else:
        cache_tokens = num_blocks * config.kv_block_size
        fits = max(1, cache_tokens // TYPICAL_SEQUENCE_TOKENS)
        batch = min(MAX_GPU_BATCH, max(MIN_GPU_BATCH, 1 << (fits.bit_length() - 1)))
        tokens = max(GPU_BATCHED_TOKENS, batch)
        reason = (f"the KV cache holds {cache_tokens:,} tokens = {fits:,} sequences of {TYPICAL_SEQUENCE_TOKENS:,}; "
                  f"batch kept within {MIN_GPU_BATCH}..{MAX_GPU_BATCH}")
    if config.max_batch_size or config.max_num_batched_tokens:
        reason = "set by DEEPBATCH_MAX_BATCH_SIZE / DEEPBATCH_MAX_NUM_BATCHED_TOKENS" + (
            "" if config.max_batch_size and config.max_num_batched_tokens else f"; the rest: {reason}")
    return BatchLimits(config.max_batch_size or batch, config.max_num_batched_tokens or tokens, reason)
