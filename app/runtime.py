"""Build the model, store, selector memory and services once; ``app.main`` hands them to FastAPI."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.lm.engine import LM
from app.selector.memory import KeyMemory, build_memory
from app.services.answers import AnswerService
from app.services.calibrations import CalibrationService, DetectService
from app.services.deltas import DeltaCache
from app.services.edits import EditService
from app.services.jobs import JobRunner
from app.services.keys import KeyService
from app.services.memory_sync import MemorySync
from app.settings import Settings
from app.store import Database

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    lm: LM
    db: Database
    memory: KeyMemory
    selector: object
    sync: MemorySync
    deltas: DeltaCache
    keys: KeyService
    answers: AnswerService
    edits: EditService
    jobs: JobRunner
    calibrations: CalibrationService
    detect: DetectService
    admin_key_file: Path | None = None
    started_at: float = field(default_factory=time.time)
    extras: dict = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, *, lm: LM | None = None, selector=None, migrate: bool = True,
              start_jobs: bool = True) -> "Runtime":
        settings.home.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url(), settings.database_schema)
        if migrate:
            db.upgrade()
        keys = KeyService(db)
        admin_key_file = keys.bootstrap(settings)
        keys.refresh_known()  # verdicts that outlast a database outage
        if lm is None:
            lm = LM.load(settings.model, settings.home, settings.device, settings.dtype)
        if selector is None:
            from app.selector.router import DEFAULT_ENCODER, build_selector

            encoder = DEFAULT_ENCODER if settings.selector_encoder == "auto" else settings.selector_encoder
            selector = build_selector(lm, encoder, settings.selector_threshold)
        memory = build_memory(settings.redis_url, settings.redis_prefix)
        deltas = DeltaCache(db, lm)
        sync = MemorySync(db, memory, selector, deltas=deltas)
        answers = AnswerService(lm, selector, deltas)
        edits = EditService(db, lm, selector, sync, deltas, answers)
        jobs = JobRunner(db)
        calibrations = CalibrationService(db, lm, jobs)
        rt = cls(settings, lm, db, memory, selector, sync, deltas, keys, answers, edits, jobs, calibrations,
                 DetectService(lm), admin_key_file)
        from app.methods import base as methods

        for name in methods.names(edits_only=True):
            methods.get(name).prepare(lm, settings.home)  # e.g. the trained editor of `ke`
        sync.start()
        edits.restore_global()
        calibrations.start()
        if start_jobs:
            jobs.start()
        for hook in _START_HOOKS:
            hook(rt)
        return rt

    def close(self) -> None:
        for hook in _STOP_HOOKS:
            try:
                hook(self)
            except Exception:  # noqa: BLE001
                log.exception("shutdown hook failed")
        self.jobs.stop()
        self.calibrations.stop()
        self.sync.stop()
        self.memory.close()
        self.db.dispose()


# Features that run work in the background (jobs) register here to start and stop with the runtime.
_START_HOOKS: list = []
_STOP_HOOKS: list = []


def on_start(fn):
    _START_HOOKS.append(fn)
    return fn


def on_stop(fn):
    _STOP_HOOKS.append(fn)
    return fn
