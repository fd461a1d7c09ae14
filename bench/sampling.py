"""What sampling a decode step's rows costs on a GPU: the Triton kernel (worker/engine/kernels/sampling.py)
against the torch ops it replaced there (worker/engine/sampler.py's CPU path: sort, softmax, cumulative sums,
scatter, search), in the same run, at Qwen2's vocabulary (151,936) in bfloat16.

Logits are drawn flat (a random model's: the top-p nucleus holds most of the vocabulary) and peaked (a
trained model's: a nucleus of a dozen tokens). Each figure is the median of 20 timed calls; the run repeats
that --repeats times and reports the median and the worst.

    python bench/sampling.py --rows 64 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.kernels.sampling import sample_rows  # noqa: E402
from worker.engine.sampler import Sampler, sample_by_inverse_transform  # noqa: E402

VOCAB = 151936
CASES = {"temperature": (0, 1.0), "top_p_0.95": (0, 0.95), "top_k_50_top_p_0.95": (50, 0.95)}


def median_ms(call, calls: int = 20) -> float:
    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(rows: int, spread: float, top_k: int, top_p: float) -> dict[str, float]:
    logits = (torch.randn(rows, VOCAB, device="cuda") * spread).to(torch.bfloat16)
    row_ids = torch.arange(rows, device="cuda")
    temperatures = torch.full((rows,), 0.8, device="cuda")
    top_ks = torch.full((rows,), top_k, device="cuda")
    top_ps = torch.full((rows,), top_p, device="cuda")
    uniforms = torch.rand(rows, device="cuda")
    tokens = torch.empty(rows, dtype=torch.long, device="cuda")
    cut = top_ks if (top_k > 0 or top_p < 1) else None

    def torch_ops():
        probabilities = Sampler.probabilities(logits.float(), temperatures, cut, top_ps)
        return sample_by_inverse_transform(probabilities, uniforms)

    def kernel():
        sample_rows(logits, row_ids, temperatures, top_ks, top_ps, uniforms, tokens)

    return {"torch_ms": median_ms(torch_ops), "kernel_ms": median_ms(kernel)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    arguments = parser.parse_args()
    results = []
    for rows in arguments.rows:
        for logits_kind, spread in (("flat", 1.0), ("peaked", 6.0)):
            for case, (top_k, top_p) in CASES.items():
                runs = [measure(rows, spread, top_k, top_p) for _ in range(arguments.repeats)]
                ratios = [run["torch_ms"] / run["kernel_ms"] for run in runs]
                results.append({
                    "rows": rows, "logits": logits_kind, "case": case,
                    "torch_ms": [round(run["torch_ms"], 3) for run in runs],
                    "kernel_ms": [round(run["kernel_ms"], 3) for run in runs],
                    "torch_over_kernel_median": round(statistics.median(ratios), 2),
                    "torch_over_kernel_worst": round(min(ratios), 2),
                })
                print(json.dumps(results[-1]))
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    output = arguments.output or Path(__file__).resolve().parent / "results" / f"sampling-cuda-{device}.json"
    output.write_text(json.dumps({"command": "python bench/sampling.py " + " ".join(sys.argv[1:]),
                                  "device": torch.cuda.get_device_name(), "vocab": VOCAB, "temperature": 0.8,
                                  "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
