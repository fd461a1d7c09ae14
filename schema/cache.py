"""The result cache key: which requests are sure to produce the same output, and whose results they may reuse.

Only greedy requests qualify (temperature 0, or top_k 1): their output is a function of the model, the
endpoint and the body. The body's `model` is a label (the worker serves its configured model), and
`user` and `seed` do not change a greedy output, so they are left out of the key.

The key also holds its owner, so a cached result is only ever reused within the scope it was made in:
by default (DEEPBATCH_RESULT_CACHE_SCOPE=owner) the API key that submitted the batch, with every CLI
submission (and the API with auth off) one owner of its own; with `deployment`, every submission of the
deployment shares one scope. A hit would otherwise tell one tenant what another asked, and answered. The
scope is fixed into each request's key when it is submitted: a job submitted under one scope never reuses
a result stored under the other, and keys made before owners were hashed (KEY_VERSION 2) match nothing.

The key hashes pydantic's JSON of the validated body: fields in the model's declaration order whatever
order the line wrote them in, and unset fields left out, so equal requests give equal bytes. One call into
pydantic's serializer instead of a dict and a sorted `json.dumps`: a fifth of submit's Python time (measured).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, Literal

from pydantic_core import to_json

from schema.lines import ChatBody, CompletionBody

IGNORED_FIELDS = {"model", "user", "seed"}
KEY_VERSION = b"3"  # part of the hash, so a change in what is hashed can never match an older key
CacheScopeSetting = Literal["owner", "deployment"]
CLI_OWNER: Final = "cli"  # submissions with no API key: the CLI's, and the API's with auth off
DEPLOYMENT_OWNER: Final = "deployment"  # every submission, when the operator shares the cache


def cache_owner(owner_key_id: str | None, scope: CacheScopeSetting) -> str:
    """Whose results a job may reuse: its API key's, the CLI's, or (a shared cache) the deployment's."""
    if scope == "deployment":
        return DEPLOYMENT_OWNER
    return f"key:{owner_key_id}" if owner_key_id else CLI_OWNER


@dataclass(frozen=True)
class CacheScope:
    """What a job's cache keys are made in: the model its workers serve, and its owner."""

    served_model: str
    owner: str

    def key(self, url: str, body: ChatBody | CompletionBody) -> str | None:
        return result_cache_key(self.served_model, url, body, self.owner)


def result_cache_key(served_model: str, url: str, body: ChatBody | CompletionBody, owner: str) -> str | None:
    if not body.is_greedy:
        return None
    canonical = to_json(body, exclude_none=True, exclude=IGNORED_FIELDS)
    parts = (KEY_VERSION, owner.encode(), served_model.encode(), url.encode(), canonical)
    return hashlib.sha256(b"\x1f".join(parts)).hexdigest()
