from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from app.api import deps
from app.api.schemas import HealthOut
from app.runtime import Runtime

router = APIRouter(tags=["health"])


def _check(fn) -> dict:
    try:
        fn()
        return {"ok": True}
    except Exception as exc:  # noqa: BLE001 - health reports, never raises
        return {"ok": False, "error": type(exc).__name__}


def health_report(rt: Runtime) -> HealthOut:
    db = {"kind": rt.db.dialect, **_check(rt.db.ping)}
    redis = {"kind": rt.memory.kind, "url": rt.memory.describe(), **_check(rt.memory.ping)}
    ok = db["ok"] and redis["ok"]
    return HealthOut(
        status="ok" if ok else "degraded", model=rt.lm.name, device=str(rt.lm.device), database=db, redis=redis,
        edits_active=_active_edits(rt) if db["ok"] else None, selector_keys=len(rt.selector),
        training=_training(rt),
        engine=rt.answers.engine.status() if rt.answers.engine is not None else {"kind": "local", "answering": "local"},
    )


def _training(rt: Runtime) -> dict:
    if rt.queue is None:
        return {"mode": "local"}
    try:
        return {"mode": "workers", "workers": len(rt.queue.workers())}
    except Exception:  # noqa: BLE001 - health reports, never raises
        return {"mode": "workers", "workers": None}


def _active_edits(rt: Runtime) -> int | None:
    try:
        return rt.edits.count_active()
    except Exception:  # noqa: BLE001 - health reports, never raises
        return None


@router.get("/health", response_model=HealthOut, summary="Liveness and dependencies; 503 when one is down",
            responses={503: {"model": HealthOut, "description": "A dependency (database, Redis) is down."}})
async def health(rt: Runtime = Depends(deps.runtime)):
    report = await run_in_threadpool(health_report, rt)
    return JSONResponse(report.model_dump(), status_code=200 if report.status == "ok" else 503)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
