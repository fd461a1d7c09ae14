"""`deepbatch run` in a real terminal (tmux): it says it is loading the model until its worker is ready,
then shows a bar of the requests run (a rejected line apart); Ctrl-C mid-run writes the results finished so
far and says how to go on, and `run FILE --resume` finishes the same job with every line answered once."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")]

LINES = 400


class Terminal:
    """A tmux session of its own (its own server socket) running one shell script."""

    def __init__(self, tmp_path: Path):
        self.socket = f"deepbatch-test-{uuid.uuid4().hex[:8]}"
        self.screens: list[str] = []
        self.tmp_path = tmp_path

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def start(self, script: str) -> None:
        path = self.tmp_path / f"script-{len(self.screens)}.sh"
        path.write_text(script)
        self.tmux("new-session", "-d", "-s", "run", "-x", "200", "-y", "50", f"bash {shlex.quote(str(path))}")

    def screen(self) -> str:
        text = self.tmux("capture-pane", "-p", "-J", "-t", "run", "-S", "-200")
        self.screens.append(text)
        return text

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` on the screen (its lines joined: the terminal wraps long ones)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.search(pattern, " ".join(self.screen().split())):
                return match
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {pattern!r} on the screen:\n{self.screens[-1]}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def run_script(tmp_path: Path, prompts: Path, *options: str) -> str:
    """The command as a user types it, in a shell with nothing configured (embedded services)."""
    command = " ".join(shlex.quote(part) for part in
                       [sys.executable, "-m", "producer.cli", "run", str(prompts), "-o", "out.jsonl", *options])
    return (f"cd {shlex.quote(str(tmp_path))}\n"
            "unset DATABASE_URL BROKER_URL DEEPBATCH_DATABASE_URL DEEPBATCH_BROKER_URL DEEPBATCH_QUEUE_NAME\n"
            f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))} DEEPBATCH_DATA_DIR={shlex.quote(str(tmp_path / 'data'))}\n"
            "export DEEPBATCH_METRICS_PORT=0 DEEPBATCH_SLICE_SIZE=16 DEEPBATCH_WORKER_THREADS=2  # a stopping worker finishes the slices it took\n"
            f"{command}\necho \"EXIT=$?\"\nsleep 600\n")


@pytest.fixture
def terminal(tmp_path: Path):
    terminal = Terminal(tmp_path)
    yield terminal
    terminal.close()


def test_run_shows_loading_then_the_bar_and_an_interrupted_run_resumes(tmp_path: Path, terminal: Terminal) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"custom_id": f"q{n}", "prompt": f"prompt {n}", "max_tokens": 12, "temperature": 0})
             for n in range(1, LINES + 1)]
    lines.insert(4, "{broken")  # line 5: rejected at submission
    prompts.write_text("\n".join(lines) + "\n")

    terminal.start(run_script(tmp_path, prompts))
    terminal.wait_for(r"loading tiny-deepseek-v3 in the worker", timeout=120)
    terminal.wait_for(r"worker ready: tiny-deepseek-v3 loaded in", timeout=120)
    bar = terminal.wait_for(r"generating \(1 rejected line apart\).*?(\d+)/(\d+)", timeout=60)
    assert int(bar.group(2)) == LINES  # the rejected line is not a request run
    first_bars = [screen for screen in terminal.screens if "generating" in screen]
    assert all("loading tiny-deepseek-v3" not in screen.split("generating")[1] for screen in first_bars)
    done = terminal.wait_for(r"generating.*? (\d{2,})/%d" % LINES, timeout=120)
    assert int(done.group(1)) < LINES - 50, "the run finished too fast to be interrupted mid-way"
    terminal.tmux("send-keys", "-t", "run", "C-c")
    interrupted = terminal.wait_for(r"EXIT=(\d+)", timeout=120)
    screen = terminal.screens[-1]
    assert interrupted.group(1) == "130", screen
    said = re.search(r"interrupted:.*?job (batch_\w+) has (\d+) of (\d+) requests finished: (\d+) results → out\.jsonl",
                     " ".join(screen.split()))
    assert said, screen
    job_id, written = said.group(1), int(said.group(4))
    assert re.search(r"Go on with: deepbatch run \S*prompts\.jsonl --resume", " ".join(screen.split())), screen
    partial = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert 0 < len(partial) == written < LINES
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [line["error"]["line"] for line in errors] == [5]

    resumed = subprocess.run(["bash", "-c", run_script(tmp_path, prompts, "--resume").replace("sleep 600\n", "")],
                             capture_output=True, text=True, timeout=300)
    assert "EXIT=0" in resumed.stdout, resumed.stderr[-3000:]
    assert f"going on with job {job_id}" in resumed.stderr and "submitted" not in resumed.stderr, resumed.stderr
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    custom_ids = [line["custom_id"] for line in results]
    assert sorted(custom_ids) == sorted(f"q{n}" for n in range(1, LINES + 1))  # every line, once
    assert {line["id"] for line in partial} <= {line["id"] for line in results}  # the same requests, kept
    assert [json.loads(line)["error"]["line"] for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()] == [5]
    log = tmp_path / "data" / "worker.log"
    assert log.is_file() and (tmp_path / "data" / "worker.log.1").is_file()  # each run's worker log is its own
