"""Ten million requests in one PostgreSQL: which rates stay flat as the tables grow, and what the database weighs.

Every other figure (bench/submit.py, bench/pipeline.py) is taken on an empty database. This one measures,
in one database of its own (`deepbatch_scale`, dropped at the end unless --keep):

1. The pipeline at each --fill point (default 0, 5 and 10 million rows already in `requests` and
   `results`): a window job of --window lines (default 200,000) goes through the real path — `deepbatch
   submit` (producer.submit, a child process), the broker, one `deepbatch worker` with the null engine,
   its recorder — and its requests/s is taken from the audit log, first `started` to last `succeeded`.
   Each broker of --broker runs its own window at each point.
2. One job of --lines lines (default 10,000,000; bench/submit.py's file: OpenAI Batch and plain lines,
   3 % bad lines of nine kinds, 0.5 % duplicate custom_ids), submitted on top of the largest fill:
   lines/s and peak RSS of the submit process for each tenth of the file (each million by default),
   read from `jobs.submitted_lines` and /proc while it runs. Then one worker runs it to the end (its
   requests/s per tenth, from the audit log).
3. At that point, for the big job: `deepbatch status` and `deepbatch jobs` (in-process, through the CLI
   and its own session: the whole query path, no interpreter start), the dashboard's page
   (producer/api/store.dashboard_page) and `SELECT * FROM job_progress WHERE job_id = ...`, each
   --repeats times (median and worst); the cost of sealing one 256-event audit INSERT (rolled back) at
   every point; `deepbatch results` of the whole job in a child process (producer/export.py): lines/s and
   its RSS over time; EXPLAIN (ANALYZE, BUFFERS) of those statements.
4. Bytes on disk: pg_total_relation_size of each table (heap, TOAST, indexes) and each index, at every
   point and at the end, and per million requests.

How the history is made, so that a fill of 10 million takes minutes and not hours: the rows already there
at a fill point are copies of the first window job, written in bulk by SQL (INSERT ... SELECT over the
template's rows and generate_series-free id arithmetic): its requests (bodies, states, errors, cache keys,
as submit and the worker left them), its results and its audit events (submitted, started, succeeded, job
events), each copy a job of its own dated one day earlier than the next, with fresh request ids. So the
history is shaped exactly like what the system writes, but its rows are freshly inserted (no dead tuples
from the two UPDATEs a real request goes through), and the audit copies are sealed by the same statement
triggers, one seal per copy (the real path makes one per claim and per recorder batch). The database is
ANALYZEd after each fill, as autovacuum would be given time to. The measured jobs (windows, the big job)
go through the real submit, broker, worker and recorder path only.

    python bench/scale.py                                                   # 10M lines, fills 0 5M 10M, both
    python bench/scale.py --lines 1000000 --fill 0 1000000 2000000 --broker redis \\
        --output bench/results/scale-redis-1m.json                          # what fits a 2-core machine
    python bench/scale.py --lines 10000000 --fill --submit-only --broker redis   # submit's rate per million

Writes bench/results/scale-<broker>-<lines>.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench import submit as submit_bench  # noqa: E402 - the same line generator as the submit benchmark
from bench.pipeline import BROKERS, RESULTS_DIRECTORY, purge_queue  # noqa: E402
DATABASE_NAME = "deepbatch_scale"
TABLES = ("requests", "results", "audit_events", "audit_seals", "jobs", "dead_letters")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000_000, help="lines of the big job")
    parser.add_argument("--fill", type=int, nargs="*", default=[0, 5_000_000, 10_000_000],
                        help="rows already in requests and results at each pipeline point")
    parser.add_argument("--window", type=int, default=200_000, help="requests of each pipeline window")
    parser.add_argument("--broker", choices=("redis", "rabbitmq", "both"), default="both")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="a server to create the benchmark's database on")
    parser.add_argument("--steps", type=int, default=10, help="submit and run rates for each 1/steps of the job")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each latency")
    parser.add_argument("--max-batch-size", type=int, default=256, help="the worker's DEEPBATCH_MAX_BATCH_SIZE")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/deepbatch-bench-submit"))
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds a worker run may take")
    parser.add_argument("--skip-big-job", action="store_true", help="only the pipeline windows and disk")
    parser.add_argument("--submit-only", action="store_true",
                        help="the big job is submitted and measured (rates per tenth, RSS, disk), not run")
    parser.add_argument("--source", type=Path, default=REPO_ROOT,
                        help="the checkout the product runs from (e.g. `git archive HEAD` unpacked: what is "
                             "committed, whatever is being edited in this tree); default this tree")
    parser.add_argument("--keep", action="store_true", help="leave the database for inspection")
    parser.add_argument("--existing-database", action="store_true",
                        help="measure the big job in the database a --keep (or killed) run left, its history "
                             "already there: no fill points")
    parser.add_argument("--output", type=Path)
    return parser.parse_args()


# ---- files ----

def window_file(data_dir: Path, lines: int, seed: int) -> Path:
    """A window's lines, drawn with a seed of its own: no window's greedy lines are in another's result cache."""
    path = data_dir / f"scale-window-{submit_bench.FILE_VERSION}-{lines}-{seed}.jsonl"
    if not path.exists():
        written, writer = submit_bench.WrittenFile(path, lines=lines), submit_bench.LineWriter(seed=seed)
        partial = path.with_suffix(".partial")
        with partial.open("wb") as stream:
            for line_no in range(1, lines + 1):
                stream.write(writer.line(line_no, written) + b"\n")
        partial.rename(path)
    return path


# ---- processes ----

def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """Every `interval` s: (seconds since start, RSS of the process in MB, what `probe` returns)."""

    def __init__(self, pid: int, probe=None, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.probe, self.interval = pid, probe, interval
        self.samples: list[tuple[float, float | None, object]] = []
        self.stop = threading.Event()
        self.started_at = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            value = self.probe() if self.probe else None
            self.samples.append((time.perf_counter() - self.started_at, rss_mb(self.pid), value))
            self.stop.wait(self.interval)


def run_child(command: list[str], env: dict, probe=None) -> dict:
    """Run to the end, sampling its RSS (and `probe`); returns seconds, peak RSS, output and samples."""
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=env["PYTHONPATH"], stdout=output, stderr=subprocess.STDOUT)
        sampler = Sampler(process.pid, probe)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
        if probe is not None:
            sampler.samples.append((seconds, None, probe()))
        output.seek(0)
        text = output.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} exited {os.waitstatus_to_exitcode(status)}:\n{text[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "output": text,
            "samples": sampler.samples}


def service_env(database_url: str, broker_url: str, queue: str, arguments: argparse.Namespace) -> dict:
    return {**os.environ, "DEEPBATCH_DATABASE_URL": database_url, "DEEPBATCH_BROKER_URL": broker_url,
            "DEEPBATCH_QUEUE_NAME": queue, "DEEPBATCH_MODEL": submit_bench.MODEL, "DEEPBATCH_MODEL_ALIASES": "",
            "DEEPBATCH_DATA_DIR": str(arguments.data_dir / "data"), "DEEPBATCH_METRICS_PORT": "0",
            "DEEPBATCH_ENGINE": "null", "DEEPBATCH_MAX_BATCH_SIZE": str(arguments.max_batch_size),
            "PYTHONPATH": str(arguments.source)}


# ---- submit and run ----

def submit(database_url: str, env: dict, path: Path, lines: int, steps: int) -> dict:
    """`deepbatch submit` as a child: wall time, peak RSS, and lines/s and RSS for each 1/steps of the file."""
    probe_connection = psycopg.connect(database_url, autocommit=True)
    started = probe_connection.execute("SELECT now()").fetchone()[0]

    def submitted_lines() -> int:  # the job created since: the one being submitted
        row = probe_connection.execute(
            "SELECT submitted_lines FROM jobs WHERE created_at >= %s ORDER BY created_at DESC LIMIT 1",
            (started,)).fetchone()
        return row[0] if row else 0

    try:
        child = run_child([sys.executable, "-m", "producer.cli", "submit", str(path)], env, submitted_lines)
    finally:
        probe_connection.close()
    job_id = child["output"].strip().splitlines()[-1]
    samples = [(t, r, done) for (t, r, done) in child["samples"] if done is not None]
    per_step, previous_t = [], 0.0
    for k in range(1, steps + 1):
        mark = lines * k // steps
        crossed = crossing(samples, mark)
        if crossed is None:
            break
        rss = [r for (t, r, _) in samples if previous_t <= t <= crossed + 0.25 and r is not None]
        size = mark - lines * (k - 1) // steps
        per_step.append({"step": k, "lines": size, "seconds": round(crossed - previous_t, 2),
                         "lines_per_s": round(size / (crossed - previous_t)) if crossed > previous_t else None,
                         "peak_rss_mb": round(max(rss), 1) if rss else None})
        previous_t = crossed
    finishing = {"seconds": round(child["seconds"] - previous_t, 2),
                 "note": "after the last line was stored: the last publish, job_submitted, the process's exit"}
    return {"job_id": job_id, "lines": lines, "seconds": round(child["seconds"], 2),
            "lines_per_s": round(lines / child["seconds"]), "peak_rss_mb": child["peak_rss_mb"],
            "per_step": per_step, "finishing": finishing}


def crossing(samples: list, mark: int) -> float | None:
    """When `submitted_lines` reached `mark`, interpolated between the samples either side."""
    previous_t, previous_done = 0.0, 0
    for t, _, done in samples:
        if done >= mark:
            if done == previous_done:
                return t
            return previous_t + (t - previous_t) * (mark - previous_done) / (done - previous_done)
        previous_t, previous_done = t, done
    return None


def job_unfinished(connection: psycopg.Connection, job_id: str) -> bool:
    return connection.execute("SELECT EXISTS (SELECT FROM requests WHERE job_id = %s AND state IN "
                              "('queued', 'running'))", (job_id,)).fetchone()[0]


def run_worker(database_url: str, env: dict, job_id: str, timeout: float) -> dict:
    """One `deepbatch worker` (null engine) until the job has nothing queued or running; then a warm stop.
    Its log goes to <DEEPBATCH_DATA_DIR>/worker-<job>.log, so that a worker that stops recording says why."""
    log_path = Path(env["DEEPBATCH_DATA_DIR"]) / f"worker-{job_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "WARNING"],
                                  env=env, cwd=env["PYTHONPATH"], stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(worker.pid, interval=1.0)
    sampler.start()
    deadline = time.monotonic() + timeout
    try:
        with psycopg.connect(database_url, autocommit=True) as connection:
            last_event, moved_at = None, time.monotonic()
            while job_unfinished(connection, job_id):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker stopped (exit {worker.poll()}) or timed out on job {job_id}")
                event = connection.execute("SELECT max(id) FROM audit_events").fetchone()[0]
                if event != last_event:
                    last_event, moved_at = event, time.monotonic()
                elif time.monotonic() - moved_at > 120:
                    raise RuntimeError(f"the worker recorded nothing for 120 s on job {job_id} (log: {log_path})")
                time.sleep(1.0)
    finally:
        worker.send_signal(signal.SIGINT)
        _, _, usage = os.wait4(worker.pid, 0)
        sampler.stop.set()
    return {"worker_peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def run_rates(connection: psycopg.Connection, job_id: str, steps: int) -> dict:
    """From the audit log: first claim to last result, and the time each 1/steps of the successes took."""
    first_claim, last_result, succeeded = connection.execute("""
        SELECT min(created_at) FILTER (WHERE event = 'started'), max(created_at) FILTER (WHERE event = 'succeeded'),
               count(*) FILTER (WHERE event = 'succeeded')
        FROM audit_events WHERE job_id = %s""", (job_id,)).fetchone()
    ran = connection.execute("SELECT count(*) FROM requests WHERE job_id = %s AND attempt > 0", (job_id,)).fetchone()[0]
    window = (last_result - first_claim).total_seconds()
    result = {"requests_run": ran, "succeeded": succeeded, "first_claim_to_last_result_s": round(window, 2),
              "requests_per_s": round(ran / window, 1)}
    if steps > 1:
        step = max(1, succeeded // steps)
        marks = connection.execute("""
            SELECT n, created_at FROM (
                SELECT row_number() OVER (ORDER BY created_at, id) AS n, created_at
                FROM audit_events WHERE job_id = %s AND event = 'succeeded') AS numbered
            WHERE n %% %s = 0 ORDER BY n""", (job_id, step)).fetchall()
        previous = first_claim
        result["per_step"] = []
        for n, at in marks[:steps]:
            seconds = (at - previous).total_seconds()
            result["per_step"].append({"succeeded": n, "seconds": round(seconds, 2),
                                       "succeeded_per_s": round(step / seconds, 1) if seconds > 0 else None})
            previous = at
    return result


# ---- history, by SQL ----

def template_span(connection: psycopg.Connection, job_id: str) -> tuple[int, int]:
    return connection.execute("SELECT min(id), max(id) FROM requests WHERE job_id = %s", (job_id,)).fetchone()


def columns(connection: psycopg.Connection, table: str) -> list[str]:
    return [row[0] for row in connection.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s AND table_schema = 'public' "
        "ORDER BY ordinal_position", (table,))]


def copy_statement(connection: psycopg.Connection, table: str, overrides: dict[str, str], source: str,
                   skip: tuple[str, ...] = ()) -> str:
    """INSERT INTO table SELECT every column as it is, but `overrides` (expressions) and `skip` (defaults)."""
    names = [name for name in columns(connection, table) if name not in skip]
    values = [overrides.get(name, f"t.{name}") for name in names]
    return f"INSERT INTO {table} ({', '.join(names)}) SELECT {', '.join(values)} FROM {source}"


def copy_job(connection: psycopg.Connection, template: str, copy_no: int, limit_rows: int) -> int:
    """One copy of the template job (its first `limit_rows` requests), as a job of its own, dated `copy_no`
    days earlier, with fresh request ids: its requests, results and audit events, in one transaction.
    Every column is copied as the system wrote it, whatever columns the schema has."""
    first, last = template_span(connection, template)
    job_id = f"batch_history_{copy_no:05d}_{uuid.uuid4().hex[:8]}"
    parameters = {"job": job_id, "limit": limit_rows, "age": f"{copy_no} days", "template": template}
    aged = "t.{} - %(age)s::interval"
    with connection.transaction():
        connection.execute("LOCK TABLE requests IN SHARE ROW EXCLUSIVE MODE")  # the id range below is ours
        base = connection.execute("SELECT nextval('requests_id_seq')").fetchone()[0]
        connection.execute("SELECT setval('requests_id_seq', %s)", (base + last - first + 1,))
        parameters["shift"] = base - first
        connection.execute(copy_statement(connection, "jobs", {
            "id": "%(job)s", "total_lines": "least(t.total_lines, %(limit)s)",
            "submitted_lines": "least(t.submitted_lines, %(limit)s)", "created_at": aged.format("created_at"),
            "submitted_at": aged.format("submitted_at")}, "jobs t WHERE t.id = %(template)s"), parameters)
        copied = connection.execute(copy_statement(connection, "requests", {
            "id": "t.id + %(shift)s", "job_id": "%(job)s", "created_at": aged.format("created_at"),
            "updated_at": aged.format("updated_at")},
            "requests t WHERE t.job_id = %(template)s AND t.line_no <= %(limit)s ORDER BY t.id"), parameters).rowcount
        connection.execute(copy_statement(connection, "results", {
            "request_id": "t.request_id + %(shift)s", "job_id": "%(job)s", "created_at": aged.format("created_at"),
            "cached_from": "t.cached_from + %(shift)s"},
            "results t JOIN requests r ON r.id = t.request_id WHERE t.job_id = %(template)s "
            "AND r.line_no <= %(limit)s ORDER BY t.request_id"), parameters)
        connection.execute(copy_statement(connection, "audit_events", {
            "job_id": "%(job)s", "request_id": "t.request_id + %(shift)s", "created_at": aged.format("created_at")},
            "audit_events t LEFT JOIN requests r ON r.id = t.request_id WHERE t.job_id = %(template)s "
            "AND (t.request_id IS NULL OR r.line_no <= %(limit)s) ORDER BY t.id", skip=("id", "seal_id")),
            parameters)
        connection.execute(COUNT_COPIED_JOB, parameters)
    return copied


# The copy's progress counts, from its rows, as migration 0018's backfill counts every job's (the real
# path keeps them per transition: schema/tables.py JobCount).
COUNT_COPIED_JOB = """
INSERT INTO job_counts (job_id, state, label, shard, requests, rejected, cache_hits, prompt_tokens,
                        completion_tokens, last_finished_at)
SELECT r.job_id, r.state,
       CASE WHEN r.state = 'succeeded' THEN coalesce(s.model, '')
            WHEN r.state IN ('failed', 'dead') THEN coalesce(r.error_code, '') ELSE '' END,
       0, count(*), count(*) FILTER (WHERE r.line_error IS NOT NULL), count(s.cached_from),
       coalesce(sum(s.prompt_tokens), 0), coalesce(sum(s.completion_tokens), 0),
       max(r.updated_at) FILTER (WHERE r.state NOT IN ('queued', 'running'))
FROM requests r LEFT JOIN results s ON s.request_id = r.id
WHERE r.job_id = %(job)s
GROUP BY 1, 2, 3
"""


def fill_to(connection: psycopg.Connection, template: str, rows: int, copies_so_far: int) -> tuple[int, float, int]:
    """Copies of the template until `requests` holds `rows` rows; returns (copies made, seconds, rows now)."""
    started = time.perf_counter()
    template_rows = connection.execute("SELECT count(*) FROM requests WHERE job_id = %s", (template,)).fetchone()[0]
    present = connection.execute("SELECT count(*) FROM requests").fetchone()[0]
    made = 0
    while present < rows:
        present += copy_job(connection, template, copies_so_far + made + 1, min(template_rows, rows - present))
        made += 1
        print(f"  history: {present:,} rows", flush=True)
    if made:
        connection.execute("ANALYZE")
    return made, time.perf_counter() - started, present


# ---- latencies, plans, disk ----

def timed(function, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times), 1), "worst_ms": round(max(times), 1),
            "runs_ms": [round(t, 1) for t in times]}


def seal_cost(connection: psycopg.Connection, repeats: int) -> dict:
    """One 256-event audit INSERT (sealed by the statement triggers), rolled back: what a recorder batch pays."""
    def insert() -> None:
        with connection.transaction(force_rollback=True):
            connection.execute("""
                INSERT INTO audit_events (job_id, request_id, event, from_state, to_state, attempt, worker)
                SELECT 'batch_seal_probe', n, 'succeeded', 'running', 'succeeded', 1, 'bench:0'
                FROM generate_series(1, 256) AS n""")
    return timed(insert, repeats)


def latencies(database_url: str, job_id: str, repeats: int) -> dict:
    from typer.testing import CliRunner

    from producer.api import store
    from producer.api.dashboard import FAILURES_SHOWN, JOBS_SHOWN, RATE_WINDOW_S
    from producer.cli import cli
    from schema.db import session_factory

    runner = CliRunner()

    def command(*words: str):
        def invoke() -> None:
            outcome = runner.invoke(cli, list(words))
            if outcome.exit_code != 0:
                raise RuntimeError(f"deepbatch {' '.join(words)}: {outcome.output[-2000:]}")
        return invoke

    sessions = session_factory(database_url.replace("postgresql://", "postgresql+psycopg://", 1), pool_size=1)

    def dashboard() -> None:
        with sessions() as session:
            store.dashboard_page(session, None, JOBS_SHOWN, RATE_WINDOW_S, FAILURES_SHOWN)

    with psycopg.connect(database_url, autocommit=True) as connection:
        return {
            "status": timed(command("status", job_id), repeats),
            "status_json": timed(command("status", job_id, "--json"), repeats),
            "jobs": timed(command("jobs"), repeats),
            "dashboard_page": timed(dashboard, repeats),
            "job_progress": timed(lambda: connection.execute("SELECT * FROM job_progress WHERE job_id = %s",
                                                             (job_id,)).fetchall(), repeats),
        }


def plans(database_url: str, job_id: str) -> dict:
    from producer.api.dashboard import FAILURES_SHOWN, JOBS_SHOWN, RATE_WINDOW_S
    from producer.api.store import DASHBOARD_PAGE
    from producer.queries import FAILED_LINES, PROGRESS_COLUMNS

    statements = {
        "job_progress": ("SELECT * FROM job_progress WHERE job_id = %(job)s", {"job": job_id}),
        "jobs": (f"SELECT {PROGRESS_COLUMNS} FROM job_progress ORDER BY created_at DESC LIMIT 20", {}),
        "dashboard_page": (DASHBOARD_PAGE.text.replace(":owner_key_id", "%(owner)s").replace(":limit", "%(limit)s")
                           .replace(":window_s", "%(window)s").replace(":failures", "%(failures)s"),
                           {"owner": None, "limit": JOBS_SHOWN, "window": RATE_WINDOW_S, "failures": FAILURES_SHOWN}),
        "failed_lines": (FAILED_LINES.text.replace(":job_id", "%(job)s").replace(":rejected_only", "%(rejected)s"),
                         {"job": job_id, "rejected": False}),
        "export_results": ("""
            SELECT r.id, r.line_no, r.custom_id, r.url, r.state, r.error_code, r.error_message, s.text,
                   s.finish_reason, s.prompt_tokens, s.completion_tokens, s.model, s.created_at, s.logprobs
            FROM requests r LEFT JOIN results s ON s.request_id = r.id
            WHERE r.job_id = %(job)s AND r.state IN ('succeeded') ORDER BY r.line_no""", {"job": job_id}),
    }
    found = {}
    with psycopg.connect(database_url, autocommit=True) as connection:
        for name, (statement, parameters) in statements.items():
            rows = connection.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters).fetchall()
            found[name] = [row[0] for row in rows]
    return found


def disk(connection: psycopg.Connection) -> dict:
    requests = connection.execute("SELECT count(*) FROM requests").fetchone()[0]
    tables = {}
    for table in TABLES:
        total, heap, indexes, rows = connection.execute("""
            SELECT pg_total_relation_size(c.oid), pg_relation_size(c.oid), pg_indexes_size(c.oid), c.reltuples
            FROM pg_class c WHERE c.relname = %s""", (table,)).fetchone()
        tables[table] = {"total_bytes": total, "heap_bytes": heap, "indexes_bytes": indexes,
                         "toast_bytes": total - heap - indexes, "estimated_rows": int(max(rows, 0))}
    index_sizes = dict(connection.execute("""
        SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid WHERE c.relname = ANY(%s) ORDER BY 2 DESC""",
                                          (list(TABLES),)).fetchall())
    total = sum(t["total_bytes"] for t in tables.values())
    database = connection.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    per_million = (lambda b: round(b * 1_000_000 / requests)) if requests else (lambda b: None)
    return {"requests": requests, "tables": tables, "indexes": index_sizes, "total_bytes": total,
            "database_bytes": database, "bytes_per_million_requests": per_million(total),
            "per_million_requests": {name: {"table": per_million(t["heap_bytes"] + t["toast_bytes"]),
                                            "indexes": per_million(t["indexes_bytes"])}
                                     for name, t in tables.items()}}


def export(env: dict, job_id: str, work: Path) -> dict:
    """`deepbatch results` of the whole job (producer/export.py) in a child: lines/s and RSS over time."""
    output = work / "results.jsonl"
    child = run_child([sys.executable, "-m", "producer.cli", "results", job_id, "-o", str(output)], env)
    errors = work / "results.errors.jsonl"
    lines = sum(1 for _ in output.open("rb")) + (sum(1 for _ in errors.open("rb")) if errors.exists() else 0)
    samples = [(t, r) for (t, r, _) in child["samples"] if r is not None]
    at = {f"rss_mb_at_{share}pct": round(next((r for t, r in samples if t >= child["seconds"] * share / 100),
                                              samples[-1][1]), 1) for share in (10, 50, 90)} if samples else {}
    result = {"lines": lines, "results_bytes": output.stat().st_size, "seconds": round(child["seconds"], 2),
              "lines_per_s": round(lines / child["seconds"]), "peak_rss_mb": child["peak_rss_mb"], **at}
    output.unlink()
    errors.unlink(missing_ok=True)
    return result


# ---- the run ----

def create_database(server_url: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE_NAME}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    return database_of(server_url)


def database_of(server_url: str) -> str:
    return server_url.rsplit("/", 1)[0] + "/" + DATABASE_NAME


def main() -> None:
    arguments = parse_arguments()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its worker, drops its database
    sys.path.insert(0, str(arguments.source.resolve()))  # the product's modules, for migrate, CLI and store
    arguments.data_dir.mkdir(parents=True, exist_ok=True)
    brokers = ["redis", "rabbitmq"] if arguments.broker == "both" else [arguments.broker]
    work = Path(tempfile.mkdtemp(prefix="deepbatch-bench-scale-"))
    database_url = (database_of(arguments.database_url) if arguments.existing_database
                    else create_database(arguments.database_url))
    os.environ["DEEPBATCH_DATABASE_URL"] = database_url  # the in-process CLI commands of `latencies`
    os.environ["DEEPBATCH_BROKER_URL"] = BROKERS[brokers[0]]
    from schema.migrate import upgrade

    upgrade(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    result: dict = {"source": str(arguments.source), "lines": arguments.lines, "fill": arguments.fill,
                    "window": arguments.window,
                    "brokers": brokers, "cpus": os.cpu_count(), "max_batch_size": arguments.max_batch_size,
                    "load_average_at_start": round(os.getloadavg()[0], 2), "points": [],
                    "existing_database": arguments.existing_database,
                    "history": "copies of the first window job, written by INSERT ... SELECT (see the docstring)"}
    queues: list[dict] = []
    template, copies, seed = None, 0, 1
    connection = psycopg.connect(database_url, autocommit=True)
    # Plans depend on statistics: with autovacuum off nothing re-analyzes a job's rows while it is submitted.
    result["server_settings"] = dict(connection.execute(
        "SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', 'shared_buffers', 'work_mem', "
        "'max_wal_size', 'server_version')").fetchall())
    try:
        for fill in [] if arguments.existing_database else sorted(arguments.fill):
            point: dict = {"fill": fill}
            if template is not None:
                made, seconds, present = fill_to(connection, template, fill, copies)
                copies += made
                point["history_copies_made"], point["history_seconds"] = made, round(seconds, 1)
            point["rows_before"] = connection.execute("SELECT count(*) FROM requests").fetchone()[0]
            point["results_rows_before"] = connection.execute("SELECT count(*) FROM results").fetchone()[0]
            point["seal_256_events"] = seal_cost(connection, arguments.repeats)
            point["brokers"] = {}
            for broker in brokers:
                env = service_env(database_url, BROKERS[broker], f"scale-{uuid.uuid4().hex[:8]}", arguments)
                queues.append(env)
                path = window_file(arguments.data_dir, arguments.window, seed)
                seed += 1
                submitted = submit(database_url, env, path, arguments.window, 1)
                worker = run_worker(database_url, env, submitted["job_id"], arguments.timeout)
                rates = run_rates(connection, submitted["job_id"], 1)
                template = template or submitted["job_id"]
                point["brokers"][broker] = {"submit_lines_per_s": submitted["lines_per_s"],
                                            "submit_peak_rss_mb": submitted["peak_rss_mb"], **rates, **worker}
                print(json.dumps({"fill": fill, broker: point["brokers"][broker]}), flush=True)
            connection.execute("ANALYZE")
            point["disk"] = disk(connection)
            result["points"].append(point)
        if not arguments.skip_big_job:
            env = service_env(database_url, BROKERS[brokers[0]], f"scale-{uuid.uuid4().hex[:8]}", arguments)
            queues.append(env)
            os.environ["DEEPBATCH_QUEUE_NAME"] = env["DEEPBATCH_QUEUE_NAME"]
            written = submit_bench.written_file(arguments.data_dir, arguments.lines)
            rows_before = connection.execute("SELECT count(*) FROM requests").fetchone()[0]
            big = {"broker": brokers[0], "rows_before": rows_before,
                   "bad_lines": written.bad_lines, "duplicate_lines": written.duplicate_lines}
            big["submit"] = submit(database_url, env, written.path, arguments.lines, arguments.steps)
            print(json.dumps({"big_job_submit": big["submit"]}), flush=True)
            if arguments.submit_only:
                big["disk"] = disk(connection)
            else:
                job_id = big["submit"]["job_id"]
                big["worker"] = run_worker(database_url, env, job_id, arguments.timeout)
                big["run"] = run_rates(connection, job_id, arguments.steps)
                print(json.dumps({"big_job_run": big["run"]}), flush=True)
                connection.execute("ANALYZE")
                big["seal_256_events"] = seal_cost(connection, arguments.repeats)
                big["latencies"] = latencies(database_url, job_id, arguments.repeats)
                print(json.dumps({"latencies": big["latencies"]}), flush=True)
                big["export"] = export(env, job_id, work)
                print(json.dumps({"export": big["export"]}), flush=True)
                big["plans"] = plans(database_url, job_id)
                big["disk"] = disk(connection)
            result["big_job"] = big
            result["ratios"] = ratios(result)
    finally:
        connection.close()
        for env in queues:
            purge_queue(env)
        if not arguments.keep:
            with psycopg.connect(arguments.database_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE_NAME}" WITH (FORCE)')
    output = arguments.output or RESULTS_DIRECTORY / f"scale-{arguments.broker}-{arguments.lines}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result.get("ratios"), indent=2))


def ratios(result: dict) -> dict:
    """The issue's goals, as ratios (≥ 1 meets the goal)."""
    big, points = result["big_job"], result["points"]
    first, last = big["submit"]["per_step"][0], big["submit"]["per_step"][-1]
    found: dict = {
        "submit_last_step_over_first": round(last["lines_per_s"] / first["lines_per_s"], 3),
        "submit_first_step_lines_per_s_over_25000": round(first["lines_per_s"] / 25000, 3),
        "submit_last_step_lines_per_s_over_25000": round(last["lines_per_s"] / 25000, 3),
        "submit_peak_rss_last_step_over_first": round(last["peak_rss_mb"] / first["peak_rss_mb"], 3),
    }
    if "latencies" in big:  # not with --submit-only
        found.update({
            "status_200ms_over_worst": round(200 / big["latencies"]["status"]["worst_ms"], 3),
            "dashboard_500ms_over_worst": round(500 / big["latencies"]["dashboard_page"]["worst_ms"], 3),
            "export_lines_per_s_over_100000": round(big["export"]["lines_per_s"] / 100_000, 3),
            "export_rss_90pct_over_50pct": round(big["export"]["rss_mb_at_90pct"] / big["export"]["rss_mb_at_50pct"],
                                                 3),
        })
    for broker in result["brokers"] if points else ():
        first = points[0]["brokers"][broker]["requests_per_s"]
        for point in points[1:]:
            found[f"pipeline_{broker}_at_{point['fill']}_over_at_{points[0]['fill']}_goal_0.8"] = round(
                point["brokers"][broker]["requests_per_s"] / first, 3)
    return found


if __name__ == "__main__":
    main()
