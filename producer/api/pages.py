"""Lists of the Batch API: newest first, in pages that continue `after` an id, as OpenAI's lists do."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session


def newest_first(session: Session, query: Select, model: Any, limit: int, after: str | None) -> list[Any]:
    """`query`'s rows of `model` (which has `created_at` and `id`), newest first, after the row `after`. Ask
    for one more than a page holds: whether it came says whether there are more."""
    if after and (cursor := session.get(model, after)) is not None:
        query = query.where((model.created_at, model.id) < (cursor.created_at, cursor.id))
    return list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit)))


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A page in OpenAI's list shape."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
