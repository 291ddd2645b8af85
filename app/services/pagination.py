"""Pagination cursors, as the API's edge checks them before a list query reaches the database."""

from __future__ import annotations

from app.errors import Unprocessable
from app.store.repos import BadCursor, decode_cursor


def check_cursor(cursor: str | None, *, id_is_valid) -> None:
    """Refuse (422 ``invalid_cursor``) a cursor this service did not hand out: it must decode to a
    timestamp and an id that ``id_is_valid`` accepts."""
    if cursor is None:
        return
    try:
        _ts, ident = decode_cursor(cursor)
        if not id_is_valid(ident):
            raise BadCursor("malformed cursor")
    except BadCursor as exc:
        raise Unprocessable(str(exc), code="invalid_cursor") from None
