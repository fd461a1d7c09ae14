"""`deepbatch submit` of a large file against its own parsing alone: lines/s, peak memory, and what it wrote.

Writes an N-line file (OpenAI Batch and plain lines, prompts of 200-1000 characters, half of them greedy,
3 % bad lines of nine kinds and 0.5 % reusing an earlier custom_id; kept in --data-dir for later runs),
creates and migrates a fresh database on the local PostgreSQL, runs `deepbatch submit` as a child
process against it and a broker, and reports the child's lines/s, CPU time and peak RSS. The baseline,
measured in the same run, is this process reading and validating the same file with no database or
broker (and, second, also encoding its rows for COPY): the ratio says what the database path costs.
Then it checks what was written: one row per line, one failed row per bad or duplicate line naming it,
one audit event per row, every queued row's id published exactly once, in full slices. The queue and
the database are dropped afterwards. Writes bench/results/submit-<broker>.json (or --output).

    python bench/submit.py                                              # 1,000,000 lines, local Redis
    python bench/submit.py --broker amqp://guest:guest@127.0.0.1:5672//  # RabbitMQ
    python bench/submit.py --lines 100000 --chunk-size 2000             # a quick run, another chunk size
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline import fresh_database  # noqa: E402 - a database of its own, dropped afterwards

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIRECTORY = REPO_ROOT / "bench" / "results"
WORDS = ("river moon bread prime volcano engine table garden window music number planet ocean forest winter "
         "summer city language history science light shadow stone glass paper story question answer explain "
         "summarise translate compare the of and to in is that for it with as").split()
MULTILINGUAL_WORDS = WORDS + "café naïve Größe 東京 données résumé".split()  # one prompt in ten draws from these
MULTILINGUAL_SHARE = 0.1
MODEL = "tiny-deepseek-v3"
# Of what `write_file` writes: a file written by another version is not reused. Version 3: the unknown field
# is one no version of DeepBatch takes (version 2's, logit_bias, became a parameter and the line valid).
FILE_VERSION = 3
BAD_SHARE = 0.03  # of all lines
DUPLICATE_SHARE = 0.005  # of all lines: a valid line whose custom_id an earlier line already took


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a server to create the benchmark's database on (dropped afterwards)")
    parser.add_argument("--chunk-size", type=int, help="DEEPBATCH_INSERT_CHUNK_SIZE; default the setting's")
    parser.add_argument("--slice-size", type=int, help="DEEPBATCH_SLICE_SIZE; default the setting's")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/deepbatch-bench-submit"))
    parser.add_argument("--keep-database", action="store_true", help="leave the database for inspection")
    parser.add_argument("--output", type=Path, help="where the JSON goes; default bench/results/submit-<broker>.json")
    return parser.parse_args()


@dataclass
class WrittenFile:
    """What the file holds, so the rows and messages can be checked against it."""

    path: Path
    lines: int = 0
    bad_lines: int = 0
    duplicate_lines: int = 0
    bad_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def failed_lines(self) -> int:
        return self.bad_lines + self.duplicate_lines

    @property
    def valid_lines(self) -> int:
        return self.lines - self.failed_lines


class LineWriter:
    """Realistic lines drawn from one long text of random words (slicing it is fast; no two prompts alike)."""

    def __init__(self, seed: int = 0):
        self.random = random.Random(seed)
        self.text = " ".join(self.random.choice(WORDS) for _ in range(400_000))
        self.multilingual_text = " ".join(self.random.choice(MULTILINGUAL_WORDS) for _ in range(100_000))
        self.recent_ids: list[str] = []  # custom_ids of recent valid lines, for the duplicates

    def prompt(self) -> str:
        text = self.multilingual_text if self.random.random() < MULTILINGUAL_SHARE else self.text
        length = self.random.randint(200, 1000)
        start = self.random.randrange(len(text) - length)
        return text[start:start + length]

    def valid(self, line_no: int) -> tuple[dict, str]:
        """One of four forms, half of them greedy (so they carry a result cache key); returns (line, custom_id)."""
        form = line_no % 4
        if form == 0:
            return {"prompt": self.prompt(), "max_tokens": 256, "temperature": 0}, str(line_no)
        if form == 1:
            custom_id = f"chat-{line_no}"
            return {"custom_id": custom_id, "messages": [{"role": "user", "content": self.prompt()}],
                    "temperature": 0.7, "top_p": 0.95}, custom_id
        custom_id = f"request-{line_no}"
        if form == 2:
            body = {"model": MODEL, "max_tokens": 512, "temperature": 0, "messages": [
                {"role": "system", "content": "You are a careful assistant. Answer in one paragraph."},
                {"role": "user", "content": self.prompt()}]}
            return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}, custom_id
        body = {"model": MODEL, "prompt": self.prompt(), "max_tokens": 128, "seed": line_no, "stop": ["\n\n"]}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}, custom_id

    def bad(self, line_no: int) -> tuple[bytes, str]:
        """A line the producer must reject, of one of several kinds; returns (bytes, kind)."""
        kind = BAD_KINDS[line_no % len(BAD_KINDS)]
        prompt = self.prompt()
        lines = {
            "invalid_json": lambda: json.dumps({"prompt": prompt}).encode()[:-7],
            "wrong_type": lambda: json.dumps({"prompt": len(prompt)}).encode(),
            "unknown_field": lambda: json.dumps({"prompt": prompt, "max_output_tokens": 5}).encode(),
            "unknown_model": lambda: json.dumps({"custom_id": f"gpt-{line_no}", "method": "POST",
                                                 "url": "/v1/completions",
                                                 "body": {"model": "gpt-4o", "prompt": prompt}}).encode(),
            "missing_field": lambda: json.dumps({"custom_id": f"empty-{line_no}", "method": "POST",
                                                 "url": "/v1/chat/completions", "body": {"max_tokens": 4}}).encode(),
            "nul_character": lambda: json.dumps({"prompt": prompt[:100] + "\x00" + prompt[100:]}).encode(),
            "invalid_utf8": lambda: b'{"prompt": "' + prompt.encode()[:100] + b'\xff"}',
            "empty_line": lambda: b"",
            "not_an_object": lambda: json.dumps([prompt]).encode(),
        }
        return lines[kind](), kind

    def duplicate(self) -> bytes:
        """A valid line reusing a recent custom_id: some in the same chunk as the first use, some across chunks."""
        custom_id = self.random.choice(self.recent_ids)
        return json.dumps({"custom_id": custom_id, "prompt": self.prompt()}).encode()

    def line(self, line_no: int, written: WrittenFile) -> bytes:
        draw = self.random.random()
        if draw < BAD_SHARE:
            raw, kind = self.bad(line_no)
            written.bad_lines += 1
            written.bad_kinds[kind] = written.bad_kinds.get(kind, 0) + 1
            return raw
        if draw < BAD_SHARE + DUPLICATE_SHARE and self.recent_ids:
            written.duplicate_lines += 1
            return self.duplicate()
        document, custom_id = self.valid(line_no)
        self.recent_ids.append(custom_id)
        if len(self.recent_ids) > 5000:
            del self.recent_ids[:2500]
        return json.dumps(document, ensure_ascii=False).encode()


BAD_KINDS = ("invalid_json", "wrong_type", "unknown_field", "unknown_model", "missing_field", "nul_character",
             "invalid_utf8", "empty_line", "not_an_object")


def write_file(path: Path, count: int) -> WrittenFile:
    written, writer = WrittenFile(path, lines=count), LineWriter()
    with path.open("wb") as stream:
        for line_no in range(1, count + 1):
            stream.write(writer.line(line_no, written) + b"\n")
    return written


def written_file(data_dir: Path, count: int) -> WrittenFile:
    """The N-line file, written once and reused (with what it holds) by later runs."""
    path, summary = data_dir / f"lines-{FILE_VERSION}-{count}.jsonl", data_dir / f"lines-{FILE_VERSION}-{count}.json"
    if path.exists() and summary.exists():
        return WrittenFile(path=path, **json.loads(summary.read_text()))
    written = write_file(path, count)
    summary.write_text(json.dumps({key: value for key, value in written.__dict__.items() if key != "path"}))
    return written


def time_baseline(path: Path) -> dict:
    """This process reading and validating the file (and, second, also encoding its rows for COPY)."""
    from producer.queries import copy_line
    from producer.reader import read_file
    from schema.cache import CLI_OWNER, CacheScope
    from schema.settings import Settings

    settings = Settings(_env_file=None, model=MODEL, model_aliases="")  # as the child's environment says
    started = time.perf_counter()
    lines = sum(1 for _ in read_file(path, settings.max_line_bytes, settings.served_model_names))
    validated = time.perf_counter()
    for line in read_file(path, settings.max_line_bytes, settings.served_model_names):
        copy_line(line, CacheScope(settings.model, CLI_OWNER))
    encoded = time.perf_counter()
    return {"read_validate_seconds": round(validated - started, 2),
            "read_validate_lines_per_s": round(lines / (validated - started)),
            "read_validate_encode_seconds": round(encoded - validated, 2),
            "read_validate_encode_lines_per_s": round(lines / (encoded - validated))}


def run_submit(path: Path, env: dict[str, str]) -> dict:
    """`deepbatch submit` in a child process: its wall time, CPU time and peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-m", "producer.cli", "submit", str(path)], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"deepbatch submit failed ({child.returncode}):\n{child.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # ru_maxrss of RUSAGE_CHILDREN: the largest child this process has waited for, in KiB on Linux.
    return {"job_id": child.stdout.strip().splitlines()[-1], "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2), "peak_rss_mb": round(after.ru_maxrss / 1024, 1)}


def count_rows(database_url: str, job_id: str) -> dict:
    import psycopg

    with psycopg.connect(database_url) as connection:
        rows = connection.execute("""
            SELECT count(*), count(*) FILTER (WHERE state = 'failed'), count(*) FILTER (WHERE state = 'queued'),
                   count(*) FILTER (WHERE error_code = 'duplicate_custom_id'),
                   count(*) FILTER (WHERE state = 'failed' AND error_message NOT LIKE 'line ' || line_no || ': %%'),
                   count(*) FILTER (WHERE state = 'queued' AND cache_key IS NOT NULL)
            FROM requests WHERE job_id = %s""", (job_id,)).fetchone()
        events = connection.execute("SELECT count(*) FROM audit_events WHERE job_id = %s", (job_id,)).fetchone()[0]
        total_lines = connection.execute("SELECT total_lines FROM jobs WHERE id = %s", (job_id,)).fetchone()[0]
    names = ("rows", "failed_rows", "queued_rows", "duplicate_rows", "failed_rows_not_naming_their_line",
             "rows_with_cache_key")
    return {**dict(zip(names, rows)), "audit_events": events, "job_total_lines": total_lines}


def drain_messages(env: dict[str, str]) -> dict:
    """Every message in the job's queue, taken off it: how many, and the request ids they carry. Then the
    queue (and its exchange) is deleted."""
    from socket import timeout as SocketTimeout

    from schema.settings import Settings
    from worker.app import make_celery_app, work_queue

    settings = Settings(database_url=env["DEEPBATCH_DATABASE_URL"], broker_url=env["DEEPBATCH_BROKER_URL"],
                        queue_name=env["DEEPBATCH_QUEUE_NAME"])
    app = make_celery_app(settings)
    queue = work_queue(settings, settings.broker_url)
    request_ids: list[int] = []
    messages = 0

    def take(body: list, message) -> None:
        nonlocal messages
        messages += 1
        request_ids.extend(body[0][0])

    with app.connection_for_write() as connection:
        with connection.Consumer(queue, accept=["json"], callbacks=[take], no_ack=True):
            try:
                while True:
                    connection.drain_events(timeout=2)
            except SocketTimeout:
                pass
        channel = connection.default_channel
        queue(channel).delete()
        queue.exchange(channel).delete()
    return {"messages": messages, "request_ids_published": len(request_ids),
            "distinct_request_ids_published": len(set(request_ids))}


def submit_env(arguments: argparse.Namespace, database_url: str, chunk_size: int, slice_size: int) -> dict[str, str]:
    return {**os.environ, "DEEPBATCH_DATABASE_URL": database_url, "DEEPBATCH_BROKER_URL": arguments.broker,
            "DEEPBATCH_QUEUE_NAME": f"deepbatch-bench-{uuid.uuid4().hex[:8]}", "DEEPBATCH_MODEL": MODEL,
            "DEEPBATCH_MODEL_ALIASES": "", "DEEPBATCH_DATA_DIR": str(arguments.data_dir / "data"),
            "DEEPBATCH_INSERT_CHUNK_SIZE": str(chunk_size), "DEEPBATCH_SLICE_SIZE": str(slice_size)}


def run_and_count(arguments: argparse.Namespace, written: WrittenFile, chunk_size: int, slice_size: int) -> tuple:
    """Submit into a fresh database, count what it wrote and drain what it published; then drop both."""
    from schema.migrate import upgrade

    with fresh_database(arguments.postgres, keep=arguments.keep_database) as database_url:
        upgrade(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
        env = submit_env(arguments, database_url, chunk_size, slice_size)
        try:
            submit = run_submit(written.path, env)
            rows = count_rows(database_url, submit["job_id"])
        finally:
            published = drain_messages(env)
    submit["lines_per_s"] = round(written.lines / submit["seconds"])
    return submit, rows, published


def checks(written: WrittenFile, rows: dict, published: dict, slice_size: int) -> dict[str, bool]:
    return {
        "one_row_per_line": rows["rows"] == written.lines == rows["job_total_lines"],
        "one_failed_row_per_bad_or_duplicate_line": rows["failed_rows"] == written.failed_lines,
        "duplicates_rejected": rows["duplicate_rows"] == written.duplicate_lines,
        "errors_name_their_line": rows["failed_rows_not_naming_their_line"] == 0,
        "one_audit_event_per_row_and_two_for_the_job": rows["audit_events"] == written.lines + 2,
        "every_queued_row_published_once": published["request_ids_published"]
        == published["distinct_request_ids_published"] == rows["queued_rows"],
        "full_slices": published["messages"] == -(-rows["queued_rows"] // slice_size),
    }


def main() -> None:
    from schema.settings import Settings

    arguments = parse_arguments()
    arguments.data_dir.mkdir(parents=True, exist_ok=True)
    defaults = Settings(_env_file=None)
    chunk_size = arguments.chunk_size or defaults.insert_chunk_size
    slice_size = arguments.slice_size or defaults.slice_size
    written = written_file(arguments.data_dir, arguments.lines)
    baseline = time_baseline(written.path)
    load_before = os.getloadavg()[0]  # other work on the machine shows in the figures: it is recorded
    submit, rows, published = run_and_count(arguments, written, chunk_size, slice_size)
    passed = checks(written, rows, published, slice_size)
    broker = "redis" if arguments.broker.startswith("redis") else "rabbitmq"
    result = {
        "lines": written.lines, "file_mb": round(written.path.stat().st_size / 2**20, 1),
        "bad_lines": written.bad_lines, "duplicate_lines": written.duplicate_lines, "bad_kinds": written.bad_kinds,
        "broker": broker, "insert_chunk_size": chunk_size, "slice_size": slice_size, "cpus": os.cpu_count(),
        "load_average_before_submit": round(load_before, 2),
        "submit": submit, "baseline_in_process": baseline,
        "submit_share_of_read_validate": round(submit["lines_per_s"] / baseline["read_validate_lines_per_s"], 3),
        "rows": rows, "published": published, "checks": passed,
    }
    print(json.dumps(result, indent=2))
    RESULTS_DIRECTORY.mkdir(parents=True, exist_ok=True)
    output = arguments.output or RESULTS_DIRECTORY / f"submit-{broker}.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    if not all(passed.values()):
        raise SystemExit(f"checks failed: {[name for name, ok in passed.items() if not ok]}")


if __name__ == "__main__":
    main()
