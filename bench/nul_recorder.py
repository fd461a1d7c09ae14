"""The recorder's statement with NULs in its results: the cost of the escape (schema/stored_text.py),
measured where it is paid, without the rest of the pipeline's noise.

Writes batches of `--batch` finished requests (the recorder's flush_max_results, 1024) with
`Transitions.record`, the recorder's one write, on a fresh database of the PostgreSQL server (DATABASE_URL,
default the local one): alternately a batch whose outputs are plain and one where 1 output in 25 holds a
NUL, `--writes` of each. Before the escape, the second kind failed whole (UntranslatableCharacter) and
waited out its leases. Reports the median and worst seconds per write of each kind and the ratio of the
medians (plain ÷ NUL: 1.0 is free), and checks every row was recorded and reads back exactly.

    python bench/nul_recorder.py                  # 30 writes of each kind, 1024 results a write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, text

from pipeline import fresh_database
from producer.queries import create_job
from schema.db import session_factory
from schema.migrate import upgrade
from schema.stored_text import from_stored
from schema.tables import Request, RequestState
from worker.transitions import Success, Transitions

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"
FILLER = "null " * 8


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=30, help="writes of each kind")
    parser.add_argument("--batch", type=int, default=1024, help="results a write")
    parser.add_argument("--nul-every", type=int, default=25)
    parser.add_argument("--database-url",
                        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    return parser.parse_args()


def outputs(count: int, nul_every: int) -> list[str]:
    return [FILLER[:-1] + "\x00" if nul_every and n % nul_every == 0 else FILLER for n in range(count)]


def timed_write(transitions: Transitions, sessions, batch: int, nul_every: int) -> tuple[float, int, bool]:
    """Queue and claim `batch` requests, then time recording them; (seconds, recorded, read back exactly)."""
    with sessions.begin() as session:
        job_id = create_job(session, "bench.jsonl", "m", queue="bench")
        session.execute(insert(Request), [{"job_id": job_id, "line_no": n, "custom_id": str(n), "queue": "bench",
                                           "url": "/v1/completions", "body": {"prompt": "p"},
                                           "state": RequestState.queued} for n in range(batch)])
    claims = transitions.claim_next(batch)
    expected = outputs(len(claims), nul_every)
    successes = [Success(claim, output, "length", 3, 8) for claim, output in zip(claims, expected)]
    started = time.perf_counter()
    recorded = transitions.record(successes, [], "m")
    seconds = time.perf_counter() - started
    with sessions() as session:
        stored = list(session.scalars(text("SELECT s.text FROM results s JOIN requests r ON r.id = s.request_id "
                                           "WHERE r.job_id = :j ORDER BY r.line_no"), {"j": job_id}))
    return seconds, len(recorded), [from_stored(value) for value in stored] == expected


def main() -> None:
    arguments = parse_arguments()
    with fresh_database(arguments.database_url) as database_url:
        url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
        upgrade(url)
        sessions = session_factory(url)
        transitions = Transitions(sessions, "bench:1", timedelta(minutes=5), "bench")
        timed_write(transitions, sessions, arguments.batch, 0)  # warm-up
        seconds: dict[str, list[float]] = {"plain": [], "with_nul": []}
        exact = True
        for _ in range(arguments.writes):
            for kind, nul_every in (("plain", 0), ("with_nul", arguments.nul_every)):
                elapsed, recorded, read_back = timed_write(transitions, sessions, arguments.batch, nul_every)
                seconds[kind].append(elapsed)
                exact &= recorded == arguments.batch and read_back
        sessions.kw["bind"].dispose()
    medians = {kind: statistics.median(values) for kind, values in seconds.items()}
    result = {"batch": arguments.batch, "nul_every": arguments.nul_every, "writes_of_each": arguments.writes,
              "cpus": os.cpu_count(), "every_row_recorded_and_read_back_exactly": exact,
              **{f"{kind}_s": {"median": round(medians[kind], 4), "worst": round(max(values), 4)}
                 for kind, values in seconds.items()},
              "plain_over_nul_median_ratio": round(medians["plain"] / medians["with_nul"], 3)}
    print(json.dumps(result, indent=2))
    RESULTS_DIRECTORY.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIRECTORY / "nul-recorder.json").write_text(json.dumps(result, indent=2) + "\n")
    if not exact:
        raise SystemExit("some row was not recorded, or read back differently")


if __name__ == "__main__":
    main()
