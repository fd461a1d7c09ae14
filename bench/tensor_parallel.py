"""Throughput of the engine split over N GPUs (tensor + expert parallel) against the same engine on one, same run.

Both engines get the same random prompts (greedy, EOS ignored, exactly `--max-tokens` each) and the same
random weights (transformers' initialisation under `--seed`; each rank keeps its slice). Each engine runs the
whole workload `--repeats` times after a warm-up (with `--sweep-batch-sizes`, at each batch size, keeping its
fastest by the median); the ratio of N ranks to one is reported per repeat, with its worst and median, beside
decode step times and how many outputs agree with one rank's (in 16 bits a sum taken in another order may flip
a late token of random weights' near-flat logits; the first tokens say whether both compute the same
function). JSON into bench/results/.

    python bench/tensor_parallel.py --model shape-deepseek-v2-lite --tensor-parallel-size 2 \\
        --num-prompts 512 --min-prompt-len 64 --max-prompt-len 512 --max-tokens 128 --max-batch-size 256
    python bench/tensor_parallel.py --model shape-deepseek-v2-lite --tensor-parallel-size 2 --num-prompts 2048 \\
        --min-prompt-len 64 --max-prompt-len 512 --max-tokens 128 --sweep-batch-sizes 256 512 1024  # each at its best
    python bench/tensor_parallel.py --model tiny-qwen2 --device cpu --num-prompts 8 --max-tokens 8  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import (  # noqa: E402
    RESULTS_DIRECTORY,
    StepLog,
    common_prefix_length,
    engine_weight_bytes,
    model_config,
    random_prompts,
    release_memory,
    synchronize,
)
from worker.engine.configs import builtin_config  # noqa: E402
from worker.engine.device import resolve_device, resolve_dtype  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.loader import has_fp8_weights  # noqa: E402
from worker.engine.types import EngineConfig, SamplingParams  # noqa: E402


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-deepseek-v3")
    parser.add_argument("--tensor-parallel-size", type=int, default=2, help="ranks of the engine measured")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--min-prompt-len", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, nargs="+", default=[64],
                        help="one rank's batch, then the N ranks' (N ranks hold N times the KV cache); one value: both")
    parser.add_argument("--sweep-batch-sizes", type=int, nargs="+",
                        help="each engine runs at each of these batch sizes and its fastest (median) is compared: "
                             "each at its best batch; replaces --max-batch-size")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="default bench/results/tensor-parallel-<device>-<model>-tp<N>.json")
    return parser.parse_args()


def batch_sizes(arguments: argparse.Namespace, size: int) -> list[int]:
    """The batch sizes the engine at `size` ranks runs at: the sweep's, else its one --max-batch-size."""
    return arguments.sweep_batch_sizes or [arguments.max_batch_size[0 if size == 1 else -1]]


def fastest(arguments: argparse.Namespace, size: int, device: torch.device, dtype: torch.dtype,
            prompts: list[list[int]]) -> tuple[dict, list[dict]]:
    """(the run at `size` ranks with the least median seconds, every run) over its batch sizes."""
    runs = [measure(arguments, size, batch, device, dtype, prompts) for batch in batch_sizes(arguments, size)]
    return min(runs, key=lambda run: statistics.median(run["seconds"])), runs


def measure(arguments: argparse.Namespace, size: int, max_batch_size: int, device: torch.device,
            dtype: torch.dtype, prompts: list[list[int]]) -> dict:
    """The engine at `size` ranks: seconds of each repeat, its outputs, and its steps in the last repeat."""
    started = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model=arguments.model, device=str(device), dtype=str(dtype).removeprefix("torch."), seed=arguments.seed,
        max_batch_size=max_batch_size, max_wait_ms=5.0,
        max_num_batched_tokens=arguments.max_num_batched_tokens,
        max_model_len=arguments.max_prompt_len + arguments.max_tokens + 1,
        use_cuda_graphs=not arguments.no_cuda_graphs, tensor_parallel_size=size,
    ))
    start_seconds = time.perf_counter() - started
    sampling = SamplingParams(max_tokens=arguments.max_tokens, ignore_eos=True)
    engine.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    seconds, outputs, steps = [], [], StepLog()
    for repeat in range(arguments.repeats):
        if repeat == arguments.repeats - 1:
            steps.attach(engine)
        synchronize(device)
        started = time.perf_counter()
        outputs = [completion.token_ids for completion in engine.generate(prompts, sampling)]
        seconds.append(time.perf_counter() - started)
    kv_bytes_per_token = engine.model.kv_cache_bytes_per_token(engine.dtype)
    result = {
        "tensor_parallel_size": size,
        "max_batch_size": max_batch_size,
        "start_seconds": round(start_seconds, 1),
        "seconds": [round(value, 3) for value in seconds],
        "outputs": outputs,
        "rank_0_weight_gib": round(engine_weight_bytes(engine) / 2**30, 2),
        "kv_cache_capacity_tokens": engine.block_manager.num_blocks * engine.config.kv_block_size,
        "steps": steps.summary(engine_weight_bytes(engine), kv_bytes_per_token, None),
    }
    print(json.dumps({key: value for key, value in result.items() if key != "outputs"}), file=sys.stderr, flush=True)
    engine.shutdown()
    del engine
    release_memory(device)
    return result


def main() -> None:
    arguments = parse_arguments()
    device = resolve_device(arguments.device)
    dtype = resolve_dtype(arguments.dtype, device)
    prompts = random_prompts(arguments, model_config(arguments.model).vocab_size)
    output_tokens = arguments.num_prompts * arguments.max_tokens
    baseline, baseline_runs = fastest(arguments, 1, device, dtype, prompts)
    parallel, parallel_runs = fastest(arguments, arguments.tensor_parallel_size, device, dtype, prompts)
    ratios = [one / many for one, many in zip(baseline["seconds"], parallel["seconds"])]
    agreeing = sum(a == b for a, b in zip(baseline["outputs"], parallel["outputs"]))
    config = builtin_config(arguments.model)
    result = {
        "model": arguments.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "torch": torch.__version__, "host": platform.node(),
        "num_prompts": arguments.num_prompts, "prompt_len": [arguments.min_prompt_len, arguments.max_prompt_len],
        "max_tokens": arguments.max_tokens,
        "max_batch_size": {str(run["tensor_parallel_size"]): run["max_batch_size"] for run in (baseline, parallel)},
        "batch_sizes_tried": arguments.sweep_batch_sizes,
        "cuda_graphs": device.type == "cuda" and not arguments.no_cuda_graphs,
        "tensor_parallel_size": arguments.tensor_parallel_size,
        "tokens_per_s": {str(run["tensor_parallel_size"]): [round(output_tokens / s, 1) for s in run["seconds"]]
                         for run in (baseline, parallel)},
        "speedup_per_repeat": [round(ratio, 3) for ratio in ratios],
        "speedup_worst": round(min(ratios), 3),
        "speedup_median": round(statistics.median(ratios), 3),
        "greedy_outputs_identical_to_one_rank": f"{agreeing}/{len(prompts)}",
        "greedy_mean_tokens_before_first_difference": round(sum(
            common_prefix_length(a, b) for a, b in zip(baseline["outputs"], parallel["outputs"])) / len(prompts), 1),
        "runs": [{key: value for key, value in run.items() if key != "outputs"}
                 for run in baseline_runs + parallel_runs],
    }
    if config is not None and has_fp8_weights(config):
        # FP8 shapes draw their random weights into each rank's slice (loader.fill_random): the two engines
        # compute different functions, so only the speed compares (tests/engine/test_tensor_parallel.py: parity).
        result["greedy_outputs_comparable"] = False
    print(json.dumps(result, indent=2))
    label = Path(arguments.model).name or arguments.model
    output = arguments.output or RESULTS_DIRECTORY / (
        f"tensor-parallel-{device.type}-{label}-tp{arguments.tensor_parallel_size}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
