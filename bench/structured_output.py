"""What structured output costs: the engine with a share of its requests constrained by a JSON schema,
against the same engine with none constrained, in the same process on the same prompts.

Each repeat runs the whole workload twice, alternating: every request free (EOS off, exactly
`--max-tokens` tokens each), then `--constrained-share` of them under a schema's grammar (they end where
their JSON ends, or at `--max-tokens`) and the rest free as before. Tokens per second of each run, and
their ratio per repeat, with its worst and median; the grammar's mask is filled and applied in the same
batch as the free rows (worker/engine/sampler.py), so the ratio is what a mixed job pays for it.

    python bench/structured_output.py --model shape-r1-distill-qwen-1.5b --device cuda --num-prompts 1024 \\
        --max-tokens 128 --max-batch-size 256
    python bench/structured_output.py --num-prompts 16 --max-tokens 16   # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import RESULTS_DIRECTORY, model_config, random_prompts, synchronize  # noqa: E402
from worker.engine.device import resolve_device, resolve_dtype  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.types import EngineConfig, GrammarRequest, SamplingParams  # noqa: E402

# An extraction record with free text in it, so that a constrained output runs for a while.
SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                   "kind": {"enum": ["person", "place", "thing"]}, "tags": {"type": "array", "items": {"type": "string"}},
                   "summary": {"type": "string"}},
    "required": ["name", "country", "kind", "tags", "summary"], "additionalProperties": False,
})


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-deepseek-v3")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--min-prompt-len", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--constrained-share", type=float, default=0.5, help="of the requests, under the schema")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="default bench/results/structured-output-<device>-<model>.json")
    return parser.parse_args()


def timed(engine: LLMEngine, prompts: list[list[int]], samplings: list[SamplingParams],
          device: torch.device) -> dict:
    synchronize(device)
    started = time.perf_counter()
    completions = engine.generate(prompts, samplings)
    seconds = time.perf_counter() - started
    tokens = sum(completion.completion_tokens for completion in completions)
    return {"seconds": round(seconds, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "completions": completions}


def main() -> None:
    arguments = parse_arguments()
    device = resolve_device(arguments.device)
    dtype = resolve_dtype(arguments.dtype, device)
    prompts = random_prompts(arguments, model_config(arguments.model).vocab_size)
    free = SamplingParams(max_tokens=arguments.max_tokens, ignore_eos=True)
    constrained = SamplingParams(max_tokens=arguments.max_tokens, grammar=GrammarRequest("json_schema", SCHEMA))
    every = round(1 / arguments.constrained_share) if arguments.constrained_share else 0
    mixed = [constrained if every and index % every == 0 else free for index in range(len(prompts))]
    engine = LLMEngine(EngineConfig(
        model=arguments.model, device=str(device), dtype=str(dtype).removeprefix("torch."), seed=arguments.seed,
        max_batch_size=arguments.max_batch_size, max_wait_ms=5.0,
        max_model_len=arguments.max_prompt_len + arguments.max_tokens + 1,
    ))
    engine.generate(prompts[:4], [free, constrained, free, constrained])  # warm-up: kernels and the grammar
    runs = []
    for _ in range(arguments.repeats):
        plain = timed(engine, prompts, [free] * len(prompts), device)
        with_schema = timed(engine, prompts, mixed, device)
        constrained_outputs = [completion for completion, sampling in zip(with_schema.pop("completions"), mixed)
                               if sampling is constrained]
        plain.pop("completions")
        with_schema["constrained_requests"] = len(constrained_outputs)
        with_schema["constrained_valid_json_or_length"] = sum(
            completion.finish_reason == "length" or is_json(completion.text) for completion in constrained_outputs)
        runs.append({"unconstrained": plain, "mixed": with_schema,
                     "ratio": round(with_schema["tokens_per_s"] / plain["tokens_per_s"], 3)})
    engine.shutdown()
    ratios = [run["ratio"] for run in runs]
    result = {
        "model": arguments.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "num_prompts": arguments.num_prompts, "max_tokens": arguments.max_tokens,
        "max_batch_size": arguments.max_batch_size, "constrained_share": arguments.constrained_share,
        "ratio_per_repeat": ratios, "ratio_worst": min(ratios), "ratio_median": statistics.median(ratios),
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    label = Path(arguments.model).name or arguments.model
    output = arguments.output or RESULTS_DIRECTORY / f"structured-output-{device.type}-{label}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()
