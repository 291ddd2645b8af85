"""What the evaluation drives: the service's HTTP API, over the network or in-process.

Both real backends speak the same HTTP calls (``POST /edits``, ``POST /score``, ``POST /answer``,
``POST /admin/edits/{id}/revert``), so what is measured is the served path: routing by the
selector, the edit's adapter applied per request, the answer as a client would get it. The
in-process one runs the app through ``fastapi.testclient.TestClient`` on a fresh temporary home
(its own SQLite file, no Redis) so an evaluation never touches a real deployment's edits.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol, Sequence

import httpx

from app.eval.datasets import EditCase

Mode = Literal["chat", "completion"]


class BackendError(RuntimeError):
    """The service answered with an error (its ``error.code`` and ``error.message``)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass
class EditOutcome:
    id: str
    fit_ms: float | None  # the method's own training time, as the service reports it
    wall_ms: float  # the whole POST /edits round trip seen by the client
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoreOutcome:
    logprob: float
    token_accuracy: float
    all_correct: bool
    edit_id: str | None = None
    similarity: float | None = None
    correct: list[bool] | None = None  # per-token flags when the service returns them


@dataclass
class AnswerOutcome:
    answer: str
    edit_id: str | None = None
    similarity: float | None = None
    latency_ms: float | None = None


class Backend(Protocol):
    """The few calls an evaluation needs; see :class:`ApiBackend` for the real ones."""

    def model_id(self) -> str: ...

    def edit(self, case: EditCase, method: str, config: dict[str, Any] | None = None) -> EditOutcome: ...

    def revert(self, edit_id: str) -> None: ...

    def score(self, pairs: Sequence[tuple[str, str]], mode: Mode) -> list[ScoreOutcome]: ...

    def answer(self, queries: Sequence[str], mode: Mode, max_new_tokens: int) -> list[AnswerOutcome]: ...

    def close(self) -> None: ...


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def edit_payload(case: EditCase, method: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """Only the edit itself: paraphrase and locality prompt stay unseen, they are the test."""
    body: dict[str, Any] = {"prompt": case.prompt, "target": case.target, "method": method}
    if case.subject:
        body["subject"] = case.subject
    if config:
        body["config"] = config
    return body


class ApiBackend:
    """The service's JSON API through any ``httpx.Client`` (a real one or a TestClient)."""

    def __init__(self, client: httpx.Client, key: str | None, *, batch: int = 32):
        self.client = client
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.batch = batch
        self._model: str | None = None

    # -- plumbing --------------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.client.request(method, path, headers=self.headers, **kwargs)
        if resp.status_code >= 400:
            code, message = "http_error", resp.text[:500]
            try:
                err = resp.json().get("error", {})
                code, message = err.get("code", code), err.get("message", message)
            except (ValueError, AttributeError):
                pass
            raise BackendError(resp.status_code, code, message)
        return resp.json() if resp.content else None

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health") or {}

    def model_id(self) -> str:
        if self._model is None:
            try:
                info = self.health()
            except BackendError:  # a degraded service answers 503 but still names its model below
                info = {}
            model = info.get("model")
            if isinstance(model, dict):
                model = model.get("name") or model.get("id")
            self._model = str(model or self._model_from_answer())
        return self._model

    def _model_from_answer(self) -> str:
        body = self.request("POST", "/answer", json={"queries": ["Hello"], "max_new_tokens": 1, "mode": "completion"})
        return body["results"][0].get("model", "unknown")

    # -- the calls -------------------------------------------------------------------------------
    def edit(self, case: EditCase, method: str, config: dict[str, Any] | None = None) -> EditOutcome:
        t0 = time.perf_counter()
        body = self.request("POST", "/edits", json=edit_payload(case, method, config))
        wall = (time.perf_counter() - t0) * 1000.0
        metrics = body.get("metrics") or {}
        fit = metrics.get("train_ms")
        return EditOutcome(body["id"], float(fit) if fit is not None else None, wall, metrics)

    def revert(self, edit_id: str) -> None:
        self.request("POST", f"/admin/edits/{edit_id}/revert")

    def score(self, pairs: Sequence[tuple[str, str]], mode: Mode) -> list[ScoreOutcome]:
        out: list[ScoreOutcome] = []
        for chunk in _chunks(list(pairs), self.batch):
            items = [{"prompt": p, "target": t} for p, t in chunk]
            body = self.request("POST", "/score", json={"items": items, "mode": mode})
            for r in body["results"]:
                out.append(ScoreOutcome(
                    logprob=float(r["logprob"]), token_accuracy=float(r["token_accuracy"]),
                    all_correct=bool(r["all_correct"]), edit_id=r.get("edit_id"),
                    similarity=r.get("similarity"), correct=r.get("correct"),
                ))
        return out

    def answer(self, queries: Sequence[str], mode: Mode, max_new_tokens: int) -> list[AnswerOutcome]:
        out: list[AnswerOutcome] = []
        for chunk in _chunks(list(queries), self.batch):
            body = self.request(
                "POST", "/answer", json={"queries": list(chunk), "max_new_tokens": max_new_tokens, "mode": mode}
            )
            for r in body["results"]:
                out.append(AnswerOutcome(r["answer"], r.get("edit_id"), r.get("similarity"), r.get("latency_ms")))
        return out

    def active_edit_ids(self) -> list[str]:
        ids, cursor = [], None
        while True:
            params: dict[str, Any] = {"status": "active", "limit": 100}
            if cursor:
                params["cursor"] = cursor
            body = self.request("GET", "/edits", params=params)
            ids += [item["id"] for item in body.get("items", [])]
            cursor = body.get("next_cursor")
            if not cursor:
                return ids

    def close(self) -> None:
        self.client.close()


class HttpBackend(ApiBackend):
    """A running service at ``url`` (``--url``); the key needs the admin role to revert."""

    def __init__(self, url: str, key: str | None, *, timeout: float = 600.0, batch: int = 32):
        super().__init__(httpx.Client(base_url=url.rstrip("/"), timeout=timeout), key, batch=batch)


def eval_settings(home: Path, admin_key: str, model: str | None = None, **overrides: Any):
    """Settings of a throwaway service: its own SQLite home, no Redis, one admin key.

    The model cache of the usual home is linked in, so the embedded model is not converted again.
    """
    from app.settings import Settings

    base = Settings()
    model = model or base.model
    # The model cache and the trained editors (method `ke`) of the usual home are linked in, so
    # the embedded model is not converted again and the served editor is the usual one.
    for folder in ("models", "editors"):
        cache = base.home / folder
        if cache.is_dir() and not (home / folder).exists():
            home.mkdir(parents=True, exist_ok=True)
            os.symlink(cache, home / folder, target_is_directory=True)
    return Settings(
        _env_file=None, home=home, model=model, device=base.device, dtype=base.dtype, database_url=None,
        redis_url=None, admin_key=admin_key, **overrides,
    )


class InProcessBackend(ApiBackend):
    """The app itself, served through ``TestClient`` on a temporary home removed at close."""

    def __init__(self, settings=None, *, model: str | None = None, batch: int = 32, **overrides: Any):
        from fastapi.testclient import TestClient

        from app.main import create_app

        self._tmp: Path | None = None
        if settings is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="factpatch-eval-"))
            key = "fp-eval-" + secrets.token_hex(16)
            settings = eval_settings(self._tmp, key, model, **overrides)
        key = settings.admin_key.get_secret_value() if settings.admin_key else None
        self.settings = settings
        try:
            self.app = create_app(settings)
            client = TestClient(self.app, raise_server_exceptions=False)
            client.__enter__()  # runs the app's startup (model load) now, not on the first call
        except BaseException:
            self._remove_home()
            raise
        super().__init__(client, key, batch=batch)

    def _remove_home(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def close(self) -> None:
        try:
            self.client.__exit__(None, None, None)
        finally:
            self._remove_home()
