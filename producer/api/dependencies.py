"""What a route is given: the server's settings, session factory, files directory and Celery app (set on
app.state by create_app), and a database session of its own for the request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from schema.settings import Settings


def settings(request: Request) -> Settings:
    return request.app.state.settings


def sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def files_directory(request: Request) -> Path:
    return request.app.state.settings.stored_files_dir


def celery_app(request: Request) -> Celery:
    return request.app.state.celery


def database(request: Request) -> Iterator[Session]:
    """The request's session, shared by its dependencies (the caller's key) and its route. It commits
    nothing: who writes commits (store functions never do); it is closed — what was not committed rolled
    back — once the route returns, before the answer is sent."""
    with request.app.state.sessions() as session:
        yield session


# Module-level, so that FastAPI can resolve the annotations (the routes' modules postpone annotations).
ServerSettings = Annotated[Settings, Depends(settings)]
Sessions = Annotated[sessionmaker[Session], Depends(sessions)]
FilesDirectory = Annotated[Path, Depends(files_directory)]
CeleryApp = Annotated[Celery, Depends(celery_app)]
Db = Annotated[Session, Depends(database, scope="function")]
