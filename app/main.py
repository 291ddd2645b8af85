"""The FastAPI application: ``create_app(settings)`` builds the runtime at start-up (or takes one)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import errors
from app.api.metrics import Metrics, MetricsMiddleware
from app.api.routers import answers, edits, health, knowledge
from app.runtime import Runtime
from app.settings import Settings, get_settings

ROUTERS = [health.router, answers.router, edits.router, knowledge.router]


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
    return app
