"""FastAPI dependencies: the runtime and role checks."""

from __future__ import annotations

from typing import Callable

from fastapi import Depends, Header, Request

from app.runtime import Runtime
from app.services.keys import Principal


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def require(role: str, *, public_setting: bool = False) -> Callable[..., Principal]:
    def dep(
        rt: Runtime = Depends(runtime),
        authorization: str | None = Header(default=None, include_in_schema=False),
    ) -> Principal:
        public = public_setting and rt.settings.answers_public
        return rt.keys.authorize(authorization, role, public=public)

    return dep


reader_or_public = require("reader", public_setting=True)
reader = require("reader")
editor = require("editor")
admin = require("admin")
