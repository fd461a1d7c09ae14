"""Lists of the Batch API: newest first, in pages that continue `after` an id, as OpenAI's lists do.

The store reads one row more than a page holds (store.newest_first): whether it came says whether there
are more.
"""

from __future__ import annotations

from typing import Any


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A page in OpenAI's list shape."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
