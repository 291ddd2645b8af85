"""A typed Python client for the factpatch API.

    from app.client import Client

    with Client("http://127.0.0.1:8000", api_key=KEY) as fp:
        edit = fp.create_edit("The UK prime minister is", "Keir Starmer", subject="UK prime minister")
        print(fp.answer("Who is the UK prime minister?").answer)
        fp.revert_edit(edit.id)

Responses are the server's own pydantic models (``app.api.schemas``). Errors raise
:class:`FactpatchAPIError` with the HTTP status and the stable ``code`` of the error body.

Retries: a 503 (a dependency such as the database or Redis is down) and a dropped connection are
retried with exponential backoff (``Retry-After`` honoured) for calls that are safe to repeat:
reads, answers, reverts, and edits. Every ``create_edit`` sends an ``Idempotency-Key`` (a new UUID
unless given) and repeats it on each retry, so an edit whose response was lost is replayed by the
server, never trained or stored twice; a retry that finds the first attempt still running (409
``idempotency_conflict``) waits and asks again.
"""

from __future__ import annotations

import io
import random
import tarfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import httpx

from app.api.schemas import (
    AnswerBatchOut, AnswerOut, AuditItem, EditList, EditOut, HealthOut, HistoryOut, RevertOut, ScoreBatchOut, ScoreOut,
)

Mode = Literal["chat", "completion"]
RETRY_STATUSES = frozenset({503})

__all__ = ["AnswerOut", "AuditItem", "Client", "EditOut", "FactpatchAPIError", "HealthOut", "RevertOut", "ScoreOut"]


class FactpatchAPIError(Exception):
    """The service answered with an error: ``status``, the stable ``code`` and its ``message``."""

    def __init__(self, status: int, code: str, message: str, response: httpx.Response | None = None):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message, self.response = status, code, message, response


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ):
        """``timeout``: seconds per request (an edit trains while the request waits); ``retries``:
        extra attempts after a 503 or a dropped connection, waiting ``backoff`` * 2^k seconds
        (at most ``max_backoff``, or what ``Retry-After`` says)."""
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must not be negative")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------
    def _wait(self, attempt: int, response: httpx.Response | None) -> None:
        delay = min(self.max_backoff, self.backoff * (2**attempt)) * (0.5 + random.random() / 2)
        if response is not None:
            try:
                delay = min(self.max_backoff, max(delay, float(response.headers.get("Retry-After", ""))))
            except ValueError:
                pass
        time.sleep(delay)

    def _request(self, method: str, path: str, *, retry_codes: Sequence[str] = (), ok: Sequence[int] = (),
                 **kwargs: Any) -> httpx.Response:
        """One call, retried on 503, on a dropped connection and on 409s whose code is in
        ``retry_codes``; a status in ``ok`` is returned, any other error raised."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
                    httpx.TimeoutException):
                if last:
                    raise
                self._wait(attempt, None)
                continue
            if response.status_code < 400 or response.status_code in ok:
                return response
            error = _error(response)
            retry = response.status_code in RETRY_STATUSES or (response.status_code == 409 and error.code in retry_codes)
            if not retry or last:
                raise error
            self._wait(attempt, response)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> HealthOut:
        """The service's health; a degraded service (503) is reported, not raised."""
        r = self._http.get("/health")
        if r.status_code not in (200, 503):
            raise _error(r)
        return HealthOut.model_validate(r.json())

    # -- answers --------------------------------------------------------------------------------
    def answer(self, q: str, *, max_new_tokens: int | None = None, mode: Mode | None = None, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> AnswerOut:
        """One query through the selector (``GET /answer``)."""
        params: dict[str, Any] = {"q": q, "do_sample": do_sample, "temperature": temperature, "top_p": top_p}
        params.update({k: v for k, v in (("max_new_tokens", max_new_tokens), ("mode", mode), ("seed", seed))
                       if v is not None})
        return AnswerOut.model_validate(self._request("GET", "/answer", params=params).json())

    def answer_many(self, queries: Sequence[str], *, max_new_tokens: int | None = None, mode: Mode | None = None,
                    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                    seed: int | None = None) -> list[AnswerOut]:
        """A batch of queries, each routed on its own (``POST /answer``)."""
        body = {"queries": list(queries), "max_new_tokens": max_new_tokens, "mode": mode, "do_sample": do_sample,
                "temperature": temperature, "top_p": top_p, "seed": seed}
        r = self._request("POST", "/answer", json={k: v for k, v in body.items() if v is not None})
        return AnswerBatchOut.model_validate(r.json()).results

    def score(self, pairs: Sequence[tuple[str, str]], *, mode: Mode | None = None) -> list[ScoreOut]:
        """Teacher-forced score of each (prompt, target) through the selector (``POST /score``)."""
        body: dict[str, Any] = {"items": [{"prompt": p, "target": t} for p, t in pairs]}
        if mode:
            body["mode"] = mode
        return ScoreBatchOut.model_validate(self._request("POST", "/score", json=body).json()).results

    # -- edits ----------------------------------------------------------------------------------
    def create_edit(self, prompt: str, target: str, *, subject: str | None = None,
                    paraphrases: Sequence[str] = (), locality_prompts: Sequence[str] = (), method: str = "pnp",
                    config: dict[str, Any] | None = None, scope: Literal["fact", "subject"] = "fact",
                    idempotency_key: str | None = None) -> EditOut:
        """Write one fact (editor role). The Idempotency-Key (a new UUID unless given) is sent on
        every attempt, so retries never store the edit twice; repeating a call with the same key
        returns the stored edit."""
        body: dict[str, Any] = {"prompt": prompt, "target": target, "paraphrases": list(paraphrases),
                                "locality_prompts": list(locality_prompts), "method": method,
                                "config": dict(config or {}), "scope": scope}
        if subject is not None:
            body["subject"] = subject
        key = idempotency_key or str(uuid.uuid4())
        r = self._request("POST", "/edits", json=body, headers={"Idempotency-Key": key},
                          retry_codes=("idempotency_conflict",))
        return EditOut.model_validate(r.json())

    def get_edit(self, edit_id: str) -> EditOut:
        return EditOut.model_validate(self._request("GET", f"/edits/{edit_id}").json())

    def list_edits(self, *, status: Literal["active", "reverted", "superseded"] | None = None,
                   page_size: int = 100) -> Iterator[EditOut]:
        """Every edit, newest first, following the pages."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = EditList.model_validate(self._request("GET", "/edits", params=params).json())
            yield from page.items
            cursor = page.next_cursor
            if not cursor:
                return

    def edit_history(self, edit_id: str) -> list[AuditItem]:
        return HistoryOut.model_validate(self._request("GET", f"/edits/{edit_id}/history").json()).items

    def revert_edit(self, edit_id: str) -> RevertOut:
        """Take an edit back (admin role); reverting a reverted edit is a no-op, so retries are safe."""
        return RevertOut.model_validate(self._request("POST", f"/admin/edits/{edit_id}/revert").json())

    def edit_adapter(self, edit_id: str, out: str | Path, *, format: Literal["zip", "tar"] = "zip") -> Path:
        """Download the edit's PEFT LoRA adapter and unpack it into ``out`` (created), ready for
        ``peft.PeftModel.from_pretrained(base, out)``."""
        r = self._request("GET", f"/edits/{edit_id}/adapter", params={"format": format})
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if format == "zip":
            with zipfile.ZipFile(io.BytesIO(r.content)) as z:
                for name in z.namelist():
                    _safe_name(name)
                z.extractall(folder)
        else:
            with tarfile.open(fileobj=io.BytesIO(r.content)) as t:
                t.extractall(folder, filter="data")
        return folder


def _safe_name(name: str) -> None:
    if name.startswith("/") or ".." in Path(name).parts:
        raise FactpatchAPIError(200, "unsafe_archive", f"the archive names {name!r} outside its folder")


def _error(response: httpx.Response) -> FactpatchAPIError:
    code, message = "http_error", response.text[:500]
    try:
        body = response.json().get("error", {})
        code, message = body.get("code", code), body.get("message", message)
    except (ValueError, AttributeError):
        pass
    return FactpatchAPIError(response.status_code, code, message, response)
