"""`deepbatch results` of a large job, against the same command at a baseline commit, interleaved: lines/s and
memory, and that both write the same bytes.

One job in a database of its own (bench/pipeline.py's fresh_database, dropped at the end): bench/submit.py's file of
--requests lines, submitted by `deepbatch submit` (its 3 % bad lines and 0.5 % duplicate custom_ids make the
error file), then every queued request marked succeeded by two SQL statements, with a result of
--text-chars characters cut from one long text (words, quotes, backslashes, tabs, newlines, non-ASCII), so
a result line is about 1.8 KB. Every --python-every-th request's result holds what only Python writes: by
turns log-probabilities, further choices (n > 1), and a NUL stored escaped (schema/stored_text.py).

Then `deepbatch results` of the job in a child process, from the baseline's git worktree and from this
tree by turns, --repeats times: seconds, lines/s (both files' lines), peak RSS, and RSS at 10, 50 and 90 %
of the run (flat memory: the last over the middle). Each run's two files are compared by sha256 with the
baseline's first run: the figures count only if every run wrote the same bytes.

    python bench/export.py --baseline HEAD~1                          # 300,000 requests, 3 rounds
    python bench/export.py --baseline HEAD~1 --requests 1000000 --repeats 5

Writes bench/results/export-<requests>.json (or --output).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench import submit as submit_bench  # noqa: E402 - the same input file as the submit benchmark
from bench.pipeline import fresh_database, purge_queue  # noqa: E402
from bench.scale import run_child  # noqa: E402

# What the results' text is cut from: bench/submit.py's words, and what JSON must escape or passes raw.
SPECIALS = ['"quoted"', "back\\slash", "tab\there", "new\nline", "café", "東京", "😀", "\u2028", "C:\\path"]
# Marks every queued request succeeded, its result cut from the corpus at an offset of its own; every
# python_every-th one holds what only Python writes, by turns: log-probabilities, a further choice, a NUL
# stored escaped (U+FFFF 0000).
MARK_SUCCEEDED = """
    WITH done AS (
        UPDATE requests SET state = 'succeeded', attempt = 1, worker = 'bench'
        WHERE job_id = %(job)s AND state = 'queued' RETURNING id, line_no
    )
    INSERT INTO results (request_id, job_id, text, finish_reason, prompt_tokens, completion_tokens, model,
                         worker, logprobs, choices)
    SELECT id, %(job)s,
           CASE WHEN kind = 2 THEN chr(65535) || '0000' ELSE '' END
           || substr(%(corpus)s::text, (1 + (id * 7919) %% (length(%(corpus)s::text) - %(chars)s))::int,
                     %(chars)s::int),
           CASE WHEN id %% 3 = 0 THEN 'length' ELSE 'stop' END, 20 + id %% 500, 300 + id %% 100,
           'tiny-deepseek-v3', 'bench',
           CASE WHEN kind = 0
                THEN '[["a", -0.5, null, [["b", -1.25, null]]], ["\\u00e9", -0.125, null, []]]'::jsonb END,
           CASE WHEN kind = 1 THEN '[{"text": "second", "finish_reason": "stop", "completion_tokens": 1,
                                      "logprobs": null}]'::jsonb END
    FROM done CROSS JOIN LATERAL (
        SELECT CASE WHEN line_no %% %(python_every)s = 0 THEN (line_no / %(python_every)s) %% 3 END AS kind) AS k
"""


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit to compare with (a git worktree of it)")
    parser.add_argument("--requests", type=int, default=300_000, help="lines of the job")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of baseline then this tree")
    parser.add_argument("--text-chars", type=int, default=1500, help="characters of each result's text")
    parser.add_argument("--python-every", type=int, default=100, help="every n-th result needs Python")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a server to create the benchmark's database on (dropped afterwards)")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/deepbatch-bench-submit"))
    parser.add_argument("--output", type=Path)
    return parser.parse_args()


def corpus(length: int = 8_000) -> str:
    chooser = random.Random(0)
    words = submit_bench.WORDS + SPECIALS
    text = " ".join(chooser.choice(words) for _ in range(length // 5))
    return text[:length]


def make_job(arguments: argparse.Namespace, database_url: str, source: Path) -> tuple[str, dict]:
    """Submit the file with `deepbatch submit`, then mark its queued requests succeeded; returns the job id and
    what it holds."""
    written = submit_bench.written_file(arguments.data_dir, arguments.requests)
    env = {**submit_bench.submit_env(arguments, database_url, 5000, 256), "PYTHONPATH": str(source)}
    try:
        child = subprocess.run([sys.executable, "-m", "producer.cli", "submit", str(written.path)], env=env,
                               cwd=source, capture_output=True, text=True, check=True)
    finally:
        purge_queue(env)
    job_id = child.stdout.strip().splitlines()[-1]
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(MARK_SUCCEEDED, {"job": job_id, "corpus": corpus(), "chars": arguments.text_chars,
                                            "python_every": arguments.python_every})
        connection.execute("VACUUM ANALYZE requests")
        connection.execute("VACUUM ANALYZE results")
        succeeded, failed, python_lines = connection.execute("""
            SELECT count(*) FILTER (WHERE r.state = 'succeeded'), count(*) FILTER (WHERE r.state = 'failed'),
                   count(*) FILTER (WHERE s.logprobs IS NOT NULL OR s.choices IS NOT NULL
                                    OR strpos(s.text, chr(65535)) > 0)
            FROM requests r LEFT JOIN results s ON s.request_id = r.id WHERE r.job_id = %s""",
                                                             (job_id,)).fetchone()
    return job_id, {"succeeded": succeeded, "failed": failed, "results_python_writes": python_lines}


def export(source: Path, database_url: str, broker_url: str, job_id: str, work: Path) -> dict:
    """`deepbatch results` from `source` in a child: seconds, lines/s, RSS, and the sha256 of both files."""
    output, errors = work / "results.jsonl", work / "results.errors.jsonl"
    env = {**os.environ, "DEEPBATCH_DATABASE_URL": database_url, "DEEPBATCH_BROKER_URL": broker_url,
           "PYTHONPATH": str(source)}
    child = run_child([sys.executable, "-m", "producer.cli", "results", job_id, "-o", str(output)], env)
    lines, digests = 0, {}
    for path in (output, errors):
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
                lines += block.count(b"\n")
        digests[path.name] = digest.hexdigest()
        path.unlink()
    samples = [(t, r) for (t, r, _) in child["samples"] if r is not None]
    at = {f"rss_mb_at_{share}pct": round(next((r for t, r in samples if t >= child["seconds"] * share / 100),
                                              samples[-1][1]), 1) for share in (10, 50, 90)} if samples else {}
    return {"lines": lines, "seconds": round(child["seconds"], 2), "lines_per_s": round(lines / child["seconds"]),
            "peak_rss_mb": child["peak_rss_mb"], **at, "sha256": digests}


def baseline_tree(ref: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="deepbatch-export-baseline-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(directory), ref], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    return directory


def summary(runs: list[dict]) -> dict:
    rates = [run["lines_per_s"] for run in runs]
    return {"lines_per_s": rates, "median_lines_per_s": round(statistics.median(rates)),
            "worst_lines_per_s": min(rates), "peak_rss_mb": [run["peak_rss_mb"] for run in runs]}


def measure(arguments: argparse.Namespace, database_url: str, baseline: Path, work: Path, commit: str) -> dict:
    """The job made, then the baseline's export and this tree's by turns, --repeats times."""
    from schema.migrate import upgrade

    upgrade(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    job_id, job = make_job(arguments, database_url, REPO_ROOT)
    print(json.dumps({"job": job_id, **job}), flush=True)
    runs: dict[str, list[dict]] = {"baseline": [], "new": []}
    for round_no in range(1, arguments.repeats + 1):
        for name, source in (("baseline", baseline), ("new", REPO_ROOT)):
            run = {"round": round_no, **export(source, database_url, arguments.broker, job_id, work)}
            runs[name].append(run)
            print(json.dumps({name: run}), flush=True)
    reference = runs["baseline"][0]["sha256"]
    old, new = summary(runs["baseline"]), summary(runs["new"])
    return {
        "what": f"`deepbatch results` of a job of {arguments.requests:,} lines, baseline and this tree "
                f"interleaved {arguments.repeats}x in one run",
        "command": " ".join(["python", "bench/export.py", *sys.argv[1:]]),
        "baseline": f"{commit} ({arguments.baseline})", "cpus": os.cpu_count(),
        "load_average_at_end": round(os.getloadavg()[0], 2), "job": job, "text_chars": arguments.text_chars,
        "same_bytes_every_run": all(run["sha256"] == reference for name in runs for run in runs[name]),
        "old": old, "new": new,
        "new_over_old_median": round(new["median_lines_per_s"] / old["median_lines_per_s"], 2),
        "new_worst_over_old_median": round(new["worst_lines_per_s"] / old["median_lines_per_s"], 2),
        "runs": runs,
    }


def main() -> None:
    arguments = parse_arguments()
    arguments.data_dir.mkdir(parents=True, exist_ok=True)
    baseline = baseline_tree(arguments.baseline)
    work = Path(tempfile.mkdtemp(prefix="deepbatch-bench-export-"))
    commit = subprocess.run(["git", "rev-parse", "--short", arguments.baseline], cwd=REPO_ROOT, text=True,
                            capture_output=True).stdout.strip()
    try:
        with fresh_database(arguments.postgres) as database_url:
            result = measure(arguments, database_url, baseline, work, commit)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO_ROOT, capture_output=True)
    print(json.dumps(result, indent=2))
    output = arguments.output or REPO_ROOT / "bench" / "results" / f"export-{arguments.requests}.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    if not result["same_bytes_every_run"]:
        raise SystemExit("the runs did not all write the same bytes")


if __name__ == "__main__":
    main()
