"""Who is calling: the API key behind a request, checked and rate-limited, and errors in OpenAI's shape."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from producer.api import keys
from schema.settings import Settings


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


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


def caller(request: Request) -> str | None:
    """The calling key's id (None with auth off), after drawing from its rate-limit bucket."""
    settings: Settings = request.app.state.settings
    if not settings.api_auth:
        return None
    secret = bearer_secret(request)
    with request.app.state.sessions.begin() as session:
        key = keys.key_for_secret(session, secret) if secret else None
        if key is None:
            raise ApiError(401, "Incorrect or missing API key: create one with `deepbatch keys create`.",
                           code="invalid_api_key", headers={"WWW-Authenticate": 'Basic realm="DeepBatch"'})
        draw = keys.draw_token(session, key.id, settings.api_requests_per_s, settings.api_burst)
    if not draw.allowed:
        raise ApiError(429, f"Rate limit reached for {key.id}: {settings.api_requests_per_s:g} requests/s "
                       f"(DEEPBATCH_API_REQUESTS_PER_S). Try again in {draw.retry_after_s}s.",
                       code="rate_limit_exceeded", kind="requests", headers={"retry-after": str(draw.retry_after_s)})
    return key.id


# Module-level, so that FastAPI can resolve the annotation (this module uses postponed annotations).
Caller = Annotated[str | None, Depends(caller)]
