"""Build the model, store, selector memory and services once; ``app.main`` hands them to FastAPI."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.lm.engine import LM
from app.selector.memory import KeyMemory, build_memory
from app.services.adapters import AdapterService
from app.services.answers import AnswerService
from app.services.calibrations import CalibrationService
from app.services.completions import CompletionService
from app.services.detect import DetectService
from app.services.deltas import DeltaCache
from app.services.edit_jobs import EditJobs
from app.services.edits import EditService
from app.services.jobs import JobRunner
from app.services.keys import KeyService
from app.services.global_deltas import GlobalDeltaSync
from app.services.memory_sync import MemorySync
from app.services.repairs import RepairService
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
    edit_jobs: EditJobs
    queue: object | None = None  # the job queue to the workers (FACTPATCH_TRAINING=workers)
    admin_key_file: Path | None = None
    started_at: float = field(default_factory=time.time)
    extras: dict = field(default_factory=dict)
    repairs: RepairService | None = None
    globals: GlobalDeltaSync | None = None  # the deltas every query goes through, kept equal to the database

    @classmethod
    def build(cls, settings: Settings, *, lm: LM | None = None, selector=None, migrate: bool = True,
              start_jobs: bool = True, worker: bool = False) -> "Runtime":
        """``worker``: a ``factpatch worker`` process (runs queued jobs, see ``run_worker``); with
        FACTPATCH_TRAINING=workers an API replica runs no jobs itself."""
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
        engine = None
        if settings.engine == "vllm" and not worker:
            from app.lm.engines import VLLMEngine
            from app.services.engine import EngineService

            engine = EngineService(VLLMEngine(settings.vllm_url, lm, model=settings.vllm_model), lm, deltas, selector,
                                   settings.home, db=db)
        answers = AnswerService(lm, selector, deltas, engine=engine, chat_end=settings.edited_chat_end)
        globals_ = GlobalDeltaSync(db, lm)  # calibrations, repairs and global edits, on every replica
        edits = EditService(db, lm, selector, sync, deltas, answers, globals_)
        queue = None
        if settings.uses_workers:
            from app.services.queue import JobQueue

            queue = JobQueue(settings.redis_url, settings.redis_prefix,
                             heartbeat_seconds=settings.worker_heartbeat_seconds)
        jobs = JobRunner(db, queue=queue)
        calibrations = CalibrationService(db, lm, jobs, globals_)
        edit_jobs = EditJobs(db, edits, jobs, queue=queue, sync=sync)
        rt = cls(settings, lm, db, memory, selector, sync, deltas, keys, answers, edits, jobs, calibrations,
                 DetectService(lm), edit_jobs, queue, admin_key_file)
        from app.methods import base as methods

        for name in methods.names(edits_only=True):
            methods.get(name).prepare(lm, settings.home)  # e.g. the trained editor of `ke`
        rt.repairs = RepairService(db, lm, jobs, edits, answers, deltas, globals_)
        rt.globals = globals_
        sync.start()
        globals_.start()
        if engine is not None:
            engine.start()
        if start_jobs and queue is None and not worker:
            jobs.start()
        for hook in _START_HOOKS:
            hook(rt)
        return rt

    @property
    def adapters(self) -> AdapterService:
        """Edits as PEFT LoRA adapters (stateless: reads the database and the model's structure)."""
        return AdapterService(self.db, self.lm)

    @property
    def completions(self) -> CompletionService:
        """The OpenAI-compatible completions, served by the answer path."""
        return CompletionService(self.answers, self.lm)

    def close(self) -> None:
        for hook in _STOP_HOOKS:
            try:
                hook(self)
            except Exception:  # noqa: BLE001
                log.exception("shutdown hook failed")
        self.jobs.stop()
        if self.answers.engine is not None:
            self.answers.engine.stop()
        if self.globals is not None:
            self.globals.stop()
        self.sync.stop()
        if self.queue is not None:
            self.queue.close()
        self.memory.close()
        self.db.dispose()


def run_worker(rt: Runtime, stop) -> None:
    """A ``factpatch worker``: run the jobs the queue hands this process, one at a time, until
    ``stop`` (a threading.Event) is set; the running job finishes first."""
    if rt.queue is None:
        raise ValueError("a worker needs FACTPATCH_TRAINING=workers (and FACTPATCH_REDIS_URL)")
    rt.queue.consume(rt.jobs.run_job, stop)


# Features that run work in the background (jobs) register here to start and stop with the runtime.
_START_HOOKS: list = []
_STOP_HOOKS: list = []


def on_start(fn):
    _START_HOOKS.append(fn)
    return fn


def on_stop(fn):
    _STOP_HOOKS.append(fn)
    return fn
