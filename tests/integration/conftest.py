"""Fixtures of the integration tests that serve the HTTP API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.api_server import Server


@pytest.fixture
def api_env(service_env: dict, tmp_path: Path) -> dict:
    return {**service_env, "DEEPBATCH_FILES_DIR": str(tmp_path / "files")}


@pytest.fixture
def start_server(api_env: dict, tmp_path: Path) -> Iterator:
    servers: list[Server] = []

    def start(**overrides: str) -> Server:
        server = Server({**api_env, **overrides}, tmp_path / f"serve-{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
