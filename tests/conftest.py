"""Shared fixtures: a fresh PostgreSQL database per test session, broker URLs, worker processes.

Integration tests run against the real services: PostgreSQL (TEST_POSTGRES_URL, default the local
server), Redis (TEST_REDIS_URL) and RabbitMQ (TEST_RABBITMQ_URL). Each session creates its own
database and each test its own queue, so runs never see each other's rows or messages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

# Without a GPU, Triton kernels run under Triton's interpreter (tests/engine/test_paged_kernel.py). Triton
# reads this when it is first imported, which importing transformers already does: so it is set first.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text

from schema.migrate import upgrade

POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
BROKER_URLS = {"redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}
REPO_ROOT = Path(__file__).resolve().parents[1]


def database_url(name: str) -> str:
    return POSTGRES_URL.rsplit("/", 1)[0] + "/" + name


@contextmanager
def new_database() -> Iterator[str]:
    """A new, empty database on the real PostgreSQL server, dropped afterwards."""
    name = f"deepbatch_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(name)
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def empty_database_url() -> Iterator[str]:
    with new_database() as url:
        yield url


@pytest.fixture
def scratch_database_url() -> Iterator[str]:
    """A migrated database of the test's own, for tests that tamper with it or need it empty."""
    with new_database() as url:
        upgrade(sqlalchemy_url(url))
        yield url


@pytest.fixture(scope="session")
def migrated_database_url(empty_database_url: str) -> str:
    upgrade(sqlalchemy_url(empty_database_url))
    return empty_database_url


def sqlalchemy_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(scope="session")
def db_engine(migrated_database_url: str) -> Engine:
    return create_engine(sqlalchemy_url(migrated_database_url))


@pytest.fixture(params=sorted(BROKER_URLS))
def broker_url(request: pytest.FixtureRequest) -> str:
    return BROKER_URLS[request.param]


@pytest.fixture
def queue_name() -> str:
    return f"deepbatch-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def service_env(migrated_database_url: str, broker_url: str, queue_name: str, tmp_path: Path) -> dict[str, str]:
    """The environment a worker or CLI process of this test runs with."""
    return {
        **os.environ,
        "DEEPBATCH_DATABASE_URL": migrated_database_url,
        "DEEPBATCH_BROKER_URL": broker_url,
        "DEEPBATCH_QUEUE_NAME": queue_name,
        "DEEPBATCH_DATA_DIR": str(tmp_path / "data"),
        "DEEPBATCH_MAX_BATCH_SIZE": "16",
        "DEEPBATCH_DEFAULT_MAX_TOKENS": "4",
        "DEEPBATCH_METRICS_PORT": "0",
        "PYTHONUNBUFFERED": "1",
    }


def deepbatch(*args: str, env: dict[str, str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `deepbatch` command as a user would, in a child process."""
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=check, cwd=REPO_ROOT)


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, arguments: tuple[str, ...] = ()):
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--loglevel", "INFO",
                                         *arguments],
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_worker(service_env: dict[str, str], tmp_path: Path) -> Iterator:
    workers: list[WorkerProcess] = []

    def start(*arguments: str, **overrides: str) -> WorkerProcess:
        """A `deepbatch worker` with these command-line arguments and environment overrides."""
        worker = WorkerProcess({**service_env, **overrides}, tmp_path / f"worker-{len(workers)}.log", arguments)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def job_progress(db_engine: Engine, job_id: str) -> dict:
    """The job's row of the job_progress view, as any SQL client would poll it."""
    with db_engine.connect() as connection:
        return dict(connection.execute(text("SELECT * FROM job_progress WHERE job_id = :j"), {"j": job_id})
                    .mappings().one())


def wait_until(predicate, timeout: float, interval: float = 0.5, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


SCREENSHOTS = REPO_ROOT / "test-output"  # what the browser tests saw


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.fail("headless Chromium is needed: apt-get install chromium chromium-driver "
                    "(tests/prepare-machine does)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    yield driver
    driver.quit()
