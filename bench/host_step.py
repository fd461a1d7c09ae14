"""The host's share of a decode step: what the engine's Python does per step around the GPU's work, at a batch size.

A decode step on the GPU is one CUDA-graph replay; around it the engine's thread schedules the batch, lays the
step's integers out for the graph (worker/engine/gpu_runner.py's `decode_layout` and its packing), and after
the step records it and appends each sequence's token. None of that overlaps the GPU, so at large batches it
is a visible share of the step (V2-Lite at batch 1024 decodes in about 26 ms on an H200). This times those
four parts on `--batch` running sequences with prompts of 64-512 tokens, real scheduler and block manager
(prefix caching on), no model: the tokens are fixed.

With `--baseline DIR` (another checkout's root) both trees are measured in turn, each in a fresh process,
`--repeats` times, and the ratio baseline/this is reported per repeat with its worst and median.

    python bench/host_step.py --batch 256 1024 --baseline /tmp/base --repeats 5

JSON into bench/results/host-step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("schedule", "layout", "record", "append")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout's root, measured alike in the same run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "host-step.json")
    return parser.parse_args()


class EngineStandIn:
    """What LLMEngine._append_token reads of its engine: the scheduler, the EOS ids, the length cap."""

    def __init__(self, scheduler):
        self.scheduler, self.eos_token_ids, self.max_model_len = scheduler, frozenset({1}), 1 << 30


def measure(batch: int, steps: int) -> dict[str, float]:
    """Median milliseconds per step of each part, for `batch` decoding sequences (imports the tree on sys.path)."""
    from worker.engine.block_manager import BlockManager
    from worker.engine.engine import LLMEngine
    from worker.engine.gpu_runner import decode_layout
    from worker.engine.scheduler import Scheduler
    from worker.engine.sequence import Sequence
    from worker.engine.types import SamplingParams

    generator = random.Random(0)
    scheduler = Scheduler(BlockManager(batch * 64, 16), batch, 1 << 20)
    sampling = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
    for _ in range(batch):
        prompt = [generator.randrange(2, 100_000) for _ in range(generator.randrange(64, 513))]
        scheduler.add(Sequence(prompt, sampling))
    for item in scheduler.schedule().scheduled:  # the prefill, not timed
        scheduler.record_step(item)
    engine = EngineStandIn(scheduler)
    for sequence in scheduler.running:
        LLMEngine._append_token(engine, sequence, 7)
    times: dict[str, list[float]] = {part: [] for part in PARTS}
    for step in range(steps):
        started = time.perf_counter()
        plan = scheduler.schedule()
        scheduled = time.perf_counter()
        sequences = [item.sequence for item in plan.scheduled]
        width = max(len(sequence.block_table) for sequence in sequences)
        decode_layout(sequences, batch, width, 16, batch * 64).pack()
        laid_out = time.perf_counter()
        for item in plan.scheduled:
            scheduler.record_step(item)
        recorded = time.perf_counter()
        for sequence in sequences:
            LLMEngine._append_token(engine, sequence, 2 + step)
        appended = time.perf_counter()
        for part, (start, end) in zip(PARTS, ((started, scheduled), (scheduled, laid_out), (laid_out, recorded),
                                              (recorded, appended))):
            times[part].append((end - start) * 1000)
    medians = {part: round(statistics.median(values), 3) for part, values in times.items()}
    return {**medians, "total": round(sum(medians.values()), 3)}


def measure_tree(root: Path, batch: int, steps: int) -> dict[str, float]:
    environment = {**os.environ, "PYTHONPATH": str(root)}
    completed = subprocess.run([sys.executable, __file__, "--child", "--batch", str(batch), "--steps", str(steps)],
                               env=environment, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    arguments = parse_arguments()
    if arguments.child:
        print(json.dumps(measure(arguments.batch[0], arguments.steps)))
        return
    results = {"command": " ".join(["python bench/host_step.py", *sys.argv[1:]]), "steps": arguments.steps,
               "cpu_count": os.cpu_count(), "batches": {}}
    for batch in arguments.batch:
        runs = []
        for repeat in range(arguments.repeats):
            run = {"repeat": repeat + 1, "this": measure_tree(ROOT, batch, arguments.steps)}
            if arguments.baseline:
                run["baseline"] = measure_tree(arguments.baseline.resolve(), batch, arguments.steps)
                run["baseline_over_this"] = round(run["baseline"]["total"] / run["this"]["total"], 3)
            print(batch, run, flush=True)
            runs.append(run)
        summary = {"this_total_ms_median": statistics.median(run["this"]["total"] for run in runs)}
        if arguments.baseline:
            ratios = [run["baseline_over_this"] for run in runs]
            summary.update(baseline_total_ms_median=statistics.median(run["baseline"]["total"] for run in runs),
                           speedup_worst=min(ratios), speedup_median=statistics.median(ratios))
        results["batches"][str(batch)] = {**summary, "runs": runs}
        print(batch, summary, flush=True)
    arguments.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
