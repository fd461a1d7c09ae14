"""What the API accepts as text, checked before it reaches PostgreSQL, the disk or an error message.

PostgreSQL text and JSON cannot hold U+0000, and an unpaired surrogate (`\\ud800`, which JSON's escapes
and a percent-encoded URL can both carry) cannot even be encoded as UTF-8: either would fail inside the
driver, as a 500, after an upload was already on disk. So every string a caller sends — path, query,
JSON body, form field, filename — is checked here first and refused with a 400 that names it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field, StrictStr

from producer.api.errors import ApiError

# OpenAI's limits on a batch's metadata.
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


def unstorable_reason(value: str) -> str | None:
    """Why PostgreSQL cannot store `value` as text (None when it can)."""
    if "\x00" in value:
        return "holds a NUL character (\\u0000)"
    if any("\ud800" <= character <= "\udfff" for character in value):
        return "holds an unpaired surrogate (\\ud800-\\udfff), which is not text"
    return None


def storable(value: str) -> str:
    """A pydantic check: `value`, if PostgreSQL can store it."""
    if reason := unstorable_reason(value):
        raise ValueError(reason)
    return value


def check_storable(value: str, param: str) -> str:
    if reason := unstorable_reason(value):
        raise ApiError(400, f"{param} {reason}", param=param)
    return value


Text = Annotated[StrictStr, AfterValidator(storable)]
MetadataKey = Annotated[Text, Field(max_length=MAX_METADATA_KEY_CHARS)]
MetadataValue = Annotated[Text, Field(max_length=MAX_METADATA_VALUE_CHARS)]


class CreateBatch(BaseModel):
    """The body of POST /v1/batches, as OpenAI's API takes it."""

    input_file_id: Text
    endpoint: Text
    completion_window: Text = "24h"
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_PAIRS)] | None = None


def storable_parameters(request: Request) -> None:
    """A dependency of every route: the path's and the query's parameters are storable text."""
    for name, value in request.path_params.items():
        check_storable(str(value), name)
    for name, value in request.query_params.multi_items():
        check_storable(name, "query parameter name")
        check_storable(value, name)


def error_location(location: tuple) -> str | None:
    """Where in the request a validation error is (`metadata.<key>`), spelled so any key can be shown."""
    parts = [part if isinstance(part, str) and not unstorable_reason(part) and len(part) <= 64 else ascii(part)[:64]
             for part in location[1:]]
    return ".".join(str(part) for part in parts) or None


async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
    """A request that does not validate, as a 400 in OpenAI's shape naming the parameter at fault."""
    problem = error.errors()[0]
    param = error_location(problem["loc"])
    return ApiError(400, f"{param}: {problem['msg']}" if param else problem["msg"], param=param).response()
