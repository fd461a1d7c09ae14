"""`deepbatch worker` and `deepbatch run` stop at once on a bad setting, and `run` leaves nothing running
on any way out: normal end, a worker that dies, Ctrl-C to its process group, SIGTERM, and SIGKILL (then
the next run stops the leftovers and says so). Real processes throughout, with embedded services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, deepbatch, wait_until

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("setting", "value"), [
    ("DEEPBATCH_MODEL", "/nonexistent/model"), ("DEEPBATCH_DTYPE", "float7"), ("DEEPBATCH_DEVICE", "cuda:7"),
    ("DEEPBATCH_ENGINE", "no_such_module:factory"),
])
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_worker_exits_at_once_naming_the_bad_setting(service_env: dict, setting: str, value: str) -> None:
    started = time.monotonic()
    worker = deepbatch("worker", env={**service_env, setting: value}, timeout=60, check=False)
    assert worker.returncode == 1 and f"{setting}={value!r}" in worker.stderr, worker.stderr[-2000:]
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_worker_whose_engine_cannot_start_exits_saying_why(service_env: dict) -> None:
    worker = deepbatch("worker", env={**service_env, "DEEPBATCH_ENGINE": "tests.chaos.engines:broken_at_start"},
                       timeout=60, check=False)
    assert worker.returncode == 1 and "cannot start its engine" in worker.stderr
    assert "no usable GPU (Xid 79)" in worker.stderr


def run_env(tmp_path: Path, **settings: str) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "BROKER_URL", "DEEPBATCH_DATABASE_URL", "DEEPBATCH_BROKER_URL")}
    # Small slices: a stopping worker finishes the slices in hand first, and these tests stop workers.
    return {**env, "DEEPBATCH_DATA_DIR": str(tmp_path / "data"), "DEEPBATCH_METRICS_PORT": "0",
            "DEEPBATCH_SLICE_SIZE": "16", **settings}


def write_prompts(path: Path, count: int, max_tokens: int = 2, poison_at: int | None = None) -> Path:
    path.write_text("".join(json.dumps({"prompt": "KILL_WORKER now" if n == poison_at else f"prompt {n}",
                                        "max_tokens": max_tokens}) + "\n" for n in range(count)))
    return path


def processes_of_run(data_dir: Path) -> list[str]:
    """Every process a run in `data_dir` may have left: those with it in their environment (the worker,
    PostgreSQL's), the embedded PostgreSQL's postmaster and the embedded Redis."""
    found = []
    marker = f"DEEPBATCH_DATA_DIR={data_dir}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(f"{entry.name}: {(entry / 'cmdline').read_bytes()[:80]!r}")
            except OSError:
                continue
    for pid_file in (data_dir / "postgres" / "postmaster.pid", ):
        if pid_file.is_file() and Path(f"/proc/{pid_file.read_text().split()[0]}").exists():
            found.append(f"postmaster {pid_file.read_text().split()[0]}")
    settings = data_dir / "redis.db.settings"
    if settings.is_file():
        redis_pid = Path(json.loads(settings.read_text())["pidfile"])
        if redis_pid.is_file() and Path(f"/proc/{redis_pid.read_text().strip()}").exists():
            found.append(f"redis {redis_pid.read_text().strip()}")
    return found


def assert_nothing_left(data_dir: Path) -> None:
    wait_until(lambda: not processes_of_run(data_dir), timeout=60,
               message=f"every process of the run to exit: {processes_of_run(data_dir)}")


def start_run(tmp_path: Path, env: dict, prompts: Path) -> subprocess.Popen:
    """`deepbatch run` in a process group of its own, as a shell runs a command in a terminal."""
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "run", str(prompts), "-o", str(tmp_path / "o.jsonl")],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def under_way(tmp_path: Path, run: subprocess.Popen) -> None:
    """Wait until the run has started its worker and the worker has begun; the job is far from done."""
    wait_until(lambda: (tmp_path / "data" / "worker.pid").is_file() or run.poll() is not None, timeout=180,
               message="the run to start its worker")
    time.sleep(5)
    assert run.poll() is None, f"the run ended early: {run.communicate()[1][-3000:]}"


def test_run_with_a_bad_model_fails_in_seconds_and_starts_nothing(tmp_path: Path) -> None:
    env = run_env(tmp_path, DEEPBATCH_MODEL="/nonexistent/model")
    started = time.monotonic()
    run = deepbatch("run", str(write_prompts(tmp_path / "p.jsonl", 3)), env=env, timeout=120, check=False)
    assert run.returncode == 1 and "DEEPBATCH_MODEL='/nonexistent/model'" in run.stderr, run.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert_nothing_left(tmp_path / "data")


def test_run_stops_when_its_worker_dies_and_leaves_nothing(tmp_path: Path) -> None:
    env = run_env(tmp_path, DEEPBATCH_ENGINE="tests.chaos.engines:poison_engine")
    run = deepbatch("run", str(write_prompts(tmp_path / "p.jsonl", 5, poison_at=2)), env=env, timeout=300,
                    check=False)
    assert run.returncode == 1 and "the worker exited with code 137" in run.stderr, run.stderr[-3000:]
    assert "the end of its log" in run.stderr
    assert_nothing_left(tmp_path / "data")


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_run_interrupted_stops_its_worker_and_services(tmp_path: Path, signum: int, exit_code: int) -> None:
    env = run_env(tmp_path)
    run = start_run(tmp_path, env, write_prompts(tmp_path / "p.jsonl", 5000, max_tokens=16))
    under_way(tmp_path, run)
    if signum == signal.SIGINT:
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    else:
        run.send_signal(signum)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == exit_code, stderr[-3000:]
    assert "stop" in stderr
    assert_nothing_left(tmp_path / "data")


def test_a_killed_run_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    env = run_env(tmp_path)
    run = start_run(tmp_path, env, write_prompts(tmp_path / "p.jsonl", 5000, max_tokens=16))
    under_way(tmp_path, run)
    os.kill(run.pid, signal.SIGKILL)
    run.communicate(timeout=30)
    # The worker dies with its parent (PR_SET_PDEATHSIG); the embedded servers are the next run's to stop.
    # The killed run's job (of another file) is reported and waits on its file's own queue: the next run
    # does not work through its 5,000 requests first.
    next_run = deepbatch("run", str(write_prompts(tmp_path / "q.jsonl", 3)), "-o", str(tmp_path / "q.out.jsonl"),
                         env=env, timeout=300, check=False)
    assert next_run.returncode == 0, next_run.stderr[-3000:]
    assert "stopped what an earlier `deepbatch run` left running" in next_run.stderr
    assert "PostgreSQL (pid" in next_run.stderr
    assert "p.jsonl is unfinished" in " ".join(next_run.stderr.split()), next_run.stderr
    assert_nothing_left(tmp_path / "data")
