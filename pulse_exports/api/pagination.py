"""Keyset pagination of list endpoints: opaque cursors (base64url JSON of the last item's sort key) and pages."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, TypeVar

from fastapi import Query
from fastapi.exceptions import RequestValidationError

T = TypeVar("T")
K = TypeVar("K")

# The query parameters of every list endpoint.
PageLimit = Annotated[int, Query(ge=1, le=200)]
PageCursor = Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page.")]


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, parse: Callable[[list[str]], K]) -> K:
    """``parse`` applied to the parts of a cursor this API made; 422 naming ``cursor`` for anything else."""
    try:
        return parse(json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))))
    except (ValueError, TypeError, LookupError, AttributeError, binascii.Error):
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "cursor"), "msg": "not a cursor from this API", "input": cursor}]
        ) from None


def created_and_id(parts: list[str]) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) sort key of a cursor made by ``encode_cursor(created_at.isoformat(), str(id))``."""
    created_at, row_id = parts
    return datetime.fromisoformat(created_at), uuid.UUID(row_id)


def next_page(
    found: Sequence[T], limit: int, cursor_parts: Callable[[T], tuple[str, ...]]
) -> tuple[list[T], str | None]:
    """The page (the first ``limit`` of ``found``, which was fetched with ``limit + 1``) and the cursor of the
    page after it, None when this is the last."""
    page = list(found[:limit])
    return page, encode_cursor(*cursor_parts(page[-1])) if len(found) > limit else None
