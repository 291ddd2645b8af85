"""An edit's delta as a PEFT LoRA adapter (a zip or tar of ``adapter_config.json`` and
``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained`` or an engine serving LoRAs."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.concurrency import run_in_threadpool

from app.api import deps
from app.api.routers._params import AUTH, BEARER, resource_id, responses
from app.runtime import Runtime

router = APIRouter(tags=["edits"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get(
    "/edits/{edit_id}/adapter", summary="The edit's delta as a PEFT LoRA adapter (zip or tar)",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": _BINARY, "application/x-tar": _BINARY},
              "description": "adapter_config.json, adapter_model.safetensors and factpatch_edit.json at the "
                             "archive's root: unpack into a folder and pass it to `PeftModel.from_pretrained`."},
        **responses(*AUTH, 404, 409, 422),
    },
    openapi_extra={"security": BEARER},
)
async def edit_adapter(
    edit_id: str = resource_id("edit"),
    format: Literal["zip", "tar"] = Query(default="zip", description="Archive format."),
    rt: Runtime = Depends(deps.runtime),
    _=Depends(deps.reader),
) -> Response:
    archive = await run_in_threadpool(rt.adapters.archive, edit_id, format)
    return Response(
        archive.data, media_type=archive.media_type,
        headers={"Content-Disposition": f'attachment; filename="{archive.filename}"',
                 "X-Factpatch-Edit-Id": archive.edit_id, "X-Factpatch-Edit-Status": archive.status},
    )
