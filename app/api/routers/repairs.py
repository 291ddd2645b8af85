"""Repairs: find the trained facts that caused failures and erase them (a job; editor runs, admin applies)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from app.api import deps
from app.api.routers._params import AUTH, BEARER, resource_id, responses
from app.api.schemas import RepairIn, RepairOut
from app.errors import Forbidden
from app.runtime import Runtime
from app.services.keys import Principal

router = APIRouter(tags=["repairs"])


@router.post("/repairs", response_model=RepairOut, status_code=202,
             summary="Identify the causes of failures and treat them (a job; editor, `apply: true` needs admin)",
             responses=responses(400, *AUTH, 404, 409, 422), openapi_extra={"security": BEARER})
async def create_repair(body: RepairIn, rt: Runtime = Depends(deps.runtime),
                        who: Principal = Depends(deps.editor)) -> RepairOut:
    if body.apply and not who.allows("admin"):
        raise Forbidden("applying a repair needs the admin role; run it with apply: false to see its report",
                        code="forbidden")
    rep, job = await run_in_threadpool(rt.repairs.create, body.to_request(), actor=who.key_id)
    return RepairOut.of(rep, job)


@router.get("/repairs/{repair_id}", response_model=RepairOut, summary="One repair: status, progress, causes and report",
            responses=responses(*AUTH, 404, 422), openapi_extra={"security": BEARER})
async def get_repair(repair_id: str = resource_id("repair"), rt: Runtime = Depends(deps.runtime),
                     _=Depends(deps.reader)) -> RepairOut:
    rep, job = await run_in_threadpool(rt.repairs.get, repair_id)
    return RepairOut.of(rep, job)


@router.post("/admin/repairs/{repair_id}/revert", response_model=RepairOut,
             summary="Take an applied repair back: its deltas off, the edits it reverted reinstated (admin)",
             responses=responses(*AUTH, 404, 409, 422), openapi_extra={"security": BEARER})
async def revert_repair(repair_id: str = resource_id("repair"), rt: Runtime = Depends(deps.runtime),
                        who: Principal = Depends(deps.admin)) -> RepairOut:
    rep = await run_in_threadpool(rt.repairs.revert, repair_id, actor=who.key_id)
    return RepairOut.of(rep)
