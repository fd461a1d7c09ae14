"""Where a decode step's time goes: GPU kernel time by kind, against the step's wall time.

A batch job spends nearly all its time in decode steps, and a decode step is memory-bound: its floor is
the bytes it must read (the weights once, plus every context position's KV) over the HBM bandwidth. This
fills the engine with `--batch` sequences of `--prompt-len` tokens, lets prefill finish, then times
`--steps` decode steps twice: as the engine runs them (CUDA graphs where it uses them) by the wall clock,
and under torch.profiler, whose kernel times are summed by kind — attention (the paged kernel), GEMMs,
MoE routing and grouped GEMMs, sampling, norms/rotary/activations, copies, and the rest. The step's wall
time less its kernels' time is what the host (Python, launches, synchronisation) costs.

    python bench/decode_profile.py --model shape-r1-distill-qwen-1.5b --batch 512 --prompt-len 384
    python bench/decode_profile.py --model shape-deepseek-v2-lite --batch 256 --prompt-len 384

Results go to bench/results/decode-profile-<device>-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import GIB, copy_bandwidth, engine_weight_bytes  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402
from worker.engine.types import EngineConfig, SamplingParams  # noqa: E402

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"

# Kernel name patterns, first match wins. GEMMs by library name; the MoE's sort/scatter by torch op names.
KINDS = (
    ("nccl", r"nccl"),  # tensor parallel's all-reduces and gathers, rank 0's view
    ("attention", r"paged_attention"),
    ("moe", r"grouped|_grouped_mm|index_add|argsort|sort|radix|scatter|gather_topk|topk|bincount"),
    ("gemm", r"gemm|sm90_xmma|cutlass|cublas|nvjet|matmul|wgmma|_mm_"),
    ("sampling", r"argmax|softmax|multinomial|exponential|cumsum|max_kernel|reduce_kernel"),
    ("norm_rope_act", r"rms|rotary|rope|silu|act_and_mul|fused|norm"),
    ("copy", r"copy|memcpy|memset|cat|index_select|elementwise_kernel_with_index"),
)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shape-r1-distill-qwen-1.5b")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=384)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quantization", default=None, help="passed to the engine where it knows the field")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks of the engine; the figures are rank 0's (its weights, its kernels)")
    parser.add_argument("--output", type=Path)
    return parser.parse_args()


def kind_of(kernel_name: str) -> str:
    lowered = kernel_name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


class DecodeSteps:
    """Runs the engine's step loop by hand after filling it, so that each measured step is a decode step."""

    def __init__(self, engine: LLMEngine, batch: int, prompt_len: int, max_tokens: int):
        self.engine = engine
        generator = torch.Generator().manual_seed(1)
        vocab = engine.hf_config.vocab_size
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.futures = [engine.submit(torch.randint(2, vocab, (prompt_len,), generator=generator).tolist(), sampling)
                        for _ in range(batch)]

    def wait_for_decode(self) -> None:
        """Until every sequence has its prompt computed (the engine's own loop runs the prefill)."""
        scheduler = self.engine.scheduler
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            running = list(scheduler.running)
            if len(running) == len(self.futures) and not scheduler.waiting and all(
                    sequence.num_computed_tokens >= len(sequence.prompt_token_ids) for sequence in running):
                return
            time.sleep(0.01)
        raise TimeoutError("prefill did not finish")


def timed_steps(engine: LLMEngine, steps: int, graphs: dict | None = None) -> list[float]:
    """Wall seconds of `steps` decode steps, as the engine's loop runs them (the whole step: scheduling, the
    runner, the tokens read back; a launched step ends once the one before is read, so these are the steps'
    period); with `graphs` given, the runner's CUDA graphs are set to them on the engine's own thread before
    each step (never under a running step)."""
    seconds: list[float] = []
    step = engine.step

    def timed():
        if graphs is not None:
            engine.runner.graphs = graphs
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)

    engine.step = timed
    deadline = time.monotonic() + 300
    try:
        while len(seconds) < steps:
            if time.monotonic() > deadline or not engine.scheduler.running:
                raise RuntimeError(f"only {len(seconds)} of {steps} decode steps ran (see the engine's log)")
            time.sleep(0.005)
    finally:
        del engine.step  # the class's method again
    return seconds[:steps]


def profiled_kernels(engine: LLMEngine, steps: int, graphs: dict | None) -> dict[str, float]:
    """Milliseconds of GPU kernel time per step, by kind, over `steps` steps under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as profiler:
        timed_steps(engine, steps, graphs)
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(event.name)] += event.device_time / 1000 / steps
            top[event.name] += event.device_time / 1000 / steps
    by_kind = {kind: round(ms, 3) for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1])}
    by_kind["_top_kernels_ms"] = {name[:120]: round(ms, 3) for name, ms in sorted(top.items(), key=lambda i: -i[1])[:15]}
    return by_kind


def step_figures(engine: LLMEngine, arguments: argparse.Namespace, step_bytes: int, bandwidth: float,
                 graphs: dict | None) -> dict:
    wall = sorted(timed_steps(engine, arguments.steps, graphs))
    median = wall[len(wall) // 2]
    return {"step_ms_median": round(1000 * median, 3), "step_ms_worst": round(1000 * wall[-1], 3),
            "roofline_fraction": round(step_bytes / bandwidth / median, 3),
            "decode_tokens_per_s": round(arguments.batch / median, 1)}


def run(arguments: argparse.Namespace, bandwidth: float, report) -> None:
    """One engine: decode steps from its CUDA graphs, then eagerly (graphs set aside) under the profiler.
    The figures are reported before the engine shuts down, so a teardown that fails cannot lose them."""
    fields = dict(model=arguments.model, device="cuda", dtype="bfloat16", max_batch_size=arguments.batch,
                  max_num_batched_tokens=max(8192, arguments.batch), max_wait_ms=0.0,
                  max_model_len=arguments.prompt_len + 8 * arguments.steps + 64,
                  tensor_parallel_size=arguments.tensor_parallel_size)
    if arguments.quantization and "quantization" in EngineConfig.__dataclass_fields__:
        fields["quantization"] = arguments.quantization
    engine = LLMEngine(EngineConfig(**fields))
    try:
        work = DecodeSteps(engine, arguments.batch, arguments.prompt_len, 8 * arguments.steps + 32)
        work.wait_for_decode()
        context = arguments.prompt_len + 2 * arguments.steps  # mean context over the measured steps, roughly
        kv_bytes = arguments.batch * context * engine.model.kv_cache_bytes_per_token(engine.dtype)
        step_bytes = engine_weight_bytes(engine) + kv_bytes
        result: dict = {"weights_gib": round(engine_weight_bytes(engine) / GIB, 3), "kv_read_gib": round(kv_bytes / GIB, 3),
                        "roofline_step_ms": round(1000 * step_bytes / bandwidth, 3)}
        graphs = getattr(engine.runner, "graphs", {})
        if graphs:
            result["graphs"] = step_figures(engine, arguments, step_bytes, bandwidth, graphs)
            result["graphs"]["kernel_ms_per_step"] = profiled_kernels(engine, arguments.steps, graphs)
        result["eager"] = step_figures(engine, arguments, step_bytes, bandwidth, {})
        result["eager"]["kernel_ms_per_step"] = profiled_kernels(engine, arguments.steps, {})
        kernels = sum(ms for kind, ms in result["eager"]["kernel_ms_per_step"].items() if not kind.startswith("_"))
        result["eager"]["host_ms_per_step"] = round(result["eager"]["step_ms_median"] - kernels, 3)
        for future in work.futures:
            future.cancel()
        report(result)
    finally:
        engine.shutdown()


def main() -> None:
    arguments = parse_arguments()
    bandwidth = copy_bandwidth(torch.device("cuda"))
    header = {"model": arguments.model, "device": torch.cuda.get_device_name(), "batch": arguments.batch,
              "tensor_parallel_size": arguments.tensor_parallel_size,
              "prompt_len": arguments.prompt_len, "steps": arguments.steps, "quantization": arguments.quantization,
              "measured_copy_bandwidth_tb_s": round(bandwidth / 1e12, 3)}
    run(arguments, bandwidth, lambda figures: save(arguments, {**header, **figures}))


def save(arguments: argparse.Namespace, result: dict) -> None:
    print(json.dumps(result, indent=2), flush=True)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", arguments.model)
    suffix = (f"-{arguments.quantization}" if arguments.quantization else "") + (
        f"-tp{arguments.tensor_parallel_size}" if arguments.tensor_parallel_size > 1 else "")
    output = arguments.output or RESULTS_DIRECTORY / f"decode-profile-cuda-{label}-b{arguments.batch}{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
