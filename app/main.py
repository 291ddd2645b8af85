"""The FastAPI application: ``create_app(settings)`` builds the runtime at start-up (or takes one)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import errors
from app.api.metrics import Metrics, MetricsMiddleware
from app.api.routers import adapters, answers, edits, health, knowledge, openai_compat, repairs
from app.runtime import Runtime
from app.settings import Settings, get_settings

ROUTERS = [health.router, answers.router, edits.router, adapters.router, knowledge.router, repairs.router,
           openai_compat.router]


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or (runtime.settings if runtime else get_settings())
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = Metrics()
    owns_runtime = runtime is None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = runtime or Runtime.build(settings)
        app.state.runtime = rt
        metrics.model_load.set(rt.lm.load_seconds)
        metrics.selector_keys.set_function(lambda: len(rt.selector))
        try:
            yield
        finally:
            if owns_runtime:
                rt.close()

    app = FastAPI(
        title="factpatch",
        version=__version__,
        description="Edit, check, calibrate and revert the factual knowledge of a served language model.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    _document_limits(app, settings)
    return app


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI document states what this server enforces: the bearer scheme and the limits that
    come from settings (batch size, ``max_new_tokens``, query length)."""
    from fastapi.openapi.utils import get_openapi

    from app.api.schemas import MAX_TEXT

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        doc.setdefault("components", {})["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer",
                           "description": "An API key: `Authorization: Bearer <key>` (roles reader < editor < admin)."},
        }
        schemas = doc["components"].get("schemas", {})
        batch = schemas.get("AnswerBatchIn", {}).get("properties", {})
        if "queries" in batch:
            batch["queries"]["maxItems"] = settings.max_batch
        if "max_new_tokens" in batch:
            _set_int_max(batch["max_new_tokens"], settings.max_new_tokens_limit)
        for param in doc["paths"].get("/answer", {}).get("get", {}).get("parameters", []):
            if param["name"] == "max_new_tokens":
                _set_int_max(param["schema"], settings.max_new_tokens_limit)
        # Every 422 carries this service's error body, not FastAPI's default validation schema.
        error_ref = {"$ref": "#/components/schemas/ErrorOut"}
        for ops in doc["paths"].values():
            for op in ops.values():
                r422 = op.get("responses", {}).get("422")
                if r422 and "HTTPValidationError" in str(r422):
                    r422["description"] = errors.responses(422)[422]["description"]
                    r422["content"] = {"application/json": {"schema": error_ref}}
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        if settings.max_query_chars < MAX_TEXT:
            _lower_max_length(doc, MAX_TEXT, settings.max_query_chars)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi


def _set_int_max(schema: dict, limit: int) -> None:
    schema.pop("maximum", None)
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = limit


def _lower_max_length(node, old: int, new: int) -> None:
    if isinstance(node, dict):
        if node.get("maxLength") == old:
            node["maxLength"] = new
        for v in node.values():
            _lower_max_length(v, old, new)
    elif isinstance(node, list):
        for v in node:
            _lower_max_length(v, old, new)
