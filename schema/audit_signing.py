"""Signatures and off-site anchors of the audit chain: what a PostgreSQL superuser cannot forge.

The seals of the audit chain are written by triggers inside PostgreSQL (migration 0007), so whoever
controls the database can recompute every digest and hash: edit an event and re-seal the chain after it,
or cut seals off the end and move `audit_chain_head` back. Two things it cannot do, and this module
holds both:

- **Signatures**: an HMAC-SHA256 over a seal's position, hash and times, computed with a key that never
  enters the database (`DEEPBATCH_AUDIT_HMAC_KEY_FILE`, read by the CLI). The triggers cannot sign, as they
  would have to hold the key, which a superuser could then read (a GUC, a function body, the statement
  log); so the key-holder signs after the fact: `deepbatch audit anchor` verifies the chain and signs its
  head, and `deepbatch audit purge` signs the anchor its purge leaves. One signature covers every seal
  before it, as each seal's hash chains all earlier ones. A seal rewritten after it was signed no longer
  matches its signature; a signature made up without the key does not match the key. But signatures are
  rows of the database too: deleted together with the seals they cover, they leave no trace there.
- **Anchors**: the same signed head as a JSON line, printed or appended to a file kept off the database's
  host: what the database cannot rewrite. `deepbatch audit verify --anchor FILE` compares every line of
  the file with the chain, so cutting the chain back past a line is seen; the key makes the lines (and
  the purges that may take anchored seals) unforgeable.

Everything here is pure (no SQL: schema/audit.py holds the audit log's queries). The standard library's
`hmac` module is the implementation; there is nothing to prefer over it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

KEY_SETTING = "DEEPBATCH_AUDIT_HMAC_KEY_FILE"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MIN_KEY_BYTES = 32  # as `openssl rand -hex 32` writes: 64 hex characters, 256 bits of key


class AuditKeyError(Exception):
    """The audit key file is set but cannot serve as a key."""


class AnchorFileError(Exception):
    """A line of an anchor file is not an anchor."""


def load_key(path: Path | None) -> bytes | None:
    """The key's bytes (surrounding whitespace stripped), or None when the setting is unset."""
    if path is None:
        return None
    try:
        key = path.read_bytes().strip()
    except OSError as error:
        raise AuditKeyError(f"{KEY_SETTING}={path}: cannot read the key ({error.strerror})") from error
    if len(key) < MIN_KEY_BYTES:
        raise AuditKeyError(f"{KEY_SETTING}={path}: the key holds {len(key)} bytes, at least {MIN_KEY_BYTES} are "
                            "needed (e.g. `openssl rand -hex 32`)")
    return key


def epoch_microseconds(moment: datetime) -> int:
    """A time as the message spells it: independent of time zones and of how a time is written."""
    return (moment - EPOCH) // timedelta(microseconds=1)  # exact: integer arithmetic, no float


def _hmac(key: bytes, *fields: object) -> str:
    return hmac.new(key, "\x1f".join(map(str, fields)).encode(), hashlib.sha256).hexdigest()


def seal_signature(key: bytes, chain_seq: int, seal_hash: str, sealed_at: datetime | None,
                   signed_at: datetime) -> str:
    """The HMAC of a signed head: seal `chain_seq` with `seal_hash`, written at `sealed_at`, signed at `signed_at`."""
    sealed = "" if sealed_at is None else epoch_microseconds(sealed_at)
    return _hmac(key, "deepbatch audit seal v1", chain_seq, seal_hash, sealed, epoch_microseconds(signed_at))


def purge_signature(key: bytes, chain_seq: int, seal_hash: str, purged_before: datetime) -> str:
    """The HMAC of a retention purge's anchor: the seals up to `chain_seq` deleted, as sealed before `purged_before`."""
    return _hmac(key, "deepbatch audit purge v1", chain_seq, seal_hash, epoch_microseconds(purged_before))


def signature_matches(expected: str, found: str | None) -> bool:
    return found is not None and hmac.compare_digest(expected, found)


class Anchor(BaseModel):
    """The chain's head as `deepbatch audit anchor` writes it: one JSON line of an anchor file.

    `sealed_at` is the head seal's time in the database (None for an empty chain, or one purged whole);
    `anchored_at` is this machine's clock; `hmac` is there when the key was set.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    chain_seq: int = Field(ge=0)
    hash: str = Field(pattern=r"^([0-9a-f]{64})?$")
    sealed_at: datetime | None
    anchored_at: datetime
    hmac: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    def expected_hmac(self, key: bytes) -> str:
        return seal_signature(key, self.chain_seq, self.hash, self.sealed_at, self.anchored_at)

    def json_line(self) -> str:
        return self.model_dump_json(exclude_none=False) + "\n"


def signed_anchor(key: bytes | None, chain_seq: int, seal_hash: str, sealed_at: datetime | None) -> Anchor:
    anchored_at = datetime.now(timezone.utc)
    signature = None if key is None else seal_signature(key, chain_seq, seal_hash, sealed_at, anchored_at)
    return Anchor(chain_seq=chain_seq, hash=seal_hash, sealed_at=sealed_at, anchored_at=anchored_at, hmac=signature)


def read_anchor_file(path: Path) -> list[tuple[int, Anchor]]:
    """Every anchor of the file with its line number; a line that is not one is an error naming it."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise AnchorFileError(f"anchor file {path}: cannot be read ({error})") from error
    anchors = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            anchor = Anchor.model_validate(json.loads(line))
        except (json.JSONDecodeError, ValidationError) as error:
            reason = error.errors()[0] if isinstance(error, ValidationError) else {"msg": str(error), "loc": ()}
            where = ".".join(map(str, reason["loc"]))
            raise AnchorFileError(f"{path} line {line_no}: not an anchor ({where + ': ' if where else ''}"
                                  f"{reason['msg']})") from error
        if anchor.chain_seq > 0 and not anchor.hash:
            raise AnchorFileError(f"{path} line {line_no}: not an anchor (seal {anchor.chain_seq} needs its hash)")
        anchors.append((line_no, anchor))
    return anchors


def append_anchor(path: Path, anchor: Anchor) -> None:
    """One line at the end of the file, on disk before this returns."""
    with path.open("a") as file:
        file.write(anchor.json_line())
        file.flush()
        os.fsync(file.fileno())
