"""API keys: created and revoked from the CLI, and the limit on a key's queued lines across servers.

A key's secret (`dbk_…`) is shown once; the database keeps its sha256, so a leaked table leaks no key.
Every change to a key is an audit event carrying the key's id where job events carry a job's.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

from producer.api import store
from producer.api.store import list_keys, revoke_key  # the CLI's `keys list` and `keys revoke`
from schema.tables import ApiKey

__all__ = ["KeyBusy", "create_key", "list_keys", "queued_lines_lock", "revoke_key", "secret_sha256"]

SECRET_PREFIX = "dbk_"
# Waiters for a key's queued-lines lock poll rather than block, so that they hold no pooled connection the
# holder may need to store its batch.
LOCK_POLL_S, LOCK_WAIT_S = 0.05, 60.0


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, name: str, actor: str) -> tuple[ApiKey, str]:
    """A new key and its secret, which is not stored and cannot be shown again."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    return store.insert_key(session, f"key_{uuid.uuid4().hex[:16]}", name, secret_sha256(secret), actor), secret


class KeyBusy(Exception):
    """Another batch of the key was being created for all of LOCK_WAIT_S."""


@contextmanager
def queued_lines_lock(sessions: sessionmaker[Session], key_id: str) -> Iterator[int]:
    """Yield the key's queued lines while no other batch of the key can be created; what the caller stores
    meanwhile (in transactions of its own) counts for the next one. The lock ends with this transaction,
    so a failed creation or a lost connection never leaves it held."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        with sessions.begin() as session:
            if store.try_queued_lines_lock(session, key_id):
                yield store.queued_lines(session, key_id)
                return
        if time.monotonic() > deadline:
            raise KeyBusy(f"another batch of {key_id} was being created for {LOCK_WAIT_S:g} s")
        time.sleep(LOCK_POLL_S)
