"""What `deepbatch audit anchor` costs: it verifies only the seals written since its last signature.

On a fresh database (DATABASE_URL's server, default the local one) it writes N audit events in seals of
`--seal-events` (a recorder flush's worth), signs the head once, then per repetition writes one more seal
and times, in the same run on the same chain:
- the baseline: `verify_chain` over the whole chain, as `deepbatch audit verify` walks it;
- `anchor_chain`, as `deepbatch audit anchor` runs: it walks the seals after the last signature, then signs.

    python bench/audit_anchor.py                     # 500,000 events, 3 repetitions
    python bench/audit_anchor.py --events 200000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from schema.audit import anchor_chain, verify_chain
from schema.migrate import upgrade

RESULTS_DIRECTORY = Path(__file__).resolve().parents[1] / "bench" / "results"
ADMIN_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
APPEND_SEAL = text("""
    INSERT INTO audit_events (job_id, request_id, event, from_state, to_state, attempt, worker)
    SELECT 'batch_bench', n, 'succeeded', 'running', 'succeeded', 1, 'bench:1'
    FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) n
""")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500_000, help="events in the chain before the first anchor")
    parser.add_argument("--seal-events", type=int, default=500, help="events per seal (one INSERT statement each)")
    parser.add_argument("--repeat", type=int, default=3)
    return parser.parse_args()


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def measure(url: str, arguments: argparse.Namespace) -> dict:
    engine = create_engine(url)
    key = secrets.token_bytes(32)
    with engine.begin() as connection:
        for first in range(0, arguments.events, arguments.seal_events):
            connection.execute(APPEND_SEAL, {"first": first, "last": first + arguments.seal_events - 1})
    with engine.connect() as connection:  # as autovacuum would have by then: without, events are scanned whole
        connection.execute(text("ANALYZE audit_events, audit_seals"))
    with Session(engine) as session:
        first_anchor_s, _ = timed(lambda: anchor_chain(session, key))
        session.commit()
    verify_s, anchor_s = [], []
    for _ in range(arguments.repeat):
        with engine.begin() as connection:
            connection.execute(APPEND_SEAL, {"first": 0, "last": arguments.seal_events - 1})
        with Session(engine) as session:
            seconds, report = timed(lambda: verify_chain(session, key))
            assert report.problems == [], report.problems
            verify_s.append(seconds)
        with Session(engine) as session:
            seconds, (report, anchor) = timed(lambda: anchor_chain(session, key))
            assert anchor is not None and report.checked == arguments.seal_events, report
            session.commit()
            anchor_s.append(seconds)
    engine.dispose()
    return {"first_anchor_s": first_anchor_s, "verify_s": verify_s, "anchor_s": anchor_s}


def main() -> None:
    arguments = parse_arguments()
    name = f"deepbatch_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = "postgresql+psycopg://" + ADMIN_URL.split("://", 1)[1].rsplit("/", 1)[0] + "/" + name
        upgrade(url)
        timings = measure(url, arguments)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    ratios = [verify / anchor for verify, anchor in zip(timings["verify_s"], timings["anchor_s"])]
    result = {
        "events": arguments.events, "seal_events": arguments.seal_events, "repeat": arguments.repeat,
        "cpu_count": os.cpu_count(), **timings,
        "verify_events_per_s_median": arguments.events / statistics.median(timings["verify_s"]),
        "anchor_speedup_worst": min(ratios), "anchor_speedup_median": statistics.median(ratios),
    }
    RESULTS_DIRECTORY.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIRECTORY / "audit-anchor.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{arguments.events:,} events: full verify median {statistics.median(timings['verify_s']):.2f} s "
          f"(worst {max(timings['verify_s']):.2f} s); anchor after one new seal median "
          f"{statistics.median(timings['anchor_s']):.3f} s (worst {max(timings['anchor_s']):.3f} s); "
          f"anchor {result['anchor_speedup_median']:.0f}x faster than verify (worst {min(ratios):.0f}x)")


if __name__ == "__main__":
    main()
