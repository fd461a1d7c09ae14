"""One MoE layer's routed experts on the GPU: the torch ops around the grouped GEMM against the Triton sort
and combine of worker/engine/kernels/moe.py, in the same run.

Both paths run the same grouped GEMMs (bf16 `torch._grouped_mm`, or the FP8 grouped kernel with
`--quantization fp8`); what differs is how token-expert pairs are sorted by expert, activated, weighted and
added back to their tokens. Each call is timed inside a CUDA graph (`--calls` calls per replay, as a decode
step runs them), so the figure is the GPU's time, not the host's launches. Routings: `uniform` (each token's
top-k of random scores, as a trained router spreads tokens) and `hostile` (every token on the same k
experts: one GEMM group holds every row, the others none). Each case is repeated `--repeats` times; the JSON
keeps both paths' times and the ratio torch time / fused time per repeat, worst and median.

    python bench/moe_layer.py --model deepseek-v2-lite --tokens 64 256 512
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fp8_gemm import relative_error  # noqa: E402
from bench.fp8_tiles import graph_seconds  # noqa: E402
from worker.engine.configs import deepseek_v2_lite_shape, deepseek_v3_shape  # noqa: E402
from worker.engine.layers.linear import quantize_stacked_experts  # noqa: E402
from worker.engine.layers.moe import RoutedExperts  # noqa: E402

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"
CONFIGS = {"deepseek-v2-lite": deepseek_v2_lite_shape, "deepseek-v3": lambda: deepseek_v3_shape(4)}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CONFIGS), nargs="+", default=["deepseek-v2-lite"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 512], help="tokens of a decode step")
    parser.add_argument("--quantization", choices=["none", "fp8"], nargs="+", default=["none"])
    parser.add_argument("--calls", type=int, default=20, help="calls captured in one graph")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path)
    return parser.parse_args()


def routing(kind: str, tokens: int, top_k: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [tokens, top_k], weights [tokens, top_k] float32) of the routing `kind`."""
    if kind == "hostile":
        ids = torch.arange(top_k, device="cuda").expand(tokens, top_k).contiguous()
    else:
        ids = torch.rand(tokens, num_experts, device="cuda").topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, device="cuda")
    return ids, weights / weights.sum(dim=-1, keepdim=True)


def experts_of(model: str, quantization: str) -> tuple[RoutedExperts, int]:
    config = CONFIGS[model]()
    with torch.device("cuda"):  # V3's experts are 45 GB in float32: built on the GPU, not in host memory
        experts = RoutedExperts(config).to(torch.bfloat16)
    with torch.no_grad():
        for weight in (experts.gate_up_proj, experts.down_proj):
            weight.normal_(std=0.02)
    if quantization == "fp8":
        with torch.no_grad():
            quantize_stacked_experts(experts)
    return experts, config.num_experts_per_tok


def measure(experts: RoutedExperts, top_k: int, tokens: int, kind: str, arguments) -> dict:
    hidden = torch.randn(tokens, experts.down_proj.shape[1], device="cuda", dtype=torch.bfloat16)
    ids, weights = routing(kind, tokens, top_k, experts.down_proj.shape[0])
    with torch.no_grad():
        error = relative_error(experts._fused_forward(hidden, ids, weights),
                               experts._torch_forward(hidden, ids, weights))
        torch_seconds, fused_seconds = [], []
        for _ in range(arguments.repeats):  # interleaved, so that drift on a shared host hits both alike
            torch_seconds += graph_seconds(lambda: experts._torch_forward(hidden, ids, weights), arguments.calls, 1)
            fused_seconds += graph_seconds(lambda: experts._fused_forward(hidden, ids, weights), arguments.calls, 1)
    ratios = [before / after for before, after in zip(torch_seconds, fused_seconds)]
    return {"tokens": tokens, "routing": kind, "relative_error": error,
            "torch_us": [round(1e6 * seconds, 1) for seconds in torch_seconds],
            "fused_us": [round(1e6 * seconds, 1) for seconds in fused_seconds],
            "ratio_worst": round(min(ratios), 3), "ratio_median": round(statistics.median(ratios), 3)}


def main() -> None:
    arguments = parse_arguments()
    results = []
    for model in arguments.model:
        for quantization in arguments.quantization:
            experts, top_k = experts_of(model, quantization)
            for tokens in arguments.tokens:
                for kind in ("uniform", "hostile"):
                    entry = {"model": model, "quantization": quantization}
                    entry.update(measure(experts, top_k, tokens, kind, arguments))
                    print(json.dumps(entry), flush=True)
                    results.append(entry)
            del experts
            torch.cuda.empty_cache()
    label = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    output = arguments.output or RESULTS_DIRECTORY / f"moe-layer-{label}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "command": " ".join(sys.argv), "calls": arguments.calls, "results": results},
                                 indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
