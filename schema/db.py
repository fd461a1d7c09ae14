"""Database engine and session factory, one per process and URL."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker


@lru_cache(maxsize=8)
def get_engine(sqlalchemy_url: str, pool_size: int = 10) -> Engine:
    # pool_pre_ping: a worker outlives Postgres restarts; a dead pooled connection is replaced, not used.
    return create_engine(sqlalchemy_url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def session_factory(sqlalchemy_url: str, pool_size: int = 10) -> sessionmaker[Session]:
    return sessionmaker(get_engine(sqlalchemy_url, pool_size), expire_on_commit=False)
