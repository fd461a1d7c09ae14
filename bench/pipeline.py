"""The pipeline without a GPU: how many requests per second the queue and database path carries.

Submits N requests with `deepbatch submit` (a child process), then runs one `deepbatch worker` with the
`null` engine (DEEPBATCH_ENGINE=null: every request answered at once with max_tokens tokens), so what is
measured is everything but the model: broker, claims, prompt encoding, recording, audit chain. Each run
gets a fresh database on the PostgreSQL server (DATABASE_URL, default the local one) and its own queue.

Reports, per broker: requests/s from the first claim to the last result (audit timestamps), submit
lines/s, and the peak RSS of the submit and worker processes. The baseline, measured in the same run on
the same services: the release before slices (`--baseline-ref`, default 5d21216) — its per-request
pipeline, run from a git worktree with the same null engine on fewer requests (`--baseline-requests`).

    python bench/pipeline.py                                   # 100,000 requests, Redis and RabbitMQ
    python bench/pipeline.py --requests 20000 --brokers redis --baseline-requests 0

The worker runs with a GPU worker's batch size (--max-batch-size 256: queue depth 512, slices of 256);
the baseline release with its own defaults (64 threads, one request per message).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIRECTORY = REPO_ROOT / "bench" / "results"
BROKERS = {"redis": "redis://127.0.0.1:6379/13", "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//"}
# A factory the baseline release can load by module path (it predates DEEPBATCH_ENGINE=null).
NULL_FACTORY = "worker.engine.null_engine:build_null_engine"
BASELINE_NULL_MODULE = '''
from concurrent.futures import Future
from worker.engine.types import Completion

class NullEngine:
    def __init__(self, config): pass
    def submit(self, prompt_token_ids, sampling):
        future = Future()
        future.set_result(Completion([0] * sampling.max_tokens, "null " * sampling.max_tokens, "length",
                                     len(prompt_token_ids)))
        return future
    def shutdown(self): pass

def build(config):
    return NullEngine(config)
'''


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--brokers", default="redis,rabbitmq", help="comma-separated: redis, rabbitmq")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--baseline-ref", default="5d21216", help="git commit of the per-request pipeline")
    parser.add_argument("--baseline-requests", type=int, default=3000, help="0 skips the baseline")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--max-batch-size", type=int, default=256,
                        help="the worker's DEEPBATCH_MAX_BATCH_SIZE: a GPU worker's, which sets its queue depth")
    parser.add_argument("--profile", type=Path, help="record the worker with py-spy: collapsed stacks into this file")
    return parser.parse_args()


def write_prompts(path: Path, count: int, max_tokens: int) -> None:
    """Short classification-style prompts, each different (sampled, so the result cache never answers)."""
    with path.open("w") as stream:
        for n in range(count):
            stream.write(json.dumps({"prompt": f"Classify the sentiment of review #{n}: the product arrived "
                                               f"{'late' if n % 3 else 'on time'} and works.",
                                     "max_tokens": max_tokens}) + "\n")


@contextmanager
def fresh_database(server_url: str, keep: bool = False):
    """A database of its own on `server_url`'s server, dropped afterwards unless `keep` (for inspection)."""
    name = f"deepbatch_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server_url.rsplit("/", 1)[0] + "/" + name
    finally:
        if not keep:
            with psycopg.connect(server_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_measured(command: list[str], env: dict, cwd: Path, timeout: float) -> tuple[float, int, str]:
    """Run to the end; returns (seconds, peak RSS in MB, output)."""
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{text[-3000:]}")
    return seconds, usage.ru_maxrss // 1024, text


def job_counts(database_url: str, job_id: str) -> dict:
    with psycopg.connect(database_url) as connection:
        row = connection.execute("""
            SELECT count(*) FILTER (WHERE state NOT IN ('queued', 'running')),
                   count(*) FILTER (WHERE state = 'succeeded'), count(*),
                   (SELECT min(created_at) FROM audit_events WHERE job_id = %(j)s AND event = 'started'),
                   (SELECT max(created_at) FROM audit_events WHERE job_id = %(j)s AND event = 'succeeded'),
                   (SELECT count(*) FROM results WHERE job_id = %(j)s)
            FROM requests WHERE job_id = %(j)s""", {"j": job_id}).fetchone()
    return dict(zip(("finished", "succeeded", "total", "first_claim", "last_result", "results"), row))


def wait_for_job(database_url: str, job_id: str, count: int, worker: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (counts := job_counts(database_url, job_id))["finished"] < count:
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker stopped or timed out at {counts}")
        time.sleep(0.5)
    return counts


def run_pipeline(source: Path, broker_url: str, server_url: str, prompts: Path, count: int, env_extra: dict,
                 timeout: float, profile: Path | None = None) -> dict:
    """Migrate, submit, run one worker to the end, stop it; what the clock and the database say."""
    python = sys.executable
    with fresh_database(server_url) as database_url:
        env = {**os.environ, "DEEPBATCH_DATABASE_URL": database_url, "DEEPBATCH_BROKER_URL": broker_url,
               "DEEPBATCH_QUEUE_NAME": f"bench-{uuid.uuid4().hex[:8]}", "DEEPBATCH_METRICS_PORT": "0",
               "PYTHONPATH": str(source), **env_extra}
        subprocess.run([python, "-m", "producer.cli", "migrate"], env=env, cwd=source, check=True, capture_output=True)
        submit_seconds, submit_rss, output = run_measured([python, "-m", "producer.cli", "submit", str(prompts)],
                                                          env, source, timeout)
        job_id = output.strip().splitlines()[-1]
        command = [python, "-m", "producer.cli", "worker", "--loglevel", "WARNING"]
        if profile is not None:
            command = ["py-spy", "record", "--threads", "--format", "raw", "-o", str(profile), "--", *command]
        worker = subprocess.Popen(command, env=env,
                                  cwd=source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            counts = wait_for_job(database_url, job_id, count, worker, timeout)
        finally:  # a warm shutdown; py-spy writes its profile on SIGINT
            worker.send_signal(signal.SIGINT)
            _, _, usage = os.wait4(worker.pid, 0)
        purge_queue(env)
    window = (counts["last_result"] - counts["first_claim"]).total_seconds()
    return {"requests": count, "succeeded": counts["succeeded"], "results": counts["results"],
            "first_claim_to_last_result_s": round(window, 2), "requests_per_s": round(count / window, 1),
            "submit_s": round(submit_seconds, 2), "submit_lines_per_s": round(count / submit_seconds, 1),
            "submit_peak_rss_mb": submit_rss, "worker_peak_rss_mb": usage.ru_maxrss // 1024}


def purge_queue(env: dict) -> None:
    from kombu import Connection

    with Connection(env["DEEPBATCH_BROKER_URL"]) as connection:
        channel = connection.default_channel
        for name in (env["DEEPBATCH_QUEUE_NAME"], env["DEEPBATCH_QUEUE_NAME"] + ".dead"):
            try:
                channel.queue_delete(name)
            except Exception:  # noqa: BLE001 - a queue that was never declared
                pass


@contextmanager
def baseline_tree(ref: str):
    """The baseline release in a git worktree, with a null engine module it can load."""
    directory = Path(tempfile.mkdtemp(prefix="deepbatch-baseline-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(directory), ref], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    (directory / "bench_null_engine.py").write_text(BASELINE_NULL_MODULE)
    try:
        yield directory
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(directory)], cwd=REPO_ROOT, capture_output=True)


def main() -> None:
    arguments = parse_arguments()
    work = Path(tempfile.mkdtemp(prefix="deepbatch-bench-pipeline-"))
    prompts, baseline_prompts = work / "prompts.jsonl", work / "baseline.jsonl"
    write_prompts(prompts, arguments.requests, arguments.max_tokens)
    write_prompts(baseline_prompts, arguments.baseline_requests, arguments.max_tokens)
    result: dict = {"requests": arguments.requests, "max_tokens": arguments.max_tokens, "cpus": os.cpu_count(),
                    "brokers": {}}
    for broker in arguments.brokers.split(","):
        url = BROKERS[broker]
        worker_settings = {"DEEPBATCH_ENGINE": "null", "DEEPBATCH_MAX_BATCH_SIZE": str(arguments.max_batch_size)}
        current = run_pipeline(REPO_ROOT, url, arguments.database_url, prompts, arguments.requests,
                               worker_settings, arguments.timeout, arguments.profile)
        current["worker_settings"] = worker_settings
        entry = {"slices": current}
        if arguments.baseline_requests:
            with baseline_tree(arguments.baseline_ref) as tree:
                entry["baseline"] = run_pipeline(tree, url, arguments.database_url, baseline_prompts,
                                                 arguments.baseline_requests,
                                                 {"DEEPBATCH_ENGINE": "bench_null_engine:build"}, arguments.timeout)
            entry["baseline"]["ref"] = arguments.baseline_ref
            entry["requests_per_s_ratio"] = round(current["requests_per_s"] / entry["baseline"]["requests_per_s"], 1)
        result["brokers"][broker] = entry
        print(json.dumps({broker: entry}, indent=2), flush=True)
    RESULTS_DIRECTORY.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIRECTORY / "pipeline-null-engine.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
