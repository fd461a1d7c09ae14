"""`deepbatch serve` processes for the API and dashboard tests, and what they need: keys and batch files."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from tests.conftest import REPO_ROOT, deepbatch, wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "producer.cli", "serve", "--port", str(self.port)],
                                            env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.answers, timeout=60, message=f"deepbatch serve on {self.url}")

    def answers(self) -> bool:
        assert self.process.poll() is None, self.log_path.read_text()
        try:
            return httpx.get(self.url + "/v1/batches", timeout=2).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    def client(self, key: str | None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def new_key(env: dict, name: str = "tests") -> str:
    return created_key(env, name)[1]


def created_key(env: dict, name: str) -> tuple[str, str]:
    """A new key's id and secret, from `deepbatch keys create` (the secret alone on stdout)."""
    created = deepbatch("keys", "create", name, env=env)
    return re.search(r"created (key_[0-9a-f]+)", created.stderr).group(1), created.stdout.strip()


def write_batch_file(path: Path, count: int, broken_at: int | None = None) -> Path:
    with path.open("w") as stream:
        for n in range(1, count + 1):
            if n == broken_at:
                stream.write('{"custom_id": "broken", "method": "POST"\n')
                continue
            stream.write(json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": {"model": "tiny-deepseek-v3", "max_tokens": 4,
                                              "messages": [{"role": "user", "content": f"question {n}"}]}}) + "\n")
    return path
