"""Chaos: workers killed, brokers and Postgres restarted, queues flushed, requests failing for good.

Each test ends with every request in exactly one final state and at most one result, counted by SQL.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from tests.conftest import deepbatch, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

CHAOS_SETTINGS = {
    "DEEPBATCH_LEASE_S": "6",
    "DEEPBATCH_RECONCILE_INTERVAL_S": "2",
    "DEEPBATCH_VISIBILITY_TIMEOUT_S": "30",
    "DEEPBATCH_RETRY_BACKOFF_S": "0.2",
    "DEEPBATCH_MAX_ATTEMPTS": "3",
    "DEEPBATCH_DEFAULT_MAX_TOKENS": "2",
    "DEEPBATCH_MAX_BATCH_SIZE": "32",
}


def write_prompts(path: Path, count: int, special: dict[int, str] | None = None) -> Path:
    special = special or {}
    with path.open("w") as stream:
        for line_no in range(1, count + 1):
            stream.write(json.dumps({"prompt": special.get(line_no, f"Item {line_no} is"), "max_tokens": 2}) + "\n")
    return path


def counts(db_engine: Engine, job_id: str) -> dict[str, int]:
    """Request states and result counts of a job, tolerating a database that is restarting."""
    sql = text("""
        SELECT count(*) AS total,
               count(*) FILTER (WHERE state IN ('succeeded', 'failed', 'dead', 'cancelled')) AS final,
               count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE state = 'dead') AS dead,
               (SELECT count(*) FROM results WHERE job_id = :j) AS results,
               (SELECT count(*) FROM (SELECT request_id FROM audit_events WHERE job_id = :j AND event = 'succeeded'
                                      GROUP BY request_id HAVING count(*) > 1) AS twice) AS succeeded_twice,
               (SELECT count(*) FROM (SELECT request_id FROM audit_events WHERE job_id = :j AND event = 'started'
                                      GROUP BY request_id HAVING count(*) > 1) AS again) AS started_again,
               (SELECT count(*) FROM audit_events done JOIN audit_events later
                    ON later.request_id = done.request_id AND later.event = 'started' AND later.id > done.id
                WHERE done.job_id = :j AND done.event = 'succeeded') AS started_after_success
        FROM requests WHERE job_id = :j
    """)
    for _ in range(60):
        try:
            with db_engine.connect() as connection:
                return dict(connection.execute(sql, {"j": job_id}).mappings().one())
        except OperationalError:
            time.sleep(1)
    raise AssertionError("the database did not come back")


def assert_every_request_final_once(db_engine: Engine, job_id: str, total: int) -> dict[str, int]:
    result = counts(db_engine, job_id)
    assert result["total"] == total and result["final"] == total, result
    assert result["results"] == result["succeeded"] and result["succeeded_twice"] == 0, result
    assert result["started_after_success"] == 0, result
    return result


def wait_for_progress(db_engine: Engine, job_id: str, finished: int, timeout: float, log) -> None:
    wait_until(lambda: counts(db_engine, job_id)["final"] >= finished, timeout=timeout,
               message=f"{finished} requests to finish; worker log:\n{log()[-2000:]}")


def wait_for_job(db_engine: Engine, job_id: str, total: int, timeout: float, log) -> None:
    wait_for_progress(db_engine, job_id, total, timeout, log)


@pytest.fixture
def chaos_env(service_env: dict) -> dict:
    return {**service_env, **CHAOS_SETTINGS}


def test_worker_killed_three_times_loses_and_duplicates_nothing(
    tmp_path: Path, chaos_env: dict, start_worker, db_engine: Engine
) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2000)
    job_id = deepbatch("submit", str(prompts), env=chaos_env).stdout.strip()
    for kill in range(1, 4):
        worker = start_worker(**chaos_env)
        wait_for_progress(db_engine, job_id, 400 * kill, timeout=300, log=worker.log_text)
        worker.process.kill()  # SIGKILL mid-batch: no warm shutdown, no acks
        worker.process.wait()
    survivor = start_worker(**chaos_env)
    wait_for_job(db_engine, job_id, 2000, timeout=400, log=survivor.log_text)
    result = assert_every_request_final_once(db_engine, job_id, 2000)
    assert result["succeeded"] == 2000, result
    assert result["started_again"] > 0, "no kill caught a request mid-flight; the test proved nothing"
    # Only what a killed worker held runs again — at most its engine's target depth (2 × 32) and the
    # results it had not yet recorded — never the rest of its slices (256 requests each).
    assert result["started_again"] <= 3 * 2 * 64, result
    print("chaos (1) counts:", result)


def restart_rabbitmq() -> None:
    """`rabbitmqctl stop_app`, a second down, `start_app`: the same calls (rabbit:stop/0, rabbit:start/0) in
    one command, since each rabbitmqctl boots an Erlang VM of its own (2 s on 2 busy cores), which kept
    the broker down for 5 s and made the worker wait for its third reconnection attempt, 6 s after the loss."""
    subprocess.run(["rabbitmqctl", "eval", "ok = rabbit:stop(), timer:sleep(1000), ok = rabbit:start()."],
                   check=True, capture_output=True, timeout=120)


@pytest.fixture
def persistent_redis(tmp_path: Path):
    """A Redis of this test's own, with an append-only file, so that a restart keeps its queue."""
    port = 6391
    directory = tmp_path / "redis"
    directory.mkdir()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
               "--appendfsync", "always", "--dir", str(directory), "--daemonize", "yes"]

    def start() -> None:
        subprocess.run(command, check=True, capture_output=True)
        wait_until(lambda: _redis_pings(port), timeout=30, message="the test Redis to start")

    def stop() -> None:
        try:
            redis.Redis(port=port, retry=NO_RETRY).shutdown(save=True)
        except redis.ConnectionError:
            pass
        wait_until(lambda: not _redis_pings(port), timeout=30, message="the test Redis to stop")

    start()
    yield f"redis://127.0.0.1:{port}/0", start, stop
    stop()


# One try: redis-py retries a lost connection 10 times with backoff by default, so each look at a stopped
# server took 3 s, and the fixture's restart kept Redis down for 7 s instead of the 1 s it asks for.
NO_RETRY = Retry(NoBackoff(), 0)


def _redis_pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5, retry=NO_RETRY).ping())
    except redis.ConnectionError:
        return False


def supervise(db_engine: Engine, job_id: str, total: int, start_worker, env: dict, timeout: float,
              worker=None) -> list:
    """Wait for the job as a process supervisor would (compose's restart policy, systemd): a worker that
    exits is replaced. Returns every worker started, the given one first."""
    workers = [worker] if worker is not None else []
    deadline = time.monotonic() + timeout
    while counts(db_engine, job_id)["final"] < total:
        log = workers[-1].log_text()[-2000:] if workers else ""
        assert time.monotonic() < deadline, f"the job never finished; last worker log:\n{log}"
        if not workers or workers[-1].process.poll() is not None:
            workers.append(start_worker(**env))
        time.sleep(0.5)
    return workers


def run_job_through_outage(tmp_path: Path, env: dict, start_worker, db_engine: Engine, outage, felt: str,
                           total: int = 600):
    """Submit, let a quarter finish, cause the outage, and check the worker noticed it (`felt` in its log).

    The worker is supervised, as the README advises: a worker that exits is replaced, and the job must
    still finish, losing and repeating nothing.
    """
    prompts = write_prompts(tmp_path / "prompts.jsonl", total)
    job_id = deepbatch("submit", str(prompts), env=env).stdout.strip()
    worker = start_worker(**env)
    wait_for_progress(db_engine, job_id, total // 4, timeout=180, log=worker.log_text)
    outage()
    workers = supervise(db_engine, job_id, total, start_worker, env, timeout=300, worker=worker)
    result = assert_every_request_final_once(db_engine, job_id, total)
    assert result["succeeded"] == total, result
    assert felt in worker.log_text(), f"the worker never noticed the outage ({felt!r} not in its log)"
    result["worker_restarts"] = len(workers) - 1
    return result


BROKER_LOST = "Connection to broker lost"


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_postgres_restart_mid_job(tmp_path: Path, chaos_env: dict, start_worker, db_engine: Engine) -> None:
    def restart_postgres() -> None:
        # Down for a few seconds rather than a bare restart: a restart of about a second can fall between
        # two writes and be healed silently by the pool's pre-ping, proving nothing.
        version = sorted(Path("/etc/postgresql").iterdir())[0].name
        cluster = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
        subprocess.run([*cluster, "stop"], check=True, capture_output=True, timeout=120)
        time.sleep(5)
        subprocess.run([*cluster, "start"], check=True, capture_output=True, timeout=120)

    result = run_job_through_outage(tmp_path, chaos_env, start_worker, db_engine, restart_postgres,
                                    "database unavailable")
    print("chaos (3) postgres restart counts:", result)


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_redis_flushed_mid_job_is_repaired_by_reconcile(
    tmp_path: Path, chaos_env: dict, start_worker, db_engine: Engine
) -> None:
    from tests.conftest import REDIS_URL

    # Workers reconcile by themselves only hourly here, so the repair below is the CLI's. Small slices, so
    # that most of the job's messages are still in the broker (not held by the worker) when it is flushed.
    env = {**chaos_env, "DEEPBATCH_BROKER_URL": REDIS_URL, "DEEPBATCH_RECONCILE_INTERVAL_S": "3600",
           "DEEPBATCH_SLICE_SIZE": "20"}

    def flush_and_reconcile() -> None:
        redis.Redis.from_url(REDIS_URL).flushdb()
        time.sleep(3)  # let the worker drain what it had prefetched: the rest is gone
        stuck = counts(db_engine, job_id_holder[0])
        assert stuck["final"] < stuck["total"], "the flush came too late to lose anything"
        output = deepbatch("reconcile", env=env).stderr
        assert "queued requests re-published" in output

    job_id_holder: list[str] = []
    prompts = write_prompts(tmp_path / "prompts.jsonl", 600)
    job_id_holder.append(deepbatch("submit", str(prompts), env=env).stdout.strip())
    worker = start_worker(**env)
    wait_for_progress(db_engine, job_id_holder[0], 100, timeout=180, log=worker.log_text)
    flush_and_reconcile()
    wait_for_job(db_engine, job_id_holder[0], 600, timeout=300, log=worker.log_text)
    result = assert_every_request_final_once(db_engine, job_id_holder[0], 600)
    assert result["succeeded"] == 600, result
    print("chaos (4) redis flush + reconcile counts:", result)


def test_always_failing_request_is_dead_lettered_after_max_attempts_and_requeue_brings_it_back(
    tmp_path: Path, chaos_env: dict, queue_name: str, start_worker, db_engine: Engine
) -> None:
    from schema.settings import Settings
    from worker.app import make_celery_app, queue_length

    marker = tmp_path / "fail-while-this-exists"
    marker.touch()
    env = {**chaos_env, "DEEPBATCH_ENGINE": "tests.chaos.engines:flaky_engine",
           "DEEPBATCH_TEST_FAIL_MARKER": str(marker)}
    prompts = write_prompts(tmp_path / "prompts.jsonl", 50, special={7: "FAIL_TRANSIENTLY please"})
    job_id = deepbatch("submit", str(prompts), env=env).stdout.strip()
    worker = start_worker(**env)
    wait_for_job(db_engine, job_id, 50, timeout=180, log=worker.log_text)

    with db_engine.connect() as connection:
        request_id, state, attempt = connection.execute(text(
            "SELECT id, state, attempt FROM requests WHERE job_id = :j AND line_no = 7"), {"j": job_id}).one()
        started = connection.execute(text(
            "SELECT count(*) FROM audit_events WHERE request_id = :r AND event = 'started'"),
            {"r": request_id}).scalar()
    assert (state, attempt, started) == ("dead", 3, 3)
    with db_engine.connect() as connection:  # its slice-mates ran once each, untouched by its retries
        mates_started = connection.execute(text(
            "SELECT count(*) FROM audit_events WHERE job_id = :j AND event = 'started' AND request_id <> :r"),
            {"j": job_id, "r": request_id}).scalar()
    assert mates_started == 49
    letters = json.loads(deepbatch("dlq", "list", "--job", job_id, "--json", env=env).stdout)
    assert [(letter["request_id"], letter["attempts"], letter["line_no"]) for letter in letters] == [(request_id, 3, 7)]
    assert "injected: CUDA out of memory" in letters[0]["last_error"]
    app = make_celery_app(Settings(broker_url=env["DEEPBATCH_BROKER_URL"], queue_name=queue_name))
    assert queue_length(app, f"{queue_name}.dead") == 1

    marker.unlink()  # the fault is fixed: requeue and it succeeds
    deepbatch("dlq", "requeue", str(request_id), env=env)
    wait_until(lambda: counts(db_engine, job_id)["succeeded"] == 50, timeout=120,
               message=f"the requeued request to succeed; worker log:\n{worker.log_text()[-2000:]}")
    result = assert_every_request_final_once(db_engine, job_id, 50)
    assert json.loads(deepbatch("dlq", "list", "--job", job_id, "--json", env=env).stdout) == []
    print("chaos (5) dead letter + requeue counts:", result)


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)  # redelivers a dead worker's messages at once
def test_a_request_that_kills_its_worker_is_dead_lettered_instead_of_looping(
    tmp_path: Path, chaos_env: dict, start_worker, db_engine: Engine
) -> None:
    """Three requests, the third kills every worker it runs on. The first worker dies holding all three:
    they come back as one group, uncharged, which kills the second worker too; the group is split, lines
    1-2 succeed together, and line 3 runs alone, is charged, and having no attempt left (max 1) is
    dead-lettered. Its group-mates are never charged, even by the redelivered messages of dead workers."""
    env = {**chaos_env, "DEEPBATCH_ENGINE": "tests.chaos.engines:poison_engine", "DEEPBATCH_MAX_ATTEMPTS": "1",
           "DEEPBATCH_LEASE_S": "3", "DEEPBATCH_RECONCILE_INTERVAL_S": "1"}
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3, special={3: "KILL_WORKER now"})
    job_id = deepbatch("submit", str(prompts), env=env).stdout.strip()
    workers_started = len(supervise(db_engine, job_id, 3, start_worker, env, timeout=300))
    result = assert_every_request_final_once(db_engine, job_id, 3)
    with db_engine.connect() as connection:
        state, attempt, error = connection.execute(text(
            "SELECT state, attempt, error_message FROM requests WHERE job_id = :j AND line_no = 3"),
            {"j": job_id}).one()
        charged = connection.execute(text(
            "SELECT count(*) FROM requests WHERE job_id = :j AND line_no <> 3 AND attempt > max_attempts"),
            {"j": job_id}).scalar()
    assert (state, result["succeeded"], result["dead"]) == ("dead", 2, 1)
    assert charged == 0, "an innocent request was charged for a loss it shared"
    # Killed holding 3 and 3 (uncharged), then alone (charged): three workers, and a fourth alive at the end.
    assert (attempt, workers_started) == (3, 4), (attempt, workers_started)
    assert "stopped during attempt 3" in error
    print("poison request counts:", result, "workers started:", workers_started)


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_a_hung_workers_requests_are_finished_at_full_depth(
    tmp_path: Path, chaos_env: dict, start_worker, db_engine: Engine
) -> None:
    """Two workers on a batching engine of 8 a step, 0.5 s a step (16 requests/s each). Once the whole job is
    claimed, one is stopped (SIGSTOP) past its lease: the survivor takes back what it held and runs it at
    no less than half the rate each worker ran at before, every request succeeding once."""
    env = {**chaos_env, "DEEPBATCH_ENGINE": "tests.chaos.engines:slow_engine", "DEEPBATCH_TEST_STEP_S": "0.5",
           "DEEPBATCH_MAX_BATCH_SIZE": "8", "DEEPBATCH_SLICE_SIZE": "16", "DEEPBATCH_LEASE_S": "3",
           "DEEPBATCH_RECONCILE_INTERVAL_S": "1"}
    total = 240
    prompts = write_prompts(tmp_path / "prompts.jsonl", total)
    workers = [start_worker(**env), start_worker(**env)]
    for worker in workers:
        wait_until(lambda: " ready." in worker.log_text(), timeout=120,
                   message=f"the worker to start; its log:\n{worker.log_text()[-2000:]}")
    job_id = deepbatch("submit", str(prompts), env=env).stdout.strip()
    hung = workers[1]
    try:
        wait_until(lambda: counts(db_engine, job_id)["final"] + running(db_engine, job_id) == total, timeout=120,
                   interval=0.02, message="the whole job to be claimed")
        hung.process.send_signal(signal.SIGSTOP)
        with db_engine.connect() as connection:
            hung_at = connection.execute(text("SELECT now()")).scalar()
        lost = running(db_engine, job_id, f"%:{hung.process.pid}")
        assert lost >= 4, f"the stopped worker held {lost} requests: too few to measure"
        wait_for_job(db_engine, job_id, total, timeout=120, log=workers[0].log_text)
    finally:
        hung.process.kill()
    result = assert_every_request_final_once(db_engine, job_id, total)
    assert result["succeeded"] == total, result
    steady, tail, recovered = rates(db_engine, job_id, hung_at)
    assert recovered == lost, (recovered, lost)
    print(f"hung worker: {lost} requests recovered at {tail:.1f}/s; each worker ran {steady:.1f}/s before")
    assert tail >= 0.5 * steady, (tail, steady)


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)  # the circuit is the worker's, not the broker's
def test_a_broken_gpu_opens_its_circuit_and_its_requests_succeed_on_a_healthy_worker(
    tmp_path: Path, chaos_env: dict, start_worker, db_engine: Engine
) -> None:
    """One worker whose device fails every request with a CUDA error, one healthy, on one job with three
    attempts a request: the broken worker gives back what it claimed, uncounted, and exits for its
    supervisor (exit code 75); every request succeeds on the healthy one, none dead, none with an error."""
    from worker.circuit import EXIT_CIRCUIT_OPEN

    env = {**chaos_env, "DEEPBATCH_ENGINE": "tests.chaos.engines:slow_engine", "DEEPBATCH_TEST_STEP_S": "0.05",
           "DEEPBATCH_SLICE_SIZE": "20"}
    broken = start_worker(**{**env, "DEEPBATCH_ENGINE": "tests.chaos.engines:broken_device_engine"})
    healthy = start_worker(**env)
    for worker in (broken, healthy):
        wait_until(lambda: " ready." in worker.log_text(), timeout=120,
                   message=f"the worker to start; its log:\n{worker.log_text()[-2000:]}")
    job_id = deepbatch("submit", str(write_prompts(tmp_path / "prompts.jsonl", 200)), env=env).stdout.strip()
    wait_for_job(db_engine, job_id, 200, timeout=180, log=healthy.log_text)
    result = assert_every_request_final_once(db_engine, job_id, 200)
    assert (result["succeeded"], result["dead"]) == (200, 0), result
    assert broken.process.wait(timeout=60) == EXIT_CIRCUIT_OPEN, broken.log_text()[-3000:]
    assert "circuit open: the engine's device failed: RuntimeError: CUDA error" in broken.log_text()
    with db_engine.connect() as connection:
        given_back, with_errors, workers = connection.execute(text("""
            SELECT (SELECT count(*) FROM audit_events WHERE job_id = :j AND event = 'given_back'),
                   (SELECT count(*) FROM requests WHERE job_id = :j AND error_code IS NOT NULL),
                   (SELECT count(DISTINCT worker) FROM results WHERE job_id = :j)
        """), {"j": job_id}).one()
    assert given_back > 0, "the broken worker claimed nothing; the test proved nothing"
    assert (with_errors, workers) == (0, 1)
    print("broken gpu:", result, f"{given_back} given back")


def running(db_engine: Engine, job_id: str, worker: str = "%") -> int:
    with db_engine.connect() as connection:
        return connection.execute(text(
            "SELECT count(*) FROM requests WHERE job_id = :j AND state = 'running' AND worker LIKE :w"),
            {"j": job_id, "w": worker}).scalar()


def rates(db_engine: Engine, job_id: str, hung_at) -> tuple[float, float, int]:
    """Requests/s of each of the two workers from the job's first claim to the hang; requests/s of the
    recovery, from the re-queueing of what the hung worker held to its last result; how many it was."""
    with db_engine.connect() as connection:
        before = connection.execute(text("""
            SELECT count(*) FILTER (WHERE s.created_at <= :hung_at),
                   extract(epoch FROM :hung_at - (SELECT min(created_at) FROM audit_events
                                                  WHERE job_id = :j AND event = 'started'))::float8
            FROM results s WHERE s.job_id = :j
        """), {"j": job_id, "hung_at": hung_at}).one()
        after = connection.execute(text("""
            SELECT count(*), extract(epoch FROM max(s.created_at) - min(e.created_at))::float8
            FROM audit_events e JOIN results s ON s.request_id = e.request_id
            WHERE e.job_id = :j AND e.event = 'requeued'
        """), {"j": job_id}).one()
    return before[0] / before[1] / 2, after[0] / after[1], after[0]


RESTARTS = 10


def restart_under_one_worker(tmp_path: Path, env: dict, start_worker, db_engine: Engine, restart,
                             job_size: int = 2000) -> dict:
    """Restart the broker RESTARTS times under one unsupervised worker while it works: after each restart
    its consumer must serve again through the restarted broker (`answers_ping`) and the worker never exit.
    Whenever the job in hand has finished, another is submitted, so every restart falls during a job however
    fast this machine is; each job then completes with every request succeeded exactly once."""
    from schema.settings import Settings
    from worker.app import make_celery_app

    prompts = write_prompts(tmp_path / "prompts.jsonl", job_size)
    jobs = [deepbatch("submit", str(prompts), env=env).stdout.strip()]
    worker = start_worker(**env)
    wait_for_progress(db_engine, jobs[0], 20, timeout=180, log=worker.log_text)
    app = make_celery_app(Settings(broker_url=env["DEEPBATCH_BROKER_URL"], queue_name=env["DEEPBATCH_QUEUE_NAME"]))
    for restart_number in range(1, RESTARTS + 1):
        if counts(db_engine, jobs[-1])["final"] >= job_size * 0.8:
            jobs.append(deepbatch("submit", str(prompts), env=env).stdout.strip())
        restart()
        wait_until(lambda: worker.process.poll() is not None or answers_ping(app, worker.log_text()),
                   timeout=120, message=f"the worker to serve again after restart {restart_number}; its log:\n"
                                        f"{worker.log_text()[-3000:]}")
        assert worker.process.poll() is None, (
            f"the worker exited after restart {restart_number}; its log:\n{worker.log_text()[-3000:]}")
    results = {}
    for job_id in jobs:
        wait_for_job(db_engine, job_id, job_size, timeout=600, log=worker.log_text)
        results[job_id] = assert_every_request_final_once(db_engine, job_id, job_size)
        assert results[job_id]["succeeded"] == job_size, results[job_id]
    assert worker.process.poll() is None, f"the worker exited; its log:\n{worker.log_text()[-3000:]}"
    return {"jobs": len(jobs), "broker_lost": worker.log_text().count(BROKER_LOST), "results": results}


def answers_ping(app, worker_log: str) -> bool:
    """Whether the worker's consumer answers a remote-control ping, sent through the broker as it is now: a
    consumer still on a connection to the stopped broker cannot hear it.

    Not Celery's "Connected to" line: a restart that falls just after that line, while the consumer is still
    starting, is waited out inside its start-up (the Heart step publishes worker-online with retry=True, and
    redis-py's pool then replaces the dead sockets), so the consumer serves the restarted Redis without ever
    logging a lost or a new connection: 2 restarts in 60 on 2 busy cores, where waiting for the line failed
    the test 1 run in 3."""
    name = re.search(r"(deepbatch-\d+@\S+) ready\.", worker_log)
    if name is None:
        return False
    try:
        with app.connection_for_write() as connection:
            return bool(app.control.ping(destination=[name.group(1)], timeout=1.0, connection=connection))
    except Exception:  # noqa: BLE001 - the broker is still starting: not yet
        return False


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_one_worker_survives_ten_redis_restarts_without_a_supervisor(
    tmp_path: Path, chaos_env: dict, start_worker, db_engine: Engine, persistent_redis
) -> None:
    url, start, stop = persistent_redis
    env = {**chaos_env, "DEEPBATCH_BROKER_URL": url}

    def restart() -> None:
        stop()
        time.sleep(1)
        start()

    result = restart_under_one_worker(tmp_path, env, start_worker, db_engine, restart)
    print("chaos: ten redis restarts, one worker:", result)


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_one_worker_survives_ten_rabbitmq_restarts_without_a_supervisor(
    tmp_path: Path, chaos_env: dict, start_worker, db_engine: Engine
) -> None:
    from tests.conftest import RABBITMQ_URL

    env = {**chaos_env, "DEEPBATCH_BROKER_URL": RABBITMQ_URL}
    result = restart_under_one_worker(tmp_path, env, start_worker, db_engine, restart_rabbitmq)
    print("chaos: ten rabbitmq restarts, one worker:", result)
