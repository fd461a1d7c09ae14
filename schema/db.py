"""Database engine and session factory, one per process and URL."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker


@lru_cache(maxsize=8)
def get_engine(sqlalchemy_url: str, pool_size: int = 10, pre_ping: bool = True) -> Engine:
    # pre_ping: a dead pooled connection (Postgres restarted) is replaced before use, at the price of a
    # round trip per checkout; the worker turns it off and retries a lost connection itself (worker/retries.py).
    return create_engine(sqlalchemy_url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=pre_ping)


def session_factory(sqlalchemy_url: str, pool_size: int = 10, pre_ping: bool = True) -> sessionmaker[Session]:
    return sessionmaker(get_engine(sqlalchemy_url, pool_size, pre_ping), expire_on_commit=False)
