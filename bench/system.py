"""The whole system against its engine alone: how much of the engine's throughput a job gets end to end.

Runs `deepbatch run`'s path in-process (embedded PostgreSQL and Redis unless DATABASE_URL / BROKER_URL are
set, migrations, one worker process, submit, wait), then the engine alone on the same prompts in this
process, and prints both completion-token rates and their ratio. While the job runs it samples how many
requests Postgres holds as running, which says whether the worker keeps the engine's batch full.
`--engine-process own shared` runs each job twice, the workers' engine in a process of its own and in the
worker's (DEEPBATCH_ENGINE_PROCESS), an A/B in one run. Each `--max-tokens` value is one job (per choice) and
one engine-alone run; all go into one JSON,
bench/results/system-<device>-<model>.json. The result cache is off, so every request runs.

Scale-out: `--workers 1 2` runs each job once per worker count, worker i on GPU i (CUDA_VISIBLE_DEVICES),
all on one job through the broker, and reports each count's throughput against one worker's.
`--kill-one-after S` SIGKILLs the last worker S seconds into each multi-worker job: the survivors take
its requests back when their leases expire (`DEEPBATCH_LEASE_S`, 30 s here; a reconcile every 10 s, against
120 s and 60 s by default), and the JSON says whether
every request succeeded exactly once and how much later the job ended than the same job unharmed.

    python bench/system.py                                   # the tiny DeepSeek-V3 on the CPU
    python bench/system.py --model shape-r1-distill-qwen-1.5b --prompts 4096 --max-tokens 128 8 --max-batch-size 256
    python bench/system.py --model shape-r1-distill-qwen-1.5b --prompts 8192 --max-tokens 128 --max-batch-size 256 \
        --workers 1 2 --kill-one-after 10 --repeat 3      # two GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"
WORDS = ("river moon bread prime volcano engine table garden window music number planet ocean forest winter "
         "summer city language history science light shadow stone glass paper story question answer").split()


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-deepseek-v3")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[32])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/deepbatch-bench-system"))
    parser.add_argument("--repeat", type=int, default=1, help="measure each output length this many times")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="worker processes, one per GPU")
    parser.add_argument("--kill-one-after", type=float, help="SIGKILL the last worker this many seconds into a "
                                                             "multi-worker job (then run the job unharmed too)")
    parser.add_argument("--engine-process", nargs="+", default=["auto"], choices=["auto", "own", "shared"],
                        help="DEEPBATCH_ENGINE_PROCESS of the workers; several: each job once per choice (an A/B)")
    parser.add_argument("--skip-engine-alone", action="store_true", help="system runs only (scale-out figures)")
    parser.add_argument("--engine-alone", type=Path, help=argparse.SUPPRESS)  # the child process's part
    return parser.parse_args()


def write_prompts(path: Path, count: int, max_tokens: int) -> None:
    """Plain greedy prompts of 20-200 words (no two alike, so the result cache never answers)."""
    generator = random.Random(0)
    with path.open("w") as stream:
        for _ in range(count):
            words = " ".join(generator.choice(WORDS) for _ in range(generator.randint(20, 200)))
            stream.write(json.dumps({"prompt": words, "max_tokens": max_tokens, "temperature": 0}) + "\n")


class RunningSampler(threading.Thread):
    """Samples `SELECT count(*) ... state = 'running'` every half second while the job runs."""

    def __init__(self, sessions, job_id: str):
        super().__init__(daemon=True)
        self.sessions, self.job_id, self.samples, self.stopped = sessions, job_id, [], threading.Event()

    def run(self) -> None:
        from sqlalchemy import text

        while not self.stopped.wait(0.5):
            with self.sessions() as session:
                self.samples.append(session.scalar(text(
                    "SELECT count(*) FROM requests WHERE job_id = :job AND state = 'running'"), {"job": self.job_id}))


def start_workers(settings, count: int, log_directory: Path) -> list:
    """`count` worker processes, worker i on GPU i where the machine has that many, each ready (its engine built
    and warmed up: it writes its ready file, as `run`'s worker does) before this returns: the job measures a
    running pool, not the workers' start-up, which differs from worker to worker and would otherwise count
    against the job whose window it opens."""
    import torch

    from producer.cli.progress import wait_for_worker
    from producer.embedded import start_worker_process

    started = []
    # Counted once: with CUDA_VISIBLE_DEVICES set for worker 0, torch counts that one GPU alone, and every
    # further worker would inherit worker 0's GPU.
    one_gpu_each = torch.cuda.device_count() >= count > 1
    for index in range(count):
        if one_gpu_each:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        log, ready = log_directory / f"worker-{count}-{index}.log", log_directory / f"worker-{count}-{index}.ready"
        log.unlink(missing_ok=True)
        started.append((start_worker_process(settings, log, ready_file=ready), ready, log))
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    for process, ready, log in started:
        wait_for_worker(process, ready, log, settings.model)
    return [process for process, _, _ in started]


def kill_later(worker, seconds: float, sampler: RunningSampler) -> threading.Event:
    """SIGKILLs `worker` `seconds` after the job's requests start running (the workers' start-up aside)."""
    cancelled = threading.Event()

    def kill() -> None:
        while not cancelled.wait(0.2) and not any(sampler.samples):
            pass
        if not cancelled.wait(seconds):
            worker.kill()

    threading.Thread(target=kill, daemon=True).start()
    return cancelled


JOB_FIGURES = """
    SELECT (SELECT min(created_at) FROM audit_events WHERE job_id = :job AND event = 'started'),
           (SELECT max(created_at) FROM audit_events WHERE job_id = :job AND event = 'succeeded'),
           (SELECT sum(completion_tokens) FROM results WHERE job_id = :job),
           (SELECT count(*) FROM results WHERE job_id = :job),
           (SELECT count(*) FROM (SELECT request_id FROM audit_events WHERE job_id = :job AND event = 'succeeded'
                                  GROUP BY request_id HAVING count(*) > 1) twice),
           (SELECT count(*) FROM audit_events WHERE job_id = :job AND event = 'started')"""
# Each worker's share of the job: whether a pool's workers kept pace with each other, or one lagged.
PER_WORKER = """
    SELECT e.worker, count(*), max(e.created_at), sum(s.completion_tokens)
    FROM audit_events AS e JOIN results AS s ON s.request_id = e.request_id
    WHERE e.job_id = :job AND e.event = 'succeeded' GROUP BY e.worker ORDER BY e.worker"""


def worker_figures(row, first_start) -> dict:
    """One worker's row of PER_WORKER: its requests, and its tokens/s up to its own last result."""
    worker, succeeded, last, tokens = row
    seconds = max((last - first_start).total_seconds(), 1e-3)
    return {"worker": worker, "succeeded": succeeded, "tokens_per_s": round(int(tokens) / seconds, 1),
            "last_result_s": round(seconds, 2)}


def run_system(arguments: argparse.Namespace, prompts_path: Path, max_tokens: int, workers: int = 1,
               kill_after: float | None = None) -> dict:
    from sqlalchemy import text

    from producer.cli.jobs import submit_with_progress
    from producer.cli.progress import wait_for_job
    from producer.embedded import embedded_services, stop_worker_process
    from schema.db import session_factory
    from schema.migrate import upgrade
    from schema.settings import get_settings

    base = get_settings()
    with embedded_services(base.data_dir, base.database_url, base.broker_url) as urls:
        settings = base.model_copy(update={"database_url": urls.database_url, "broker_url": urls.broker_url})
        upgrade(settings.sqlalchemy_url)
        processes = start_workers(settings, workers, arguments.data_dir)
        started = time.perf_counter()
        job_id = submit_with_progress(prompts_path, settings, use_result_cache=False)
        submitted = time.perf_counter()
        sessions = session_factory(settings.sqlalchemy_url, pool_size=2)
        sampler = RunningSampler(sessions, job_id)
        sampler.start()
        killer = kill_later(processes[-1], kill_after, sampler) if kill_after else None
        # A single worker's death ends the wait; with several, the survivors are expected to finish the job.
        progress = wait_for_job(settings, job_id, processes[0] if workers == 1 else None, poll_seconds=0.2)
        done = time.perf_counter()
        sampler.stopped.set()
        if killer:
            killer.set()
        for process in processes:
            stop_worker_process(process)
        with sessions() as session:
            first_start, last_success, completion_tokens, results, succeeded_twice, attempts = session.execute(
                text(JOB_FIGURES), {"job": job_id}).one()
            per_worker = [worker_figures(row, first_start)
                          for row in session.execute(text(PER_WORKER), {"job": job_id})]
    window = (last_success - first_start).total_seconds()
    samples = sampler.samples or [0]
    return {
        "workers": workers, "killed_one_after_s": kill_after,
        "status": progress.status, "succeeded": progress.succeeded, "submit_seconds": round(submitted - started, 2),
        "submit_to_done_seconds": round(done - started, 2), "first_start_to_last_result_seconds": round(window, 2),
        "completion_tokens": int(completion_tokens), "tokens_per_s": round(int(completion_tokens) / window, 1),
        "requests_per_s": round(progress.succeeded / window, 1),
        "results_rows": results, "requests_succeeded_more_than_once": succeeded_twice, "attempts_started": attempts,
        "running_requests_mean": round(sum(samples) / len(samples), 1), "running_requests_max": max(samples),
        "per_worker": per_worker,
    }


def run_engine_alone(arguments: argparse.Namespace, prompts_path: Path, max_tokens: int) -> dict:
    from worker.engine.engine import LLMEngine
    from worker.engine.tokenizer import PromptEncoder, load_tokenizer
    from worker.runtime import engine_config
    from schema.settings import get_settings

    encoder = PromptEncoder(load_tokenizer(arguments.model))
    lines = [json.loads(line) for line in prompts_path.read_text().splitlines()]
    prompts = [encoder.encode_prompt(line["prompt"]) for line in lines]
    from worker.engine.types import SamplingParams

    engine = LLMEngine(engine_config(get_settings()))
    engine.generate(prompts[:4], SamplingParams(max_tokens=4))  # warm-up
    started = time.perf_counter()
    completions = engine.generate(prompts, SamplingParams(max_tokens=max_tokens))
    seconds = time.perf_counter() - started
    engine.shutdown()
    tokens = sum(completion.completion_tokens for completion in completions)
    return {"seconds": round(seconds, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "requests_per_s": round(len(completions) / seconds, 1)}


def engine_alone_in_child(arguments: argparse.Namespace, prompts_path: Path, max_tokens: int) -> dict:
    """The engine alone in a process of its own, which gives the GPU back when it ends: the next job's worker
    sizes its KV cache from the memory it finds free."""
    command = [sys.executable, __file__, "--engine-alone", str(prompts_path), "--model", arguments.model,
               "--max-tokens", str(max_tokens), "--max-batch-size", str(arguments.max_batch_size)]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure(arguments: argparse.Namespace, prompts_path: Path, max_tokens: int, repetition: int) -> list[dict]:
    """One output length once: the system with each worker count (and a kill), then the engine alone."""
    runs = []
    for engine_process in arguments.engine_process:
        os.environ["DEEPBATCH_ENGINE_PROCESS"] = engine_process
        for count in arguments.workers:
            system = run_system(arguments, prompts_path, max_tokens, count)
            runs.append({"max_tokens": max_tokens, "repetition": repetition, "workers": count,
                         "engine_process": engine_process, "system": system})
    os.environ["DEEPBATCH_ENGINE_PROCESS"] = arguments.engine_process[0]
    for count in arguments.workers:
        if count > 1 and arguments.kill_one_after:
            unharmed = next(run["system"] for run in runs if run["workers"] == count)
            killed = run_system(arguments, prompts_path, max_tokens, count, arguments.kill_one_after)
            killed["job_ended_later_than_unharmed_s"] = round(  # first claim to last result, each
                killed["first_start_to_last_result_seconds"] - unharmed["first_start_to_last_result_seconds"], 2)
            runs.append({"max_tokens": max_tokens, "repetition": repetition, "workers": count,
                         "engine_process": arguments.engine_process[0], "system": killed, "kill": True})
    one = next((run["system"]["tokens_per_s"] for run in runs if run["workers"] == 1), None)
    for run in runs:
        if one and run["workers"] > 1 and not run.get("kill"):
            run["scale_out_ratio"] = round(run["system"]["tokens_per_s"] / one, 3)
    if not arguments.skip_engine_alone:
        engine = engine_alone_in_child(arguments, prompts_path, max_tokens)
        for run in runs:
            run["engine_alone"] = engine
            if run["workers"] == 1:
                run["system_share_of_engine_throughput"] = round(run["system"]["tokens_per_s"] / engine["tokens_per_s"], 3)
    for run in runs:
        print(json.dumps(run, indent=2), flush=True)
    return runs


def share_key(max_tokens: int, engine_process: str, arguments: argparse.Namespace) -> str:
    """`128`, or `128-own` when the run compares where the engine runs."""
    return str(max_tokens) if len(arguments.engine_process) == 1 else f"{max_tokens}-{engine_process}"


def main() -> None:
    arguments = parse_arguments()
    if arguments.engine_alone is not None:
        print(json.dumps(run_engine_alone(arguments, arguments.engine_alone, arguments.max_tokens[0])))
        return
    arguments.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(DEEPBATCH_MODEL=arguments.model, DEEPBATCH_MAX_BATCH_SIZE=str(arguments.max_batch_size),
                      DEEPBATCH_DATA_DIR=str(arguments.data_dir), DEEPBATCH_METRICS_PORT="0",
                      DEEPBATCH_MAX_MODEL_LEN="1024", DEEPBATCH_MAX_NUM_BATCHED_TOKENS="8192")
    if arguments.kill_one_after:  # a killed worker's requests come back after a lease and a reconcile tick
        os.environ.setdefault("DEEPBATCH_LEASE_S", "30")
        os.environ.setdefault("DEEPBATCH_RECONCILE_INTERVAL_S", "10")
    runs = []
    for repetition in range(1, arguments.repeat + 1):
        for max_tokens in arguments.max_tokens:
            prompts_path = arguments.data_dir / f"prompts-{max_tokens}.jsonl"
            write_prompts(prompts_path, arguments.prompts, max_tokens)
            runs.extend(measure(arguments, prompts_path, max_tokens, repetition))
    shares = {share_key(tokens, engine_process, arguments):
              sorted(run["system_share_of_engine_throughput"] for run in runs
                     if run["max_tokens"] == tokens and run.get("engine_process") == engine_process
                     and "system_share_of_engine_throughput" in run)
              for tokens in arguments.max_tokens for engine_process in arguments.engine_process}
    scale_out = {f"{tokens}-tokens-{count}-workers": sorted(run["scale_out_ratio"] for run in runs
                                                           if run["max_tokens"] == tokens and run["workers"] == count
                                                           and "scale_out_ratio" in run)
                 for tokens in arguments.max_tokens for count in arguments.workers if count > 1}
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"model": arguments.model, "device": device, "prompts": arguments.prompts,
              "max_batch_size": arguments.max_batch_size, "workers": arguments.workers,
              "system_share_of_engine_throughput": shares, "scale_out_ratio_against_one_worker": scale_out,
              "runs": runs}
    RESULTS_DIRECTORY.mkdir(parents=True, exist_ok=True)
    workers = "" if arguments.workers == [1] else "-workers-" + "-".join(map(str, arguments.workers))
    if len(arguments.engine_process) > 1:
        workers += "-engine-process-" + "-".join(arguments.engine_process)
    label = re.sub(r"[^A-Za-z0-9]+", "-", f"{device}-{arguments.model}{workers}").strip("-").lower()
    (RESULTS_DIRECTORY / f"system-{label}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
