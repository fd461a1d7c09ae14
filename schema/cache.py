"""The result cache key: which requests are sure to produce the same output.

Only greedy requests qualify (temperature 0, or top_k 1): their output is a function of the model, the
endpoint and the body. The body's `model` is a label (the worker serves its configured model), and
`user` and `seed` do not change a greedy output, so they are left out of the key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

IGNORED_FIELDS = ("model", "user", "seed")


def is_greedy(body: dict[str, Any]) -> bool:
    return body.get("temperature") == 0 or body.get("top_k") == 1


def result_cache_key(served_model: str, url: str, body: dict[str, Any]) -> str | None:
    if not is_greedy(body):
        return None
    relevant = {key: value for key, value in body.items() if key not in IGNORED_FIELDS}
    canonical = json.dumps([served_model, url, relevant], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
