"""Flower in a real browser (headless Chromium): refused without credentials; a login sees the running
worker and a non-empty queue, for each broker. Screenshots land in test-output/."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, SCREENSHOTS, deepbatch, wait_until

pytestmark = pytest.mark.integration

USER, PASSWORD = "operator", "correct-horse"


def status_of(url: str, authorization: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        return urllib.request.urlopen(request, timeout=5).status
    except urllib.error.HTTPError as error:
        return error.code
    except urllib.error.URLError:
        return 0


def queued_messages(browser, queue_name: str) -> int | None:
    """The message count Flower's broker page shows for the queue, once it shows a number."""
    for row in browser.find_elements("css selector", "tr"):
        cells = row.text.split()
        if cells and cells[0] == queue_name and len(cells) > 1 and cells[1].isdigit():
            return int(cells[1])
    return None




@pytest.fixture
def flower_env(service_env: dict, broker_url: str) -> dict:
    env = {**service_env, "DEEPBATCH_FLOWER_USER": USER, "DEEPBATCH_FLOWER_PASSWORD": PASSWORD,
           "DEEPBATCH_FLOWER_PORT": "5566"}
    if broker_url.startswith("amqp://"):  # queue lengths come from the management API
        env["DEEPBATCH_FLOWER_BROKER_API"] = MANAGEMENT_API
        require_management_api()
    return env


MANAGEMENT_API = "http://guest:guest@127.0.0.1:15672/api/"


def require_management_api() -> None:
    """Fail at once, saying what to do, rather than time out waiting for queue counts that cannot come."""
    request = urllib.request.Request(MANAGEMENT_API.replace("guest:guest@", "") + "overview")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    try:
        urllib.request.urlopen(request, timeout=5).close()
    except OSError as error:
        pytest.fail(f"RabbitMQ's management API does not answer at 127.0.0.1:15672 ({error}); Flower reads "
                    "queue lengths from it: run `rabbitmq-plugins enable rabbitmq_management` "
                    "(tests/prepare-machine does)")


def test_flower_requires_a_login_and_shows_workers_and_queue(tmp_path: Path, flower_env: dict, start_worker,
                                                             broker_url: str, queue_name: str, browser) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"n{n}", "max_tokens": 32}) + "\n" for n in range(400)))
    deepbatch("submit", str(prompts), env={**flower_env, "DEEPBATCH_SLICE_SIZE": "4"})  # 100 slices
    worker = start_worker(DEEPBATCH_WORKER_THREADS="1", DEEPBATCH_MAX_BATCH_SIZE="1")  # a slow drain
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen([sys.executable, "-m", "producer.cli", "flower"], env=flower_env, cwd=REPO_ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        base = "http://127.0.0.1:5566"
        token = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        wait_until(lambda: status_of(base + "/", token) == 200, timeout=60, message="Flower to serve")
        assert status_of(base + "/") == 401
        assert status_of(base + "/", "Basic " + base64.b64encode(b"operator:wrong").decode()) == 401

        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": token}})
        browser.get(base + "/workers")
        worker_name = f"deepbatch-{worker.process.pid}@"
        wait_until(lambda: worker_name in browser.page_source or bool(browser.refresh()), timeout=60,
                   interval=2, message=f"the worker {worker_name} on Flower's workers page")
        SCREENSHOTS.mkdir(exist_ok=True)
        kind = "rabbitmq" if broker_url.startswith("amqp") else "redis"
        browser.save_screenshot(str(SCREENSHOTS / f"flower-workers-{kind}.png"))

        browser.get(base + "/broker")
        # RabbitMQ's management API fills in a new queue's counts a few seconds late ("—" until then).
        wait_until(lambda: queued_messages(browser, queue_name) is not None or bool(browser.refresh()),
                   timeout=90, interval=2, message=f"the queue {queue_name} and its count on Flower's broker page")
        messages = queued_messages(browser, queue_name)
        assert messages > 0
        browser.save_screenshot(str(SCREENSHOTS / f"flower-broker-{kind}.png"))
        print(f"screenshots: {SCREENSHOTS}/flower-*-{kind}.png; queue {queue_name} holds {messages} messages")
    finally:
        flower.terminate()
        flower.wait(20)
        log.close()


def test_flower_refuses_to_serve_without_credentials(service_env: dict) -> None:
    env = {key: value for key, value in service_env.items() if not key.startswith("DEEPBATCH_FLOWER_")}
    refused = deepbatch("flower", env=env, check=False, timeout=60)
    assert refused.returncode == 1
    assert "set DEEPBATCH_FLOWER_USER and DEEPBATCH_FLOWER_PASSWORD, or pass --no-auth" in refused.stderr
