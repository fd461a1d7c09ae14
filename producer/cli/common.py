"""What the commands share: the console, a failure's one line, the settings, a command's database sessions
and the identity the audit log names for what a command changes."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from schema.settings import Settings

console = Console(stderr=True, soft_wrap=True)  # one line per message, however narrow the terminal


def fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


def configured_settings() -> Settings:
    from schema.settings import get_settings

    settings = get_settings()
    if settings.database_url is None or settings.broker_url is None:
        raise fail("DATABASE_URL and BROKER_URL must be set (or use `deepbatch run`, which starts embedded ones)")
    return settings


def command_sessions(settings: Settings) -> sessionmaker[Session]:
    """The sessions a command works in: `command_sessions(settings)()` to read, `.begin()` to change
    something in one transaction. One pooled connection: a command runs its statements one after another."""
    from schema.db import session_factory

    return session_factory(settings.sqlalchemy_url, pool_size=1)


def cli_identity() -> str:
    """Who the audit log names for what this command changes."""
    return f"cli@{socket.gethostname()}:{os.getpid()}"
