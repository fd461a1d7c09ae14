"""Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with its status codes, so
OpenAI's clients report them as they would OpenAI's own — Starlette's own answers too (inputs.py words
those of a request that does not validate)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def not_found(what: str, identifier: str) -> ApiError:
    return ApiError(404, f"No such {what}: {identifier!r}", code="not_found", param="id")


async def api_error(_: Request, error: ApiError) -> JSONResponse:
    return error.response()


async def http_error(_: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own answers (no such route, a body that is not JSON)."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return ApiError(error.status_code, str(error.detail), code=code, headers=error.headers).response()
