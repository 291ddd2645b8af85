"""The generation engine behind ``/answer`` (FACTPATCH_ENGINE): the local model, or a vLLM server.

With vLLM, the selector still routes every query here; the routed edit's delta is written once
as a PEFT LoRA adapter directory under ``home/adapters/<edit id>`` (``app.lm.peft_adapter``) and
registered with the server under the edit's id the first time an answer needs it. A check every
``poll_seconds`` unregisters adapters of this deployment's edits that are no longer active
(reverted or superseded, here or on another replica; other adapters on the server are left alone) and notices a server that restarted (it lists none of ours): they are
registered again as answers need them, and a request that names an adapter the server lost is
retried once after registering it again.

The local model stays loaded: edit training, scoring, detect and calibrate use it, and so does
``/answer`` while a calibration is active (calibrations are not LoRA adapters) or when the server
cannot be reached; ``status`` says which engine answers and why.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from app.lm.engines import AdapterMissing, EngineUnavailable, VLLMEngine

log = logging.getLogger(__name__)


class EngineService:
    def __init__(self, engine: VLLMEngine, lm, deltas, selector, home: Path, db=None, poll_seconds: float = 2.0):
        self.engine, self.lm, self.deltas, self.selector, self.db = engine, lm, deltas, selector, db
        self.dir = Path(home) / "adapters"
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # -- which engine answers ------------------------------------------------------------------
    def usable(self) -> tuple[bool, str | None]:
        """(True, None) when vLLM answers; else (False, why)."""
        if self.lm.global_keys():
            return False, "a calibration is active; calibrations are not LoRA adapters, the local model answers"
        if self.last_error:
            return False, self.last_error
        return True, None

    def status(self) -> dict:
        ok, why = self.usable()
        return {"kind": "vllm", "url": self.engine.url, "answering": "vllm" if ok else "local",
                **({"reason": why} if why else {}), "adapters_registered": len(self.engine._loaded)}

    # -- adapters ------------------------------------------------------------------------------
    def adapter_dir(self, edit_id: str) -> Path:
        """The edit's adapter directory, written once (from the delta the answer path serves)."""
        from app.lm.peft_adapter import to_peft

        path = self.dir / edit_id
        if (path / "adapter_config.json").exists():
            return path
        delta = self.deltas.get(edit_id)
        if delta is None:
            raise EngineUnavailable(f"edit {edit_id} has no delta to export")
        tmp = self.dir / f".{edit_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, data in to_peft(delta, self.lm).files().items():
            (tmp / name).write_bytes(data)
        try:
            tmp.rename(path)
        except OSError:  # written meanwhile by another thread
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def ensure(self, edit_id: str) -> None:
        if not self.engine.is_loaded(edit_id):
            self.engine.load_adapter(edit_id, self.adapter_dir(edit_id).resolve())

    def generate_edited(self, prompts, target: str, *, edit_id: str | None, max_new_tokens: int, mode: str,
                        end: str | None = None, heads_from=None):
        """The engine's answers; one retry when the server lost the adapter (it restarted)."""
        for attempt in (0, 1):
            try:
                if edit_id:
                    self.ensure(edit_id)
                out = self.engine.generate_edited(prompts, target, adapter=edit_id, max_new_tokens=max_new_tokens,
                                                  mode=mode, end=end, heads_from=heads_from)
                self.last_error = None
                return out
            except AdapterMissing:
                if attempt:
                    raise
                log.warning("vLLM lost adapter %s (restarted?); registering the active edits again", edit_id)
                self.engine.forget()

    # -- background check ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, name="factpatch-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self.engine.close()

    def check(self) -> None:
        """Unregister adapters of edits that are no longer active; notice a restarted server."""
        try:
            on_server = self.engine.loaded_adapters()
        except EngineUnavailable as exc:
            self.last_error = str(exc)
            return
        self.last_error = None
        with self.engine._lock:
            ours = set(self.engine._loaded)
        if ours and not (ours & on_server):
            log.warning("vLLM lists none of our %d adapters (restarted?); they are registered again on use", len(ours))
            self.engine.forget()
            ours = set()
        active = set(self.selector.edit_ids())
        # Ours that are no longer active, and those another replica of this deployment registered
        # for edits it has since reverted; adapters of other users of the server are left alone.
        stale = (ours - active) | self._inactive_edits(on_server - ours - active)
        for edit_id in stale:
            try:
                self.engine.unload_adapter(edit_id)
            except EngineUnavailable as exc:
                log.warning("could not unregister adapter %s: %s", edit_id, exc)
            shutil.rmtree(self.dir / edit_id, ignore_errors=True)

    def _inactive_edits(self, names: set[str]) -> set[str]:
        """The names that are edits of this deployment's database and not active."""
        if not names or self.db is None:
            return set()
        from sqlalchemy import select

        from app.store.models import Edit

        with self.db.session() as s:
            return set(s.scalars(select(Edit.id).where(Edit.id.in_(sorted(names)), Edit.status != "active")))

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the next check tries again
                log.warning("engine check failed: %s", type(exc).__name__)
