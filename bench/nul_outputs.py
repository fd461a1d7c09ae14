"""Outputs holding a NUL cost nothing: `deepbatch run` with an engine that puts "\\x00" in 1 output of 25,
against the same run without NULs, in the same session.

PostgreSQL's text cannot hold U+0000. Before schema/stored_text.py, one such output failed its recorder's
whole batch, which then waited out its leases (120 s) and ran again: a 2,000-line run had done 415 requests
after 3 min 12 s. Here both runs use tests/integration/odd_engines.py:NulEngine (the `null` engine's
instant answers, so what is measured is the pipeline: broker, claims, recording, audit chain), with
NUL_EVERY=25 or NUL_EVERY=0 (the baseline). Each repetition runs the baseline and the NUL run back to back
(which goes first alternates), each on a fresh database of the PostgreSQL server (DATABASE_URL, default
the local one) and its own queue.

Reports per run: requests/s from the first claim to the last result (audit timestamps), the wall time of
`deepbatch run` (start-up, submit, run, export) and its CPU time with its worker's (the steadier figure
when other work shares the cores); for each, the NUL run's rate as a fraction of the baseline's (rate
ratio; for times, baseline ÷ NUL), worst and median over the repetitions. Checks every request succeeded
exactly once (one results row and one 'succeeded' audit event each, no error code) and that the exported
file holds exactly the NULs the engine emitted. bench/nul_recorder.py measures the recorder's write alone.

    python bench/nul_outputs.py                      # 20,000 requests, 3 repetitions, Redis
    python bench/nul_outputs.py --requests 2000 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from pipeline import BROKERS, fresh_database, purge_queue, write_prompts

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIRECTORY = REPO_ROOT / "bench" / "results"
ENGINE = "tests.integration.odd_engines:NulEngine"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nul-every", type=int, default=25, help="one output in this many holds a NUL")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=256, help="the worker's DEEPBATCH_MAX_BATCH_SIZE")
    parser.add_argument("--broker", default="redis", choices=sorted(BROKERS))
    parser.add_argument("--database-url",
                        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--timeout", type=float, default=1800)
    return parser.parse_args()


# Per request: its state, its results rows, its 'succeeded' events, its error code.
EXACTLY_ONCE = """
    WITH per_request AS (
        SELECT r.id, r.state, r.error_code,
               (SELECT count(*) FROM results s WHERE s.request_id = r.id) AS results,
               (SELECT count(*) FROM audit_events e WHERE e.request_id = r.id AND e.event = 'succeeded') AS successes
        FROM requests r WHERE r.job_id = %(j)s
    )
    SELECT count(*) AS requests,
           count(*) FILTER (WHERE state = 'succeeded' AND results = 1 AND successes = 1 AND error_code IS NULL)
               AS succeeded_exactly_once,
           (SELECT min(created_at) FROM audit_events WHERE job_id = %(j)s AND event = 'started') AS first_claim,
           (SELECT max(created_at) FROM audit_events WHERE job_id = %(j)s AND event = 'succeeded') AS last_result
    FROM per_request
"""


def run_measured(command: list[str], env: dict) -> tuple[float, float, str]:
    """Run to the end; returns (wall seconds, CPU seconds of the process and the children it waited for —
    `deepbatch run` waits for its worker —, output). On 2 shared cores the CPU time is the steadier cost."""
    with tempfile.TemporaryFile() as said:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=said, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        said.seek(0)
        text = said.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} exited {os.waitstatus_to_exitcode(status)}:\n{text[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, text


def run_once(arguments: argparse.Namespace, prompts: Path, nul_every: int, work: Path) -> dict:
    """One `deepbatch run` of `prompts` on a fresh database; what the clock, the database and the file say."""
    with fresh_database(arguments.database_url) as database_url:
        output = work / f"results-{uuid.uuid4().hex[:6]}.jsonl"
        env = {**os.environ, "DEEPBATCH_DATABASE_URL": database_url, "DEEPBATCH_BROKER_URL": BROKERS[arguments.broker],
               "DEEPBATCH_QUEUE_NAME": f"bench-nul-{uuid.uuid4().hex[:8]}", "DEEPBATCH_METRICS_PORT": "0",
               "DEEPBATCH_DATA_DIR": str(work / "data"), "DEEPBATCH_ENGINE": ENGINE,
               "DEEPBATCH_MAX_BATCH_SIZE": str(arguments.max_batch_size), "NUL_EVERY": str(nul_every)}
        wall, cpu, said = run_measured([sys.executable, "-m", "producer.cli", "run", str(prompts), "--output",
                                        str(output)], env)
        job_id = next(word for word in said.split() if word.startswith("batch_"))
        with psycopg.connect(database_url) as connection:
            counts = connection.execute(EXACTLY_ONCE, {"j": job_id}).fetchone()
        purge_queue(env)
    requests, exactly_once, first_claim, last_result = counts
    texts = [json.loads(line)["response"]["body"]["choices"][0]["text"] for line in output.open(encoding="utf-8")]
    window = (last_result - first_claim).total_seconds()
    return {"nul_every": nul_every, "requests": requests, "succeeded_exactly_once": exactly_once,
            "exported": len(texts), "exported_with_nul": sum("\x00" in text for text in texts),
            "first_claim_to_last_result_s": round(window, 2), "requests_per_s": round(requests / window, 1),
            "run_wall_s": round(wall, 2), "run_cpu_s": round(cpu, 2)}


def summary(ratios: list[float]) -> dict:
    return {"worst": round(min(ratios), 3), "median": round(statistics.median(ratios), 3),
            "all": [round(ratio, 3) for ratio in ratios]}


def main() -> None:
    arguments = parse_arguments()
    work = Path(tempfile.mkdtemp(prefix="deepbatch-bench-nul-"))
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, arguments.requests, arguments.max_tokens)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.strip()
    repetitions = []
    for repetition in range(arguments.repeat):  # which goes first alternates, so drift favours neither
        order = (0, arguments.nul_every) if repetition % 2 == 0 else (arguments.nul_every, 0)
        runs = {nul_every: run_once(arguments, prompts, nul_every, work) for nul_every in order}
        repetitions.append({"baseline": runs[0], "with_nul": runs[arguments.nul_every]})
        print(json.dumps({"repetition": repetition + 1, **repetitions[-1]}), flush=True)
    expected_nul = len(range(0, arguments.requests, arguments.nul_every))
    all_exact = all(run["succeeded_exactly_once"] == run["requests"] == run["exported"] == arguments.requests
                    for pair in repetitions for run in pair.values())
    nul_exact = all(pair["with_nul"]["exported_with_nul"] == expected_nul and pair["baseline"]["exported_with_nul"] == 0
                    for pair in repetitions)
    result = {
        "requests": arguments.requests, "nul_every": arguments.nul_every, "max_tokens": arguments.max_tokens,
        "max_batch_size": arguments.max_batch_size, "broker": arguments.broker, "cpus": os.cpu_count(),
        "engine": ENGINE, "commit": commit,
        "every_request_succeeded_exactly_once": all_exact, "exported_nuls_exact": nul_exact,
        "requests_per_s_ratio": summary([pair["with_nul"]["requests_per_s"] / pair["baseline"]["requests_per_s"]
                                         for pair in repetitions]),
        "run_wall_ratio": summary([pair["baseline"]["run_wall_s"] / pair["with_nul"]["run_wall_s"]
                                   for pair in repetitions]),
        "run_cpu_ratio": summary([pair["baseline"]["run_cpu_s"] / pair["with_nul"]["run_cpu_s"]
                                  for pair in repetitions]),
        "repetitions": repetitions,
    }
    print(json.dumps({key: value for key, value in result.items() if key != "repetitions"}, indent=2))
    RESULTS_DIRECTORY.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIRECTORY / f"nul-outputs-{arguments.broker}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not (all_exact and nul_exact):
        raise SystemExit("some request did not succeed exactly once, or the exported NULs differ: see the JSON")


if __name__ == "__main__":
    main()
