"""Every error leaves as ``{"error": {"code", "message"}}``: 4xx for the caller, 5xx for us."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import FactpatchError

log = logging.getLogger(__name__)

MAX_URL_CHARS = 8192  # path + query string; longer is refused with a JSON 414

_DESCRIPTIONS = {
    400: "The body is not valid JSON (`invalid_json`).",
    401: "No, a malformed, unknown or revoked API key (`missing_key`, `invalid_key`).",
    403: "The key's role may not call this operation (`forbidden`).",
    404: "No such resource (`edit_not_found`, `calibration_not_found`, `job_not_found`).",
    409: "Conflicts with the stored state (`idempotency_key_reused`, `idempotency_conflict`, `delta_not_lora`, ...).",
    422: "Invalid input, refused before any work (`invalid_request`, `invalid_config`, `invalid_cursor`, "
         "`unknown_method`, ...).",
    503: "A dependency (database, Redis, the training workers) is unavailable (`database_unavailable`, "
         "`memory_unavailable`, `workers_unavailable`, ...).",
    504: "The edit is still being trained after the wait (`edit_pending`); the body names its `job_id` and "
         "`edit_id` to poll.",
}


def responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` for the error statuses an operation can return, all with the error schema."""
    from app.api.schemas import ErrorOut

    return {c: {"model": ErrorOut, "description": _DESCRIPTIONS[c]} for c in codes}


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    from starlette.routing import Match

    allowed: set[str] = set()
    for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        scope = {**request.scope, "method": m}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.add(m)
    return sorted(allowed)

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    414: "uri_too_long", 429: "too_many_requests", 503: "unavailable",
}


def error_body(code: str, message: str, **extra) -> dict:
    body = {"code": code, "message": message}
    body.update(extra)
    return {"error": body}


def install(app: FastAPI) -> None:
    @app.exception_handler(FactpatchError)
    async def _service_error(_req: Request, exc: FactpatchError):
        extra = dict(getattr(exc, "extra", None) or {})
        if getattr(exc, "details", None):
            extra["details"] = exc.details
        return JSONResponse(error_body(exc.code, exc.message, **extra), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("invalid_json", "request body is not valid JSON"), status_code=400)
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        message = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else first["msg"]
        return JSONResponse(error_body("invalid_request", message, details=details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = _allowed_methods(req)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
                message = f"method {req.method} not allowed here; allowed: {', '.join(allowed)}"
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=headers or None)

    @app.middleware("http")
    async def _refuse_long_urls(request: Request, call_next):
        n = len(request.scope.get("raw_path") or request.scope.get("path", "")) + len(request.scope.get("query_string", b""))
        if n > MAX_URL_CHARS:
            return JSONResponse(error_body("uri_too_long", f"the URL is longer than {MAX_URL_CHARS} characters"),
                                status_code=414)
        return await call_next(request)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception):
        log.exception("unhandled error: %s", type(exc).__name__)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
