"""A worker's Prometheus endpoint, scraped after a real job: its counters agree with Postgres."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from tests.conftest import deepbatch, wait_until

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_metrics_count_what_the_database_holds(tmp_path: Path, service_env: dict, start_worker,
                                               db_engine: Engine) -> None:
    port = free_port()
    worker = start_worker(DEEPBATCH_METRICS_PORT=str(port))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"n{n}", "max_tokens": 3}) + "\n" for n in range(25)))
    job_id = deepbatch("submit", str(prompts), env=service_env).stdout.strip()

    def succeeded() -> int:
        with db_engine.connect() as connection:
            return connection.execute(text("SELECT succeeded FROM job_progress WHERE job_id = :j"),
                                      {"j": job_id}).scalar_one()

    wait_until(lambda: succeeded() == 25, timeout=120, message=f"the job; log:\n{worker.log_text()[-2000:]}")
    with db_engine.connect() as connection:
        tokens = connection.execute(text("SELECT sum(completion_tokens) FROM results WHERE job_id = :j"),
                                    {"j": job_id}).scalar_one()
    samples = scrape(port)
    assert samples['deepbatch_requests_total{"outcome": "succeeded"}'] == 25
    assert samples["deepbatch_generated_tokens_total{}"] == tokens
    assert samples["deepbatch_request_latency_seconds_count{}"] == 25
    assert samples["deepbatch_queue_wait_seconds_count{}"] == 25
    assert samples["deepbatch_requests_in_flight{}"] == 0
    assert "deepbatch_engine_batch_size{}" in samples and "deepbatch_retries_total{}" in samples
