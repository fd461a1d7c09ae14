"""Throughput of the DeepBatch engine against transformers' `generate`, on the same prompts, in one process.

The baseline runs left-padded batches of `--hf-batch-size` prompts through `generate` with the KV cache;
the engine gets every prompt at once and batches them continuously. Both decode greedily and ignore EOS,
so each produces exactly `--max-tokens` tokens per prompt; the figure of merit is output tokens per second.
Results go to bench/results/engine-<device>-<model>.json.

    python bench/engine.py                       # the tiny DeepSeek-V3 on the CPU
    python bench/engine.py --model /path/to/checkpoint --device cuda --num-prompts 512
    python bench/engine.py --model shape-r1-distill-qwen-1.5b --device cuda --num-prompts 512 \
        --min-prompt-len 64 --max-prompt-len 512 --max-tokens 256 --hf-batch-size 256 --max-batch-size 256
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.configs import builtin_config  # noqa: E402
from worker.engine.device import resolve_device, resolve_dtype  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.types import EngineConfig, SamplingParams  # noqa: E402

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-deepseek-v3", help="built-in name or checkpoint directory")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--min-prompt-len", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=64, help="the engine's max_batch_size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def random_prompts(arguments: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(arguments.seed + 1)
    lengths = torch.randint(
        arguments.min_prompt_len, arguments.max_prompt_len + 1, (arguments.num_prompts,), generator=generator
    )
    return [torch.randint(2, vocab_size, (int(length),), generator=generator).tolist() for length in lengths]


def load_reference(model: str, seed: int, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The same weights the engine loads: `from_config` under the seed, or the checkpoint."""
    hf_config = builtin_config(model)
    if hf_config is None:
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    else:
        torch.manual_seed(seed)
        reference = AutoModelForCausalLM.from_config(hf_config)
    return reference.to(device=device, dtype=dtype).eval()


@torch.inference_mode()
def run_transformers(
    reference: PreTrainedModel, prompts: list[list[int]], max_tokens: int, batch_size: int, device: torch.device
) -> tuple[float, list[list[int]]]:
    outputs: list[list[int]] = []
    started = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        longest = max(len(prompt) for prompt in batch)
        input_ids = torch.zeros(len(batch), longest, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, prompt in enumerate(batch):  # left padding
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, longest - len(prompt) :] = 1
        generated = reference.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
        outputs.extend(generated[:, longest:].tolist())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, outputs


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    started = time.perf_counter()
    completions = engine.generate(prompts, sampling)
    return time.perf_counter() - started, [completion.token_ids for completion in completions]


def main() -> None:
    arguments = parse_arguments()
    device = resolve_device(arguments.device)
    dtype = resolve_dtype(arguments.dtype, device)
    engine = LLMEngine(EngineConfig(
        model=arguments.model, device=str(device), dtype=str(dtype).removeprefix("torch."), seed=arguments.seed,
        max_batch_size=arguments.max_batch_size, max_wait_ms=5.0,
        max_model_len=arguments.max_prompt_len + arguments.max_tokens + 1,
    ))
    prompts = random_prompts(arguments, engine.hf_config.vocab_size)
    engine_seconds, engine_outputs = run_engine(engine, prompts, arguments.max_tokens)
    kv_cache_tokens = engine.block_manager.num_blocks * engine.config.kv_block_size
    engine_peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    engine.shutdown()
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    reference = load_reference(arguments.model, arguments.seed, device, dtype)
    run_transformers(reference, prompts[:2], 2, arguments.hf_batch_size, device)  # warm-up
    hf_seconds, hf_outputs = run_transformers(reference, prompts, arguments.max_tokens, arguments.hf_batch_size, device)
    output_tokens = arguments.num_prompts * arguments.max_tokens
    agreeing = sum(ours == theirs for ours, theirs in zip(engine_outputs, hf_outputs))
    # bf16 rounding can flip a late token; the first 32 say whether the model computes the same function.
    agreeing_first_32 = sum(ours[:32] == theirs[:32] for ours, theirs in zip(engine_outputs, hf_outputs))
    result = {
        "model": arguments.model, "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
        "host": platform.node(), "cpu_threads": torch.get_num_threads(),
        "num_prompts": arguments.num_prompts, "prompt_len": [arguments.min_prompt_len, arguments.max_prompt_len],
        "max_tokens": arguments.max_tokens, "hf_batch_size": arguments.hf_batch_size,
        "engine_max_batch_size": arguments.max_batch_size,
        "transformers_seconds": round(hf_seconds, 3), "engine_seconds": round(engine_seconds, 3),
        "transformers_tokens_per_s": round(output_tokens / hf_seconds, 1),
        "engine_tokens_per_s": round(output_tokens / engine_seconds, 1),
        "speedup": round(hf_seconds / engine_seconds, 2),
        "greedy_outputs_identical": f"{agreeing}/{arguments.num_prompts}",
        "greedy_first_32_tokens_identical": f"{agreeing_first_32}/{arguments.num_prompts}",
        "engine_kv_cache_capacity_tokens": kv_cache_tokens,
        "engine_peak_gpu_memory_gib": round(engine_peak_bytes / 2**30, 2),
        "transformers_peak_gpu_memory_gib": round(
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0, 2),
    }
    print(json.dumps(result, indent=2))
    RESULTS_DIRECTORY.mkdir(parents=True, exist_ok=True)
    model_label = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(arguments.model).name or arguments.model)
    (RESULTS_DIRECTORY / f"engine-{device.type}-{model_label}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
