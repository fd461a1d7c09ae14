"""Applies the Alembic migrations programmatically (`deepbatch migrate`, `deepbatch run`).

The migration scripts live in the top-level alembic/ folder; an installed wheel carries them under
`<prefix>/share/deepbatch/alembic`, so both a checkout and an install find them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]


def script_location() -> Path:
    candidates = [REPO_ROOT / "alembic", Path(sys.prefix) / "share" / "deepbatch" / "alembic"]
    for candidate in candidates:
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError(f"no Alembic scripts found in any of: {', '.join(map(str, candidates))}")


def alembic_config(sqlalchemy_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url.replace("%", "%%"))
    return config


def upgrade(sqlalchemy_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(sqlalchemy_url), revision)


def downgrade(sqlalchemy_url: str, revision: str) -> None:
    command.downgrade(alembic_config(sqlalchemy_url), revision)
