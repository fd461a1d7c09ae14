"""The dashboard's page, served in this process: what a job's row shows, its cancel and download routes, and
how many SQL statements a refresh costs — the page reloads every two seconds for every open browser, so
the count must not grow with the number of jobs shown."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from producer.api.app import create_app
from producer.api.keys import create_key
from schema.settings import Settings
from tests.conftest import REDIS_URL
from tests.integration.api_server import write_batch_file

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
# Per refresh: the key's lookup and its rate-limit draw, then the page's jobs and its workers.
STATEMENTS_PER_REFRESH = 4


@pytest.fixture
def settings(migrated_database_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=migrated_database_url, broker_url=REDIS_URL, data_dir=tmp_path / "data",
                    queue_name=f"deepbatch-test-{uuid.uuid4().hex[:8]}", files_dir=tmp_path / "files",
                    api_requests_per_s=10_000, api_burst=10_000)


@pytest.fixture
def client(settings: Settings, db_engine: Engine) -> Iterator[TestClient]:
    """A client of an in-process server, signed in with a new key as a browser is (Basic auth)."""
    with Session(db_engine) as session, session.begin():
        _, secret = create_key(session, "dashboard", actor="tests")
    with TestClient(create_app(settings)) as test_client:
        test_client.auth = ("key", secret)
        yield test_client


@contextmanager
def counted_statements() -> Iterator[list[str]]:
    """The SQL statements this process runs meanwhile (the server's, as the test sends none)."""
    statements: list[str] = []

    def count(_connection, _cursor, statement, *_) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", count)


def create_batches(client: TestClient, path: Path, count: int) -> list[str]:
    """`count` batches of a 4-line file whose line 2 is broken; no worker runs them."""
    with write_batch_file(path, 4, broken_at=2).open("rb") as stream:
        file_id = client.post("/v1/files", files={"file": stream}, data={"purpose": "batch"}).json()["id"]
    return [client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT}).json()["id"]
            for _ in range(count)]


def refresh(client: TestClient, settings: Settings) -> tuple[str, int]:
    with counted_statements() as statements:
        page = client.get("/")
    assert page.status_code == 200, page.text
    return page.text, len(statements)


def test_a_refresh_is_one_query_whatever_the_number_of_jobs(tmp_path: Path, client: TestClient,
                                                          settings: Settings) -> None:
    _, empty = refresh(client, settings)
    batch_ids = create_batches(client, tmp_path / "a.jsonl", 2)
    assert client.post(f"/v1/batches/{batch_ids[0]}/cancel").status_code == 200
    page, few = refresh(client, settings)
    assert all(f'id="{batch_id}"' in page for batch_id in batch_ids)
    batch_ids += create_batches(client, tmp_path / "b.jsonl", 6)
    page, many = refresh(client, settings)
    assert all(f'id="{batch_id}"' in page for batch_id in batch_ids)
    assert empty == few == many == STATEMENTS_PER_REFRESH, (empty, few, many)


def test_rows_show_progress_failures_and_the_actions_a_job_allows(tmp_path: Path, client: TestClient,
                                                                 settings: Settings) -> None:
    running, cancelled = create_batches(client, tmp_path / "p.jsonl", 2)
    answer = client.post(f"/dashboard/batches/{cancelled}/cancel", follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/")
    page, _ = refresh(client, settings)
    running_row = page.split(f'<tr id="{running}">')[1].split("</tr>")[0]
    cancelled_row = page.split(f'<tr id="{cancelled}">')[1].split("</tr>")[0]

    assert '<td class="status">in_progress</td>' in running_row
    assert '<span class="done">1/4</span>' in running_row and "queued 3 · failed 1" in running_row
    assert "line 2: <code>invalid_json</code>" in running_row
    assert f'action="/dashboard/batches/{running}/cancel"' in running_row and "results" not in running_row

    assert '<td class="status">cancelled</td>' in cancelled_row and "<form" not in cancelled_row
    stem = cancelled.removeprefix("batch_")
    assert f'href="/dashboard/files/file-{stem}-output">results</a>' in cancelled_row
    assert f'href="/dashboard/files/file-{stem}-errors">errors</a>' in cancelled_row
    errors = client.get(f"/dashboard/files/file-{stem}-errors")
    assert errors.status_code == 200 and errors.headers["content-type"] == "application/jsonl"
    assert [line.count('"batch_cancelled"') for line in errors.text.splitlines()].count(1) == 3

    assert client.get(f"/dashboard/files/file-{running.removeprefix('batch_')}-output").status_code == 404
    assert client.get("/dashboard/files/file-nothing").status_code == 404
    assert client.post("/dashboard/batches/batch_nothing/cancel", follow_redirects=False).status_code == 303


def test_the_dashboard_shows_only_the_callers_jobs(tmp_path: Path, client: TestClient, settings: Settings,
                                                  db_engine: Engine) -> None:
    [batch_id] = create_batches(client, tmp_path / "p.jsonl", 1)
    with Session(db_engine) as session, session.begin():
        _, other_secret = create_key(session, "other", actor="tests")
    other = TestClient(client.app)
    other.auth = ("key", other_secret)
    assert batch_id not in other.get("/").text
    assert other.post(f"/dashboard/batches/{batch_id}/cancel", follow_redirects=False).status_code == 303
    assert client.get(f"/v1/batches/{batch_id}").json()["status"] == "in_progress"  # the other key cancelled nothing
    stem = batch_id.removeprefix("batch_")
    assert client.post(f"/v1/batches/{batch_id}/cancel").json()["status"] == "cancelled"
    assert other.get(f"/dashboard/files/file-{stem}-errors").status_code == 404
