"""What the commands say: `migrate` (the database alone, the migrations it applied), `jobs` (a table with
headers, failures and file names), `status` (model, rejected lines, cache hits), `serve` (its URL and an
access log), and an API batch's counts and usage as OpenAI's batch object has them."""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from tests.conftest import deepbatch, new_database, wait_until
from tests.integration.api_server import new_key, write_batch_file
from worker.transitions import Success, Transitions

pytestmark = pytest.mark.integration


def test_migrate_needs_only_the_database_and_names_what_it_applied() -> None:
    env = {key: value for key, value in os.environ.items()
           if key not in ("BROKER_URL", "DEEPBATCH_BROKER_URL", "DEEPBATCH_DATABASE_URL")}
    with new_database() as url:
        first = deepbatch("migrate", env={**env, "DATABASE_URL": url}, timeout=120)
        applied = re.findall(r"^applied (\d{4}): ", first.stderr, flags=re.MULTILINE)
        assert applied[:3] == ["0001", "0002", "0003"] and applied == sorted(applied), first.stderr
        assert f"applied {len(applied)} migrations; the database is at {applied[-1]}, the latest" in first.stderr
        again = deepbatch("migrate", env={**env, "DATABASE_URL": url}, timeout=120)
        assert "applied 0" not in again.stderr and not re.search(r"^applied \d{4}", again.stderr, re.MULTILINE)
        assert f"nothing to apply: the database is already at {applied[-1]}" in again.stderr, again.stderr
    missing = deepbatch("migrate", env={key: value for key, value in env.items() if key != "DATABASE_URL"},
                        check=False)
    assert missing.returncode == 1 and "DATABASE_URL must be set" in missing.stderr
    assert "BROKER_URL" not in missing.stderr


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_jobs_and_status_show_files_models_failures_and_cache_hits(tmp_path: Path, service_env: dict) -> None:
    prompts = tmp_path / "questions.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {n}"}) + "\n" for n in range(5)) + "{oops\n")
    job_id = deepbatch("submit", str(prompts), env=service_env).stdout.strip()

    env = {**service_env}
    listed = deepbatch("jobs", env=env).stdout
    header = next(line for line in listed.splitlines() if "status" in line)
    for column in ("job", "status", "file", "model", "done", "succeeded", "failed", "cancelled", "created"):
        assert column in header, header
    row = next(line for line in listed.splitlines() if job_id in line)
    cells = [cell.strip() for cell in re.split(r"[│|┃]", row) if cell.strip()]
    assert cells[1:7] == ["in_progress", str(prompts), "tiny-deepseek-v3", "1/6", "0", "1"], cells

    shown = deepbatch("status", job_id, env=env).stdout
    assert re.search(r"model\s*│\s*tiny-deepseek-v3", shown), shown
    assert re.search(r"rejected at submission\s*│\s*1", shown) and re.search(r"cache hits\s*│\s*0", shown), shown
    as_json = json.loads(deepbatch("status", job_id, "--json", env=env).stdout)
    assert as_json["rejected_lines"] == 1 and as_json["cache_hits"] == 0 and as_json["model"] == "tiny-deepseek-v3"
    deepbatch("cancel", job_id, env=env)


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_a_cancelled_batch_counts_every_request_and_has_usage(tmp_path: Path, api_env: dict, start_server,
                                                              db_engine: Engine, queue_name: str) -> None:
    server = start_server()
    key = new_key(api_env)
    client = server.client(key)
    uploaded = client.files.create(file=write_batch_file(tmp_path / "questions.jsonl", 20).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    worker = Transitions(sessionmaker(db_engine), "tests:1", timedelta(seconds=60), queue_name)  # as a worker would
    claims = worker.claim_next(3)
    worker.record([Success(claim, "an answer", "stop", 7, 2) for claim in claims], [], "tiny-deepseek-v3")

    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled"
    counts = cancelled.request_counts
    assert (counts.total, counts.completed, counts.failed) == (20, 3, 17)  # 17 never ran: batch_cancelled
    assert cancelled.usage.input_tokens == 21 and cancelled.usage.output_tokens == 6
    assert cancelled.usage.total_tokens == 27
    assert len(client.files.content(cancelled.error_file_id).text.splitlines()) == 17

    page = httpx.get(server.url + "/", auth=("me", key), timeout=10).text
    assert "questions.jsonl" in page and uploaded.id not in page.split(batch.id, 1)[1].split("</tr>", 1)[0]
    listed = deepbatch("jobs", env={**api_env}).stdout
    assert "questions.jsonl" in next(line for line in listed.splitlines() if batch.id in line)
    assert str(api_env["DEEPBATCH_FILES_DIR"]) not in listed


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_serve_prints_its_url_and_writes_an_access_log(api_env: dict, start_server, tmp_path: Path) -> None:
    server = start_server(DEEPBATCH_API_AUTH="false")
    assert httpx.get(server.url + "/v1/batches?limit=3", timeout=10).status_code == 200
    wait_until(lambda: "GET /v1/batches?limit=3" in server.log_path.read_text(), timeout=10, message="the access line")
    log = server.log_path.read_text()
    assert f"serving the Batch API at {server.url}/v1 and the dashboard at {server.url}/" in log, log
    assert re.search(r'127\.0\.0\.1:\d+ "GET /v1/batches\?limit=3 HTTP/1\.1" 200', log), log
