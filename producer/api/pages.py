"""Lists of the Batch API: newest first, in pages that continue `after` an id, as OpenAI's lists do.

The `after` cursor is looked up among the caller's own objects only: another key's id and an id that
never existed are refused alike, so a cursor cannot tell a caller what exists beyond its own.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session

from producer.api.auth import ApiError


def newest_first(session: Session, listed: Select, owned: Select, model: Any, limit: int,
                 after: str | None) -> list[Any]:
    """`listed`'s rows of `model` (which has `created_at` and `id`), newest first, after the row `after`,
    which must be one of `owned` (the caller's rows, deleted ones too: a page may end at one deleted since).
    Ask for one more than a page holds: whether it came says whether there are more."""
    if after is not None:
        cursor = session.execute(owned.with_only_columns(model.created_at, model.id).where(model.id == after)).first()
        if cursor is None:
            raise ApiError(400, f"after: {after!r} is not the id of one of your {model.__tablename__}", param="after")
        listed = listed.where(tuple_(model.created_at, model.id) < tuple_(*cursor))
    return list(session.scalars(listed.order_by(model.created_at.desc(), model.id.desc()).limit(limit)))


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A page in OpenAI's list shape."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
