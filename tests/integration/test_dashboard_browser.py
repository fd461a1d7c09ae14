"""The job dashboard in headless Chromium: a running job is visible, its progress advances, its cancel
button works, and nothing is shown without a key. Another site's page can neither cancel a job through the
browser's credentials (CSRF) nor frame the dashboard. Screenshots go to test-output/ and are checked."""

from __future__ import annotations

import base64
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from selenium.common.exceptions import WebDriverException

from tests.conftest import SCREENSHOTS, wait_until
from tests.integration.api_server import created_key, free_port, write_batch_file

pytestmark = pytest.mark.integration

WINDOW_WIDTH = 1400  # the browser fixture's --window-size (the page's height is the window's less its frame)


def finished_of(browser, batch_id: str) -> int:
    """The finished count the dashboard shows in the job's row ("12/400"); -1 while the page reloads."""
    try:
        text = browser.find_element("id", batch_id).find_element("class name", "done").text
    except WebDriverException:
        return -1
    match = re.search(r"(\d+)/\d+", text)
    return int(match.group(1)) if match else -1


def status_of(browser, batch_id: str) -> str:
    try:
        return browser.find_element("id", batch_id).find_element("class name", "status").text
    except WebDriverException:  # the page is reloading
        return ""


def screenshot(browser, name: str) -> Path:
    """Save the page and check the file is a PNG of the browser's window."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / name
    browser.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert width == WINDOW_WIDTH and height > 500 and len(data) > 10_000, (path, width, height, len(data))
    return path


@contextmanager
def foreign_site(pages: dict[str, str]) -> Iterator[str]:
    """Another site (http://localhost:PORT, where the dashboard is http://127.0.0.1:...) serving `pages`."""
    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://localhost:{server.server_port}"
    finally:
        server.shutdown()


def refuses_foreign_pages(browser, dashboard_url: str, batch_id: str) -> None:
    """A foreign page that posts the dashboard's cancel form (the browser adds the key's credentials, as
    it would once the user logged in) is refused, and one that frames the dashboard shows nothing of it."""
    pages = {"/cancel.html": f'<form method="post" action="{dashboard_url}/dashboard/batches/{batch_id}/cancel">'
                             '</form><script>document.forms[0].submit()</script>',
             "/frame.html": f'<h1>foreign</h1><iframe id="framed" src="{dashboard_url}/"></iframe>'}
    with foreign_site(pages) as site:
        browser.get(site + "/cancel.html")
        wait_until(lambda: browser.current_url.startswith(dashboard_url), timeout=30, message="the form to post")
        assert "cross_origin_request" in browser.page_source, browser.page_source[:500]
        browser.get(site + "/frame.html")
        browser.switch_to.frame(browser.find_element("id", "framed"))
        framed = browser.page_source
        browser.switch_to.default_content()
        assert "DeepBatch jobs" not in framed and batch_id not in framed, framed[:500]


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_dashboard_shows_live_progress_and_cancels(tmp_path: Path, api_env: dict, start_server, start_worker,
                                                   browser) -> None:
    server = start_server()
    _, secret = created_key(api_env, "dashboard")
    assert httpx.get(server.url + "/").status_code == 401
    assert httpx.get(server.url + "/").headers["www-authenticate"].startswith("Basic")

    client = server.client(secret)
    uploaded = client.files.create(file=write_batch_file(tmp_path / "p.jsonl", 400, broken_at=3).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    start_worker(DEEPBATCH_WORKER_THREADS="1", DEEPBATCH_MAX_BATCH_SIZE="2", DEEPBATCH_SLICE_SIZE="4")  # slow

    browser.execute_cdp_cmd("Network.enable", {})
    token = "Basic " + base64.b64encode(f"key:{secret}".encode()).decode()
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": token}})
    browser.get(server.url + "/")
    wait_until(lambda: batch.id in browser.page_source and finished_of(browser, batch.id) > 0, timeout=120,
               interval=1, message="the job on the dashboard with some requests finished")
    first = finished_of(browser, batch.id)
    screenshot(browser, "dashboard-running-1.png")
    wait_until(lambda: finished_of(browser, batch.id) > first, timeout=120, interval=1,
               message="the progress to advance (the page reloads itself)")
    screenshot(browser, "dashboard-running-2.png")
    assert status_of(browser, batch.id) == "in_progress"
    failures = browser.find_element("id", batch.id).find_element("class name", "failures").text
    assert "line 3: invalid_json" in failures, failures

    answer = httpx.get(server.url + "/", auth=("key", secret))
    assert answer.headers["x-frame-options"] == "DENY", answer.headers
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], answer.headers
    refuses_foreign_pages(browser, server.url, batch.id)
    assert client.batches.retrieve(batch.id).status == "in_progress"  # the foreign form cancelled nothing
    browser.get(server.url + "/")
    wait_until(lambda: status_of(browser, batch.id) == "in_progress", timeout=30, interval=1,
               message="the dashboard again")

    browser.find_element("id", batch.id).find_element("css selector", "button").click()
    wait_until(lambda: status_of(browser, batch.id) in ("cancelling", "cancelled"), timeout=60, interval=1,
               message="the job to show as cancelling")
    wait_until(lambda: status_of(browser, batch.id) == "cancelled", timeout=120, interval=1,
               message="the cancelled job to finish its running requests")
    screenshot(browser, "dashboard-cancelled.png")
    row = browser.find_element("id", batch.id)
    assert row.find_element("link text", "results") and row.find_element("link text", "errors")
    assert client.batches.retrieve(batch.id).status == "cancelled"
