"""How far `--quantization fp8` moves a model's logits: the same prompts through the model unquantized and
with its linear weights FP8 in 128×128 blocks, per prompt position: relative L2 error of the logits
(‖fp8 − reference‖ / ‖reference‖) and whether the top token agrees. On the CPU the FP8 weights are
dequantized (weight rounding alone); on a GPU the FP8 kernels also quantize activations per token group.
Results go to bench/results/fp8-logits-<device>-<model>.json.

    python bench/fp8_logits.py                                   # SmolLM2-135M-Instruct, float32 on the CPU
    python bench/fp8_logits.py --device cuda --dtype bfloat16 --model shape-deepseek-v2-lite
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.device import resolve_device, resolve_dtype  # noqa: E402
from worker.engine.layers.linear import quantize_linears  # noqa: E402
from worker.engine.loader import load_model  # noqa: E402
from worker.engine.tokenizer import PromptEncoder, load_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import COUNTRIES, QUESTION_TEMPLATES, TOPICS  # noqa: E402

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output", type=Path)
    return parser.parse_args()


def chat_prompts(model: str, count: int) -> list[list[int]]:
    encoder = PromptEncoder(load_tokenizer(model))
    questions = [QUESTION_TEMPLATES[index % 5].format(country=COUNTRIES[index % 16], topic=TOPICS[index * 7 % 16])
                 for index in range(count)]
    return [encoder.encode_chat([{"role": "user", "content": question}]) for question in questions]


@torch.inference_mode()
def all_logits(model, prompts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    return [prefill_logits(model, prompt, device) for prompt in prompts]


def prefill_logits(model, prompt: list[int], device: torch.device) -> torch.Tensor:
    """Logits [positions, vocab] of every prompt position, through the paged cache and the model runner."""
    from worker.engine.block_manager import BlockManager, PrefixMatch
    from worker.engine.model_runner import ModelRunner
    from worker.engine.scheduler import ScheduledSequence
    from worker.engine.sequence import Sequence
    from worker.engine.types import SamplingParams

    block_size, num_blocks = 16, -(-len(prompt) // 16) + 1
    runner = ModelRunner(model, block_size, num_blocks, device, next(model.parameters()).dtype)
    sequence = Sequence(prompt, SamplingParams())
    BlockManager(num_blocks, block_size).admit(sequence, PrefixMatch(), len(prompt))
    batch = runner.prepare_batch([ScheduledSequence(sequence, len(prompt))])
    return model.compute_logits(runner.forward(batch)).float().cpu()


def main() -> None:
    arguments = parse_arguments()
    device = resolve_device(arguments.device)
    dtype = resolve_dtype(arguments.dtype, device)
    prompts = chat_prompts(arguments.model, arguments.num_prompts)
    model, _ = load_model(arguments.model, 0, device, dtype)
    reference = all_logits(model, prompts, device)
    quantize_linears(model)
    quantized = all_logits(model, prompts, device)
    errors = torch.cat([(q - r).norm(dim=-1) / r.norm(dim=-1) for q, r in zip(quantized, reference)])
    agree = torch.cat([q.argmax(-1) == r.argmax(-1) for q, r in zip(quantized, reference)]).float()
    last_agree = sum(int(q[-1].argmax() == r[-1].argmax()) for q, r in zip(quantized, reference))
    result = {
        "model": arguments.model, "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
        "prompts": len(prompts), "positions": len(errors),
        "logits_relative_error": {"mean": round(errors.mean().item(), 4), "median": round(errors.median().item(), 4),
                                  "p90": round(errors.quantile(0.9).item(), 4), "max": round(errors.max().item(), 4)},
        "top1_agreement_all_positions": round(agree.mean().item(), 4),
        "top1_agreement_last_position": f"{last_agree}/{len(prompts)}",
    }
    print(json.dumps(result, indent=2))
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(arguments.model).name)
    output = arguments.output or RESULTS_DIRECTORY / f"fp8-logits-{device.type}-{label}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
