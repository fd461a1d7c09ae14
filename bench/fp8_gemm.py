"""The block-scaled FP8 GEMM (worker/engine/kernels/fp8_gemm.py) against bf16 `torch.matmul` at DeepSeek-V3
and V2-Lite projection shapes, and torch's own blockwise-scaled `_scaled_mm` where this torch takes these
scales; the grouped expert kernel against bf16 `torch._grouped_mm`.

Each timing is the mean of `--iterations` calls between CUDA events (the FP8 figure includes quantizing
the activations per token group); every measurement is repeated `--repeats` times and the ratio
bf16 time / FP8 time reported as worst and median. Errors: relative L2 against the float32 product of the
same FP8 operands (`kernel_error`: the kernel's own rounding) and against the unquantized bf16 product
(`fp8_error`: what FP8 costs). Results go to bench/results/fp8-gemm-<device>.json. Calls are timed eagerly:
at small shapes the FP8 figure is the host launching its two or three kernels (quantize, GEMM, split-K
sum), which a CUDA graph (decode) does not pay; the large shapes show the kernels themselves.

    python bench/fp8_gemm.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.kernels import fp8_gemm, grouped_gemm  # noqa: E402
from worker.engine.kernels.fp8_blocks import quantize_weight_blocks  # noqa: E402

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"
# (model, projection, N, K) of one layer.
SHAPES = [
    ("deepseek-v3", "q_b_proj", 24576, 1536), ("deepseek-v3", "kv_a_proj_with_mqa", 576, 7168),
    ("deepseek-v3", "o_proj", 7168, 16384), ("deepseek-v3", "dense gate_up_proj", 36864, 7168),
    ("deepseek-v3", "dense down_proj", 7168, 18432),
    ("deepseek-v2-lite", "q_proj", 3072, 2048), ("deepseek-v2-lite", "o_proj", 2048, 2048),
    ("deepseek-v2-lite", "dense gate_up_proj", 21888, 2048), ("deepseek-v2-lite", "dense down_proj", 2048, 10944),
]
# (model, experts, top_k, moe_intermediate, hidden)
EXPERT_SHAPES = [("deepseek-v3", 256, 8, 2048, 7168), ("deepseek-v2-lite", 64, 6, 1408, 2048)]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256, 4096], help="M: tokens in the batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--torch-scaled-mm", action="store_true",
                        help="also time torch's blockwise _scaled_mm where it takes these scales (a separate run: "
                             "a layout it mishandles could fault the device for what follows)")
    parser.add_argument("--output", type=Path)
    return parser.parse_args()


def seconds_per_call(function, iterations: int) -> float:
    function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        function()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / iterations


def relative_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    return round(((output.float() - expected.float()).norm() / expected.float().norm()).item(), 5)


def torch_blockwise(x_fp8, x_scale, weight, weight_scale_inv):
    """torch's blockwise-scaled matmul (1×128 activations, 128×128 weights), if this torch has one: the first
    layout of the scales it takes. None and the reason when none works."""
    candidates = [(x_scale, weight_scale_inv.t()), (x_scale.t().contiguous().t(), weight_scale_inv.t()),
                  (x_scale.t().contiguous().t(), weight_scale_inv.t().contiguous())]
    reasons = []
    for scale_a, scale_b in candidates:
        try:
            run = lambda: torch._scaled_mm(x_fp8, weight.t(), scale_a, scale_b, out_dtype=torch.bfloat16)  # noqa: E731
            return run(), run
        except Exception as error:  # noqa: BLE001 - which layouts this torch takes is what is measured
            reasons.append(f"{type(error).__name__}: {str(error)[:160]}")
    return None, reasons


def measure_dense(num_rows: int, num_columns: int, num_inner: int, arguments) -> dict:
    x = torch.randn(num_rows, num_inner, device="cuda", dtype=torch.bfloat16)
    weight_bf16 = (torch.randn(num_columns, num_inner, device="cuda") * 0.02).to(torch.bfloat16)
    weight, weight_scale_inv = quantize_weight_blocks(weight_bf16)
    expected_exact = fp8_gemm.reference_block_scaled_matmul(x, weight, weight_scale_inv)
    expected_bf16 = x.float() @ weight_bf16.float().T
    output = fp8_gemm.fp8_linear(x, weight, weight_scale_inv)
    result = {"kernel_error": relative_error(output, expected_exact),
              "fp8_error": relative_error(output, expected_bf16)}
    bf16_seconds, fp8_seconds = [], []
    for _ in range(arguments.repeats):
        bf16_seconds.append(seconds_per_call(lambda: torch.matmul(x, weight_bf16.T), arguments.iterations))
        fp8_seconds.append(seconds_per_call(lambda: fp8_gemm.fp8_linear(x, weight, weight_scale_inv),
                                            arguments.iterations))
    result.update(timings(bf16_seconds, fp8_seconds, num_columns * num_inner))
    if not arguments.torch_scaled_mm:
        return result
    x_fp8, x_scale = fp8_gemm.quantize_per_token_group(x)
    blockwise, run_or_reasons = torch_blockwise(x_fp8, x_scale, weight, weight_scale_inv)
    if blockwise is None:
        result["torch_scaled_mm"] = {"unavailable": run_or_reasons}
    else:
        torch_seconds = [seconds_per_call(run_or_reasons, arguments.iterations) for _ in range(arguments.repeats)]
        kernel_only = [seconds_per_call(lambda: fp8_gemm.block_scaled_matmul(x_fp8, x_scale, weight, weight_scale_inv,
                                                                             torch.bfloat16), arguments.iterations)
                       for _ in range(arguments.repeats)]
        result["torch_scaled_mm"] = {
            "error": relative_error(blockwise, expected_exact),
            "us_median": round(1e6 * statistics.median(torch_seconds), 1),
            "triton_gemm_only_us_median": round(1e6 * statistics.median(kernel_only), 1)}
    return result


def timings(bf16_seconds: list[float], fp8_seconds: list[float], weight_elements: int) -> dict:
    ratios = sorted(b / f for b, f in zip(bf16_seconds, fp8_seconds))
    best_fp8 = min(fp8_seconds)
    return {"bf16_us_median": round(1e6 * statistics.median(bf16_seconds), 1),
            "fp8_us_median": round(1e6 * statistics.median(fp8_seconds), 1),
            "speedup_worst": round(ratios[0], 3), "speedup_median": round(statistics.median(ratios), 3),
            "fp8_weight_tb_per_s": round(weight_elements / best_fp8 / 1e12, 3)}


def expert_operands(num_tokens: int, num_experts: int, top_k: int, num_columns: int, num_inner: int) -> dict:
    """One projection of every routed pair, random routing: rows [tokens·top_k, num_inner] sorted by expert,
    the experts' weights [experts, num_columns, num_inner] in bf16 and in FP8 with their block scales."""
    expert_ids = torch.rand(num_tokens, num_experts, device="cuda").topk(top_k, dim=-1).indices.flatten()
    rows_per_expert = torch.bincount(expert_ids, minlength=num_experts)
    weights_bf16 = (torch.randn(num_experts, num_columns, num_inner, device="cuda") * 0.02).to(torch.bfloat16)
    weights = torch.empty(weights_bf16.shape, dtype=torch.float8_e4m3fn, device="cuda")
    scales = torch.empty(num_experts, -(-num_columns // 128), -(-num_inner // 128), device="cuda")
    for expert in range(num_experts):  # one at a time: V3's 256 at once would need 90 GB of float32 copies
        weights[expert], scales[expert] = quantize_weight_blocks(weights_bf16[expert])
    return {"rows": torch.randn(expert_ids.shape[0], num_inner, device="cuda", dtype=torch.bfloat16),
            "rows_per_expert": rows_per_expert, "weights_bf16": weights_bf16, "weights": weights, "scales": scales,
            "offsets": torch.cumsum(rows_per_expert, dim=0, dtype=torch.int32)}


def bf16_grouped(operands: dict) -> torch.Tensor:
    """The same projection of expert_operands in bf16: torch's grouped GEMM, the engine's bf16 path."""
    return torch._grouped_mm(operands["rows"], operands["weights_bf16"].transpose(1, 2), offs=operands["offsets"])


def measure_experts(num_tokens: int, num_experts: int, top_k: int, intermediate: int, hidden: int,
                    arguments) -> dict:
    """gate_up of every routed pair: rows [tokens·top_k, hidden] sorted by expert, random routing."""
    operands = expert_operands(num_tokens, num_experts, top_k, 2 * intermediate, hidden)
    rows, rows_per_expert = operands["rows"], operands["rows_per_expert"]
    weights, scales = operands["weights"], operands["scales"]
    bf16 = lambda: bf16_grouped(operands)  # noqa: E731
    fp8 = lambda: grouped_gemm.fp8_grouped_linear(rows, weights, scales, rows_per_expert)  # noqa: E731
    output = fp8()
    expected_exact = torch.empty_like(output, dtype=torch.float32)
    group_ends = torch.cumsum(rows_per_expert, dim=0).tolist()
    for expert, end in enumerate(group_ends):
        start = end - int(rows_per_expert[expert])
        if end > start:
            expected_exact[start:end] = fp8_gemm.reference_block_scaled_matmul(rows[start:end], weights[expert],
                                                                               scales[expert])
    result = {"kernel_error": relative_error(output, expected_exact), "fp8_error": relative_error(output, bf16())}
    bf16_seconds = [seconds_per_call(bf16, arguments.iterations) for _ in range(arguments.repeats)]
    fp8_seconds = [seconds_per_call(fp8, arguments.iterations) for _ in range(arguments.repeats)]
    touched = int((rows_per_expert > 0).sum())
    result.update(timings(bf16_seconds, fp8_seconds, touched * 2 * intermediate * hidden))
    result["experts_touched"] = touched
    return result


def main() -> None:
    arguments = parse_arguments()
    torch.manual_seed(0)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(),
                    "repeats": arguments.repeats, "iterations": arguments.iterations, "dense": [], "experts": []}
    for model, projection, num_columns, num_inner in SHAPES:
        for num_rows in arguments.rows:
            entry = {"model": model, "projection": projection, "M": num_rows, "N": num_columns, "K": num_inner}
            entry.update(measure_dense(num_rows, num_columns, num_inner, arguments))
            print(json.dumps(entry), flush=True)
            result["dense"].append(entry)
    for model, num_experts, top_k, intermediate, hidden in EXPERT_SHAPES * (not arguments.torch_scaled_mm):
        for num_tokens in arguments.rows:
            entry = {"model": model, "projection": "experts gate_up_proj", "tokens": num_tokens,
                     "experts": num_experts, "top_k": top_k, "N": 2 * intermediate, "K": hidden}
            entry.update(measure_experts(num_tokens, num_experts, top_k, intermediate, hidden, arguments))
            print(json.dumps(entry), flush=True)
            result["experts"].append(entry)
    output = arguments.output or RESULTS_DIRECTORY / "fp8-gemm-cuda.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
