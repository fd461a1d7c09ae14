"""Requests as an attacker sends them: raw bytes where a client library would refuse (NUL, unpaired
surrogates in URLs, JSON bodies and multipart filenames), and the checks that every answer is a 4xx in
OpenAI's error shape and that nothing is left on disk without a row."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from producer.api.keys import create_key
from tests.conftest import REDIS_URL
from tests.integration.api_server import Server

BOUNDARY = "deepbatch-hostile-boundary"
# Small limits, so that the tests reach them with small files; a rate no test reaches.
HOSTILE_LIMITS = {"DEEPBATCH_API_MAX_FILE_LINES": "5", "DEEPBATCH_API_MAX_FILE_BYTES": "4000",
                  "DEEPBATCH_API_MAX_QUEUED_LINES": "10", "DEEPBATCH_API_REQUESTS_PER_S": "10000",
                  "DEEPBATCH_API_BURST": "10000"}


@pytest.fixture(scope="module")
def hostile_server(migrated_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `deepbatch serve` (HOSTILE_LIMITS, Redis) for a module's tests, each with keys of its own: a
    server costs seconds to start. No worker: batches stay queued."""
    directory = tmp_path_factory.mktemp("hostile")
    env = {**os.environ, "DEEPBATCH_DATABASE_URL": migrated_database_url, "DEEPBATCH_BROKER_URL": REDIS_URL,
           "DEEPBATCH_QUEUE_NAME": f"deepbatch-test-{uuid.uuid4().hex[:8]}", "DEEPBATCH_DATA_DIR": str(directory),
           "DEEPBATCH_FILES_DIR": str(directory / "files"), "DEEPBATCH_METRICS_PORT": "0", **HOSTILE_LIMITS}
    server = Server(env, directory / "serve.log")
    yield server
    server.stop()


def files_dir(server: Server) -> Path:
    return Path(server.env["DEEPBATCH_FILES_DIR"])


def encoded(value: str) -> str:
    """`value` percent-encoded for a URL, an unpaired surrogate as the UTF-8 bytes one would have."""
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def new_key(db_engine: Engine, name: str) -> tuple[str, str]:
    """A new key's id and secret, made in this process (`deepbatch keys create` costs a process start)."""
    with Session(db_engine) as session, session.begin():
        key, secret = create_key(session, name, actor="tests")
        return key.id, secret


class HostileClient:
    """httpx with the key's bearer token, sending what it is given as it is."""

    def __init__(self, base_url: str, secret: str):
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)

    def get(self, path: str, **query: str) -> httpx.Response:
        return self.http.get(path + query_string(query))

    def post_json(self, path: str, body: Any) -> httpx.Response:
        # json.dumps escapes NUL and lone surrogates (\u0000, \ud800): valid JSON that decodes back to them.
        return self.http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})

    def upload(self, filename: str, content: bytes, purpose: str = "batch") -> httpx.Response:
        return self.http.post("/v1/files", content=multipart_body(filename, content, purpose),
                              headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})

    def request(self, method: str, path: str) -> httpx.Response:
        return self.http.request(method, path)


def query_string(query: dict[str, str]) -> str:
    return ("?" + "&".join(f"{encoded(name)}={encoded(value)}" for name, value in query.items())) if query else ""


def multipart_body(filename: str, content: bytes, purpose: str) -> bytes:
    """A form with `purpose` and a file part named `filename`, its bytes as they are (NUL included)."""
    def raw(value: str) -> bytes:
        return value.encode("utf-8", "surrogatepass")

    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n".encode() + raw(purpose)
            + f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"".encode()
            + raw(filename) + b"\"\r\nContent-Type: application/jsonl\r\n\r\n" + content
            + f"\r\n--{BOUNDARY}--\r\n".encode())


def openai_error(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """The error of a refused request, checked to be a 4xx (`status` if given) in OpenAI's shape."""
    assert 400 <= response.status_code < 500 and response.status_code == (status or response.status_code), \
        (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"], error
    return error


def orphan_files(files_dir: Path, db_engine: Engine) -> set[str]:
    """Files on disk that no row of `files` names (partial uploads included): nothing could delete them."""
    on_disk = {path.name for path in files_dir.iterdir()} if files_dir.exists() else set()
    with db_engine.connect() as connection:
        known = set(connection.execute(text("SELECT id FROM files WHERE id = ANY(:ids)"),
                                       {"ids": sorted(on_disk)}).scalars())
    return on_disk - known
