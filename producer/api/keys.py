"""API keys: created and revoked from the CLI, checked and rate-limited on every API request.

A key's secret (`dbk_…`) is shown once; the database keeps its sha256, so a leaked table leaks no key.
Every change to a key is an audit event carrying the key's id where job events carry a job's.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from schema.tables import ApiKey, AuditEvent

SECRET_PREFIX = "dbk_"


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, name: str, actor: str) -> tuple[ApiKey, str]:
    """A new key and its secret, which is not stored and cannot be shown again."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=f"key_{uuid.uuid4().hex[:16]}", name=name, secret_sha256=secret_sha256(secret))
    session.add(key)
    session.add(AuditEvent(job_id=key.id, event="api_key_created", worker=actor, detail=name))
    session.flush()
    return key, secret


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, key_id: str, actor: str) -> bool:
    revoked = session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                              .values(revoked_at=text("now()"))).rowcount
    if revoked:
        session.add(AuditEvent(job_id=key_id, event="api_key_revoked", worker=actor))
    return bool(revoked)


def key_for_secret(session: Session, secret: str) -> ApiKey | None:
    """The live key whose secret this is; None for an unknown or revoked one."""
    return session.scalar(select(ApiKey).where(ApiKey.secret_sha256 == secret_sha256(secret),
                                               ApiKey.revoked_at.is_(None)))


@dataclass(frozen=True)
class BucketDraw:
    allowed: bool
    retry_after_s: int  # when not allowed: until the bucket holds a whole token again


# One statement draws a token, so that several server processes share the key's bucket: refill for the
# time since the last draw (up to the burst), then take one if there is one.
DRAW_TOKEN = text("""
    WITH bucket AS (
        SELECT id, least(:burst, coalesce(bucket_tokens, :burst) + :rate * greatest(0, extract(epoch FROM
                   clock_timestamp() - coalesce(bucket_refilled_at, clock_timestamp())))) AS available
        FROM api_keys WHERE id = :key_id FOR UPDATE
    )
    UPDATE api_keys AS k
    SET bucket_tokens = CASE WHEN b.available >= 1 THEN b.available - 1 ELSE b.available END,
        bucket_refilled_at = clock_timestamp()
    FROM bucket AS b WHERE k.id = b.id
    RETURNING b.available
""")


def draw_token(session: Session, key_id: str, rate: float, burst: int) -> BucketDraw:
    available = session.execute(DRAW_TOKEN, {"key_id": key_id, "rate": rate, "burst": burst}).scalar_one()
    if available >= 1:
        return BucketDraw(True, 0)
    return BucketDraw(False, max(1, math.ceil((1 - available) / rate)))


QUEUED_LINES = text("""
    SELECT count(*) FROM requests AS r JOIN jobs AS j ON j.id = r.job_id
    WHERE j.owner_key_id = :key_id AND r.state IN ('queued', 'running')
""")


def queued_lines(session: Session, key_id: str) -> int:
    """The key's requests still to run, across all its batches."""
    return session.execute(QUEUED_LINES, {"key_id": key_id}).scalar_one()


# Checking a key's queued lines and storing a batch's are one step per key, across server processes: a
# transaction holds this advisory lock (namespace, hashtext(key id)) from the count until the batch is stored.
# Waiters poll rather than block, so that they hold no pooled connection the holder may need to store it.
QUEUED_LINES_LOCK_NAMESPACE = 0x0DC
TRY_QUEUED_LINES_LOCK = text("SELECT pg_try_advisory_xact_lock(:namespace, hashtext(:key_id))")
LOCK_POLL_S, LOCK_WAIT_S = 0.05, 60.0


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
            if session.scalar(TRY_QUEUED_LINES_LOCK, {"namespace": QUEUED_LINES_LOCK_NAMESPACE, "key_id": key_id}):
                yield queued_lines(session, key_id)
                return
        if time.monotonic() > deadline:
            raise KeyBusy(f"another batch of {key_id} was being created for {LOCK_WAIT_S:g} s")
        time.sleep(LOCK_POLL_S)
