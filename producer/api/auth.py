"""Who is calling: the API key behind a request, and its rate-limit bucket, as the routes' dependencies.

With DEEPBATCH_API_AUTH off there is no key (the caller is None) and no limit. Each key's bucket is a row
of api_keys, drawn from in one statement (store.DRAW_TOKEN), so every server process shares it.
"""

from __future__ import annotations

import base64
import math
from typing import Annotated

from fastapi import Depends, Request

from producer.api import store
from producer.api.dependencies import Db, ServerSettings
from producer.api.errors import ApiError
from producer.api.keys import secret_sha256
from schema.tables import ApiKey


def bearer_secret(request: Request) -> str | None:
    """The key's secret: `Authorization: Bearer <secret>` (API clients) or Basic with the secret as the
    password (a browser on the dashboard)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value).decode().partition(":")[2] or None
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def api_key(request: Request, settings: ServerSettings, session: Db) -> ApiKey | None:
    """The live key whose secret the request carries (None with auth off); a 401 that asks a browser for
    it otherwise."""
    if not settings.api_auth:
        return None
    secret = bearer_secret(request)
    key = store.live_key(session, secret_sha256(secret)) if secret else None
    if key is None:
        raise ApiError(401, "Incorrect or missing API key: create one with `deepbatch keys create`.",
                       code="invalid_api_key", headers={"WWW-Authenticate": 'Basic realm="DeepBatch"'})
    return key


def rate_limited(key: Annotated[ApiKey | None, Depends(api_key)], settings: ServerSettings,
                 session: Db) -> str | None:
    """The calling key's id, once a token is drawn from its bucket; a 429 when the bucket is empty. The draw
    is committed at once, so that the key's row is not held locked while the route runs."""
    if key is None:
        return None
    available = store.draw_token(session, key.id, settings.api_requests_per_s, settings.api_burst)
    session.commit()
    if available < 1:
        retry_after_s = max(1, math.ceil((1 - available) / settings.api_requests_per_s))
        raise ApiError(429, f"Rate limit reached for {key.id}: {settings.api_requests_per_s:g} requests/s "
                       f"(DEEPBATCH_API_REQUESTS_PER_S). Try again in {retry_after_s}s.",
                       code="rate_limit_exceeded", kind="requests", headers={"retry-after": str(retry_after_s)})
    return key.id


# The calling key's id, authenticated and rate-limited: every route takes it.
Caller = Annotated[str | None, Depends(rate_limited)]
