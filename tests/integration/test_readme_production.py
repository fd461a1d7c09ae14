"""The README's Production section works as written: its first block, pasted into a fresh shell after the
quick start's install (the repository's `.venv`; here the test's own environment stands in for it), with
the two URLs pointed at this machine's PostgreSQL and Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, REPO_ROOT, new_database

pytestmark = pytest.mark.integration


def production_block() -> str:
    section = (REPO_ROOT / "README.md").read_text().split("## Production use", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_the_production_section_runs_in_a_fresh_shell(tmp_path: Path, queue_name: str) -> None:
    block = production_block()
    assert block.startswith("source .venv/bin/activate")
    # The quick start's checkout: its .venv (the test's environment, not installed again) and its examples.
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    with new_database() as database_url:
        script = re.sub(r"^export DATABASE_URL=\S+", f"export DATABASE_URL={database_url}", block, flags=re.MULTILINE)
        script = re.sub(r"^export BROKER_URL=\S+", f"export BROKER_URL={REDIS_URL}", script, flags=re.MULTILINE)
        assert script.count(database_url) == 1 and script.count(REDIS_URL) == 1
        # A fresh login shell's environment: no virtual environment on the PATH, nothing of DeepBatch set.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
               "DEEPBATCH_QUEUE_NAME": queue_name, "DEEPBATCH_METRICS_PORT": "0",
               "DEEPBATCH_DATA_DIR": str(tmp_path / "data"), "DEEPBATCH_DEFAULT_MAX_TOKENS": "4",
               **{key: os.environ[key] for key in ("TRITON_INTERPRET",) if key in os.environ}}
        ran = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=400)
    assert ran.returncode == 0, ran.stderr[-4000:]
    assert "applied 0001" in ran.stderr and "results → out.jsonl" in ran.stderr, ran.stderr[-3000:]
    answered = [*(tmp_path / "out.jsonl").read_text().splitlines(), *(tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert len(answered) == len((REPO_ROOT / "examples" / "prompts.jsonl").read_text().splitlines())  # every line
    assert re.search(r"completed", ran.stdout), ran.stdout
