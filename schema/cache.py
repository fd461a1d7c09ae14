"""The result cache key: which requests are sure to produce the same output.

Only greedy requests qualify (temperature 0, or top_k 1): their output is a function of the model, the
endpoint and the body. The body's `model` is a label (the worker serves its configured model), and
`user` and `seed` do not change a greedy output, so they are left out of the key.

The key hashes pydantic's JSON of the validated body: fields in the model's declaration order whatever
order the line wrote them in, and unset fields left out, so equal requests give equal bytes. One call into
pydantic's serializer instead of a dict and a sorted `json.dumps`: a fifth of submit's Python time (measured).
"""

from __future__ import annotations

import hashlib

from pydantic_core import to_json

from schema.lines import ChatBody, CompletionBody

IGNORED_FIELDS = {"model", "user", "seed"}
KEY_VERSION = b"2"  # part of the hash, so a change in what is hashed can never match an older key


def is_greedy(body: ChatBody | CompletionBody) -> bool:
    return body.temperature == 0 or body.top_k == 1


def result_cache_key(served_model: str, url: str, body: ChatBody | CompletionBody) -> str | None:
    if not is_greedy(body):
        return None
    canonical = to_json(body, exclude_none=True, exclude=IGNORED_FIELDS)
    return hashlib.sha256(b"\x1f".join((KEY_VERSION, served_model.encode(), url.encode(), canonical))).hexdigest()
