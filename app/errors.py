"""Errors the services raise; the HTTP layer maps each to its status and stable ``code``."""

from __future__ import annotations


class FactpatchError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 details: list[dict] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        if code:
            self.code = code
        if status:
            self.status = status


class NotFound(FactpatchError):
    status, code = 404, "not_found"


class Conflict(FactpatchError):
    status, code = 409, "conflict"


class Unprocessable(FactpatchError):
    status, code = 422, "unprocessable"


class Unauthorized(FactpatchError):
    status, code = 401, "unauthorized"


class Forbidden(FactpatchError):
    status, code = 403, "forbidden"


class Unavailable(FactpatchError):
    status, code = 503, "unavailable"


class Internal(FactpatchError):
    status, code = 500, "internal_error"
