"""Which launch configuration of the FP8 kernels (worker/engine/kernels/fp8_gemm.py, grouped_gemm.py) is fastest
at the shapes a decode step runs: a sweep over output tiles, warps, pipeline stages and the layout b is loaded
in.

Every call is timed inside a CUDA graph (`--calls` calls per replay, as a decode step runs them), so the
figure is the GPU's time, not the host's launches. The baseline is what the same projection costs in
bf16 in the same run: `torch._grouped_mm` for the routed experts, `torch.matmul` for dense projections.
The FP8 time includes quantizing the activations and, for experts, laying out the tiles. Each
configuration is timed `--repeats` times; the JSON keeps every configuration's median and the best one
per shape with its worst and median speedup over bf16.

    python bench/fp8_tiles.py --model deepseek-v2-lite --tokens 256 512

FP8 experts also sweep the swapped grouped kernel's tiles (SWAPPED_GRID; "swapped" in the JSON's config).
`--weights bf16` sweeps the same grouped kernel unscaled (grouped_linear, 16-bit experts) against torch's
grouped GEMM instead, over tiles of 64-column K slices:

    python bench/fp8_tiles.py --model deepseek-v2-lite --tokens 256 512 --weights bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fp8_gemm import EXPERT_SHAPES, SHAPES, bf16_grouped, expert_operands, relative_error  # noqa: E402
from worker.engine.kernels import fp8_gemm, grouped_gemm  # noqa: E402
from worker.engine.kernels.fp8_blocks import quantize_weight_blocks  # noqa: E402

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"
# Tile rows, tile columns, warps, stages, b by rows.
GRID = list(itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3, 4), (False, True)))
# The swapped grouped kernel (FP8 experts): an expert's rows, weight rows (dividing the 128-row scale block),
# warps, stages.
SWAPPED_GRID = list(itertools.product((16, 32, 64), (64, 128), (4, 8), (3, 4, 5)))
BLOCK_K = {"fp8": 128, "bf16": 64}  # FP8 tiles span a scale block; 64 keeps four bf16 stages in shared memory


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted({shape[0] for shape in SHAPES}), default="deepseek-v2-lite")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 512], help="tokens of a decode step")
    parser.add_argument("--weights", choices=sorted(BLOCK_K), default="fp8",
                        help="bf16: the grouped kernel unscaled against torch's grouped GEMM (experts only)")
    parser.add_argument("--kinds", nargs="+", choices=("experts", "dense"), default=["experts", "dense"],
                        help="which products to sweep (dense ones in FP8 only)")
    parser.add_argument("--calls", type=int, default=20, help="calls captured in one graph")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    return parser.parse_args()


def graph_seconds(function, calls: int, repeats: int) -> list[float]:
    """Seconds per call of `function`, captured `calls` times in a CUDA graph and replayed `repeats` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            function()
    graph.replay()
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000 / calls)
    return seconds


def tiles_to_sweep(arguments, experts: bool) -> list[tuple[list, fp8_gemm.GemmTiles]]:
    """(the JSON's name of a configuration, its tiles): GRID, and for FP8 experts SWAPPED_GRID too."""
    configurations = [([block_m, block_n, num_warps, num_stages, b_rows],
                       fp8_gemm.GemmTiles(block_m, block_n, num_warps, num_stages, b_rows, BLOCK_K[arguments.weights]))
                      for block_m, block_n, num_warps, num_stages, b_rows in GRID]
    if experts and arguments.weights == "fp8":
        configurations += [([block_m, block_n, num_warps, num_stages, "swapped"],
                            fp8_gemm.GemmTiles(block_m, block_n, num_warps, num_stages, swapped=True))
                           for block_m, block_n, num_warps, num_stages in SWAPPED_GRID]
    return configurations


def sweep(baseline, fp8_call, arguments, experts: bool = False) -> dict:
    """Every configuration of GRID against the bf16 baseline. A configuration's output must match the
    heuristic's (same FP8 arithmetic, another summation order) within 1%, and the heuristic's the baseline's
    in bf16; those that fail are noted."""
    reference = fp8_call(None)
    if arguments.weights == "bf16" and relative_error(reference, baseline()) >= 0.01:
        raise AssertionError("the unscaled grouped kernel does not match torch's grouped GEMM")
    bf16_seconds = graph_seconds(baseline, arguments.calls, arguments.repeats)
    configurations = []
    for name, config in tiles_to_sweep(arguments, experts):
        entry = {"config": name}
        try:
            entry["error"] = relative_error(fp8_call(config), reference)
            seconds = graph_seconds(lambda: fp8_call(config), arguments.calls, arguments.repeats)
        except Exception as error:  # noqa: BLE001 - a configuration the compiler refuses is a result too
            entry["failed"] = f"{type(error).__name__}: {str(error)[:120]}"
            configurations.append(entry)
            continue
        entry["us_median"] = round(1e6 * statistics.median(seconds), 1)
        entry["seconds"] = seconds
        configurations.append(entry)
    timed = [entry for entry in configurations if "seconds" in entry and entry["error"] < 0.01]
    best = min(timed, key=lambda entry: statistics.median(entry["seconds"]))
    return {"bf16_us_median": round(1e6 * statistics.median(bf16_seconds), 1),
            "default_us_median": round(1e6 * statistics.median(
                graph_seconds(lambda: fp8_call(None), arguments.calls, arguments.repeats)), 1),
            "best": {"config": best["config"], "us_median": best["us_median"],
                     "speedup_worst": round(min(bf16_seconds) / max(best["seconds"]), 3),
                     "speedup_median": round(statistics.median(bf16_seconds) / statistics.median(best["seconds"]), 3)},
            "configurations": [{key: value for key, value in entry.items() if key != "seconds"}
                               for entry in configurations]}


def sweep_experts(model: str, num_tokens: int, arguments) -> list[dict]:
    results = []
    for name, num_experts, top_k, intermediate, hidden in EXPERT_SHAPES:
        if name != model:
            continue
        for projection, num_columns, num_inner in (("gate_up_proj", 2 * intermediate, hidden),
                                                   ("down_proj", hidden, intermediate)):
            operands = expert_operands(num_tokens, num_experts, top_k, num_columns, num_inner)
            baseline = lambda: bf16_grouped(operands)  # noqa: E731
            if arguments.weights == "bf16":
                fp8_call = lambda config: grouped_gemm.grouped_linear(  # noqa: E731
                    operands["rows"], operands["weights_bf16"], operands["rows_per_expert"], config)
            else:
                fp8_call = lambda config: grouped_gemm.fp8_grouped_linear(  # noqa: E731
                    operands["rows"], operands["weights"], operands["scales"], operands["rows_per_expert"], config)
            entry = {"model": model, "projection": f"experts {projection}", "tokens": num_tokens,
                     "rows_per_expert_mean": num_tokens * top_k / num_experts, "N": num_columns, "K": num_inner}
            entry.update(sweep(baseline, fp8_call, arguments, experts=True))
            print(json.dumps({key: value for key, value in entry.items() if key != "configurations"}), flush=True)
            results.append(entry)
    return results


def sweep_dense(model: str, num_rows: int, arguments) -> list[dict]:
    results = []
    for name, projection, num_columns, num_inner in SHAPES:
        if name != model:
            continue
        x = torch.randn(num_rows, num_inner, device="cuda", dtype=torch.bfloat16)
        weight_bf16 = (torch.randn(num_columns, num_inner, device="cuda") * 0.02).to(torch.bfloat16)
        weight, scale = quantize_weight_blocks(weight_bf16)
        baseline = lambda: torch.matmul(x, weight_bf16.T)  # noqa: E731

        def fp8_call(config):
            x_fp8, x_scale = fp8_gemm.quantize_per_token_group(x)
            return fp8_gemm.block_scaled_matmul(x_fp8, x_scale, weight, scale, torch.bfloat16, config)

        entry = {"model": model, "projection": projection, "M": num_rows, "N": num_columns, "K": num_inner}
        entry.update(sweep(baseline, fp8_call, arguments))
        print(json.dumps({key: value for key, value in entry.items() if key != "configurations"}), flush=True)
        results.append(entry)
    return results


def main() -> None:
    arguments = parse_arguments()
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": arguments.model,
              "weights": arguments.weights,
              "calls_per_graph": arguments.calls, "repeats": arguments.repeats,
              "grid": "block_m, block_n, num_warps, num_stages, b_rows", "experts": [], "dense": []}
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    prefix = "fp8-tiles" if arguments.weights == "fp8" else "grouped-bf16-tiles"
    output = arguments.output or RESULTS_DIRECTORY / f"{prefix}-{device}-{arguments.model}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    # Experts first (most of a MoE decode step), and the file rewritten after each: a sweep cut short keeps
    # what it measured.
    sweeps = {"experts": sweep_experts, "dense": sweep_dense}
    kinds = [(kind, sweeps[kind]) for kind in arguments.kinds if kind == "experts" or arguments.weights == "fp8"]
    for kind, sweep_shapes in kinds:
        for num_tokens in arguments.tokens:
            result[kind] += sweep_shapes(arguments.model, num_tokens, arguments)
            output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
