from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool

from app.api import deps
from app.api.routers._params import AUTH, BEARER, check_cursor, cursor_query, resource_id, responses
from app.api.schemas import CalibrationIn, CalibrationList, CalibrationOut, DetectBatchOut, DetectIn, JobOut
from app.runtime import Runtime
from app.services.keys import Principal

router = APIRouter(tags=["knowledge"])


@router.post("/detect", response_model=DetectBatchOut, response_model_exclude_none=True,
             summary="Judge facts true or false, or rank the candidates of a sentence with a blank",
             responses=responses(400, *AUTH, 422), openapi_extra={"security": BEARER})
async def detect(body: DetectIn, rt: Runtime = Depends(deps.runtime), _=Depends(deps.reader)) -> DetectBatchOut:
    if body.sentence is not None:
        out = await run_in_threadpool(rt.detect.rank, body.sentence, list(body.candidates or []), body.relation,
                                      body.threshold, body.score)
    else:
        out = await run_in_threadpool(rt.detect.detect, [f.to_fact() for f in body.facts], body.threshold, body.score)
    return DetectBatchOut(**out)


@router.post("/calibrations", response_model=CalibrationOut, status_code=202,
             summary="Calibrate a batch of facts with CaliNet slots (a job; editor)",
             responses=responses(400, *AUTH, 409, 422), openapi_extra={"security": BEARER})
async def create_calibration(
    body: CalibrationIn, rt: Runtime = Depends(deps.runtime), who: Principal = Depends(deps.editor)
) -> CalibrationOut:
    cal, job = await run_in_threadpool(
        rt.calibrations.create, [f.to_fact() for f in body.facts], body.config, actor=who.key_id
    )
    return CalibrationOut.of(cal, job)


@router.get("/calibrations/{cal_id}", response_model=CalibrationOut, summary="One calibration and its job",
            responses=responses(*AUTH, 404, 422), openapi_extra={"security": BEARER})
async def get_calibration(cal_id: str = resource_id("calibration"), rt: Runtime = Depends(deps.runtime), _=Depends(deps.reader)) -> CalibrationOut:
    cal, job = await run_in_threadpool(rt.calibrations.get, cal_id)
    return CalibrationOut.of(cal, job)


@router.get("/calibrations", response_model=CalibrationList, summary="Calibrations, newest first",
            responses=responses(*AUTH, 422), openapi_extra={"security": BEARER})
async def list_calibrations(
    status: Literal["queued", "running", "active", "failed", "reverted"] | None = None,
    limit: int = Query(default=50, ge=1, le=500),
    cursor: str | None = cursor_query(),
    rt: Runtime = Depends(deps.runtime),
    _=Depends(deps.reader),
) -> CalibrationList:
    check_cursor(cursor)
    items, nxt = await run_in_threadpool(rt.calibrations.list, status=status, limit=limit, cursor=cursor)
    return CalibrationList(items=[CalibrationOut.of(c) for c in items], next_cursor=nxt)


@router.post("/admin/calibrations/{cal_id}/revert", response_model=CalibrationOut,
             summary="Turn a calibration off (admin)",
             responses=responses(*AUTH, 404, 409, 422), openapi_extra={"security": BEARER})
async def revert_calibration(
    cal_id: str = resource_id("calibration"), rt: Runtime = Depends(deps.runtime), who: Principal = Depends(deps.admin)
) -> CalibrationOut:
    cal = await run_in_threadpool(rt.calibrations.revert, cal_id, actor=who.key_id)
    return CalibrationOut.of(cal)


@router.get("/jobs/{job_id}", response_model=JobOut, summary="A background job's status and progress",
            responses=responses(*AUTH, 404, 422), openapi_extra={"security": BEARER})
async def get_job(job_id: str = resource_id("job"), rt: Runtime = Depends(deps.runtime), _=Depends(deps.reader)) -> JobOut:
    return JobOut.of(await run_in_threadpool(rt.jobs.get, job_id))
