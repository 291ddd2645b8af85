from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse
from fastapi.concurrency import run_in_threadpool

from app.api import deps
from app.api.routers._params import (
    AUTH, BEARER, check_cursor, cursor_query, idempotency_header, parse_prefer, prefer_header, resource_id,
    responses,
)
from app.api.schemas import EditAcceptedOut, EditIn, EditList, EditOut, HistoryOut, RebuildOut, RevertOut
from app.runtime import Runtime
from app.services.edits import EditInput
from app.services.keys import Principal

router = APIRouter(tags=["edits"])


@router.post(
    "/edits", response_model=EditOut, status_code=201, summary="Write one fact into the model (editor)",
    description="Answers with the stored edit once it is trained (201; 200 for a replayed Idempotency-Key). "
    "With FACTPATCH_TRAINING=workers the training runs on a `factpatch worker` and this request waits for it "
    "(504 `edit_pending` after FACTPATCH_EDIT_WAIT_SECONDS or `Prefer: wait=N`; the job goes on). "
    "`Prefer: respond-async`: 202 at once with the job to poll (`GET /jobs/{job_id}`).",
    responses={200: {"model": EditOut, "description": "A replay of the edit stored under this Idempotency-Key."},
               202: {"model": EditAcceptedOut, "description": "Queued (`Prefer: respond-async`); `Location` is the job."},
               **responses(400, *AUTH, 409, 422, 504)},
    openapi_extra={"security": BEARER},
)
async def create_edit(
    body: EditIn,
    response: Response,
    rt: Runtime = Depends(deps.runtime),
    who: Principal = Depends(deps.editor),
    idempotency_key: str | None = idempotency_header(),
    prefer: str | None = prefer_header(),
):
    req = EditInput(**body.model_dump())
    respond_async, wait = parse_prefer(prefer)
    if respond_async or rt.queue is not None:
        sub = await run_in_threadpool(rt.edit_jobs.submit, req, actor=who.key_id, idempotency_key=idempotency_key)
        if respond_async and sub.replayed is None:
            accepted = EditAcceptedOut(job_id=sub.job.id, edit_id=sub.edit_id, status=sub.job.status)
            return JSONResponse(accepted.model_dump(), status_code=202,
                                headers={"Location": f"/jobs/{sub.job.id}", "Preference-Applied": "respond-async"})
        timeout = min(wait or rt.settings.edit_wait_seconds, rt.settings.edit_wait_seconds)
        result = await run_in_threadpool(rt.edit_jobs.wait, sub, timeout)
    else:
        result = await run_in_threadpool(
            rt.edits.create, req, actor=who.key_id, idempotency_key=idempotency_key
        )
    if result.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return EditOut.of(result.edit)


@router.get("/edits/{edit_id}", response_model=EditOut, summary="One edit",
            responses=responses(*AUTH, 404, 422), openapi_extra={"security": BEARER})
async def get_edit(edit_id: str = resource_id("edit"), rt: Runtime = Depends(deps.runtime), _=Depends(deps.reader)) -> EditOut:
    return EditOut.of(await run_in_threadpool(rt.edits.get, edit_id))


@router.get("/edits", response_model=EditList, summary="Edits, newest first",
            responses=responses(*AUTH, 422), openapi_extra={"security": BEARER})
async def list_edits(
    status: Literal["active", "reverted", "superseded"] | None = None,
    limit: int = Query(default=50, ge=1, le=500),
    cursor: str | None = cursor_query(),
    rt: Runtime = Depends(deps.runtime),
    _=Depends(deps.reader),
) -> EditList:
    check_cursor(cursor)
    items, nxt = await run_in_threadpool(rt.edits.list, status=status, limit=limit, cursor=cursor)
    return EditList(items=[EditOut.of(e) for e in items], next_cursor=nxt)


@router.get("/edits/{edit_id}/history", response_model=HistoryOut, summary="Audit events of one edit",
            responses=responses(*AUTH, 404, 422), openapi_extra={"security": BEARER})
async def edit_history(
    edit_id: str = resource_id("edit"), rt: Runtime = Depends(deps.runtime), _=Depends(deps.reader)
) -> dict:
    await run_in_threadpool(rt.edits.get, edit_id)
    return {"items": await run_in_threadpool(rt.edits.history, edit_id)}


@router.post("/admin/edits/{edit_id}/revert", response_model=RevertOut, summary="Take an edit back (admin)",
             responses=responses(*AUTH, 404, 409, 422), openapi_extra={"security": BEARER})
async def revert_edit(
    edit_id: str = resource_id("edit"), rt: Runtime = Depends(deps.runtime), who: Principal = Depends(deps.admin)
) -> RevertOut:
    edit = await run_in_threadpool(rt.edits.revert, edit_id, actor=who.key_id)
    return RevertOut(id=edit.id, status=edit.status)


@router.post("/admin/selector/rebuild", response_model=RebuildOut,
             summary="Rebuild the shared selector memory from the database (admin)",
             responses=responses(*AUTH), openapi_extra={"security": BEARER})
async def rebuild_selector(rt: Runtime = Depends(deps.runtime), _=Depends(deps.admin)) -> dict:
    n = await run_in_threadpool(rt.sync.rebuild_from_database)
    return {"edits": n}
