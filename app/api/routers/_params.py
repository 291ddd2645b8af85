"""Path, query and header parameters shared by the routers, with the bounds the OpenAPI document states."""

from __future__ import annotations

import re

from fastapi import Header, Path, Query

from app.api import errors
from app.api.schemas import CURSOR_PATTERN, HEADER_TOKEN_PATTERN, UUID_PATTERN
from app.errors import Unprocessable
from app.services import pagination

BEARER = [{"bearerAuth": []}]
BEARER_OR_PUBLIC = [{"bearerAuth": []}, {}]  # answers can be public (FACTPATCH_PUBLIC_ANSWERS)

_UUID = re.compile(UUID_PATTERN)
_CURSOR = re.compile(CURSOR_PATTERN)


def resource_id(what: str):
    """A path id: a UUID; anything else (NUL bytes included) is 422 ``invalid_request``."""
    return Path(pattern=UUID_PATTERN, min_length=36, max_length=36, description=f"The {what}'s id (a UUID).")


def cursor_query():
    return Query(
        default=None, max_length=200, json_schema_extra={"pattern": CURSOR_PATTERN},
        description="`next_cursor` of the previous page; anything else is 422 `invalid_cursor`.",
    )


def check_cursor(cursor: str | None) -> None:
    """Refuse a cursor this service did not hand out before it reaches the database."""
    if cursor is None:
        return
    if not _CURSOR.match(cursor):
        raise Unprocessable("malformed cursor", code="invalid_cursor")
    pagination.check_cursor(cursor, id_is_valid=lambda ident: bool(_UUID.match(ident)))


def idempotency_header():
    return Header(
        default=None, min_length=1, max_length=200, pattern=HEADER_TOKEN_PATTERN,
        description="Replays the stored edit for a repeated request with the same key (printable ASCII, no spaces).",
    )


def prefer_header():
    return Header(
        default=None, max_length=200, pattern=r"^[ -~]*$",
        description="RFC 7240 preferences: `respond-async` answers 202 with the queued edit's job at once; "
        "`wait=N` waits at most N seconds (bounded by FACTPATCH_EDIT_WAIT_SECONDS) before 504 `edit_pending`. "
        "Others are ignored.",
    )


def parse_prefer(value: str | None) -> tuple[bool, float | None]:
    """(respond-async asked, wait seconds asked or None) from a Prefer header; anything it does not
    understand is ignored, as RFC 7240 asks."""
    if not value:
        return False, None
    respond_async, wait = False, None
    for part in value.split(","):
        token = part.split(";")[0].strip().lower()
        if token == "respond-async":
            respond_async = True
        elif token.startswith("wait="):
            try:
                n = float(token[5:].strip().strip('"'))
            except ValueError:
                continue
            if 0 < n < 1e6:
                wait = n
    return respond_async, wait


AUTH = (401, 403, 503)
responses = errors.responses
