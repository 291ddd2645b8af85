"""Calibrate facts in bulk (CaliNet) as background jobs.

A calibration is queued as a job; on success its slots are stored as a Delta in the database and
become active for every answer (a global delta of the engine). Revert turns it off. Replicas pick
up calibrations activated or reverted elsewhere by polling the small set of active ids.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from pydantic import ValidationError

from app.delta import Delta
from app.errors import NotFound, Unprocessable
from app.knowledge import Fact, KnowledgeError
from app.knowledge.cka import validate_facts
from app.lm.engine import LM
from app.methods.calinet.config import CaliNetConfig
from app.services.global_deltas import GlobalDeltaSync
from app.services.jobs import JobInterrupted, JobRunner
from app.store import AuditRepo, CalibrationRepo, Database, JobRepo
from app.store.models import Calibration, Job, utcnow

log = logging.getLogger(__name__)

MAX_CALIBRATION_FACTS = 1000


def _as_422(exc: KnowledgeError) -> Unprocessable:
    return Unprocessable(exc.message, code=exc.code)


PREFIX = "calibration:"


class CalibrationService:
    JOB_KIND = "calibration"

    def __init__(self, db: Database, lm: LM, jobs: JobRunner, globals: GlobalDeltaSync):
        self.db = db
        self.lm = lm
        self.jobs = jobs
        self.globals = globals
        globals.register(PREFIX, self._active)
        jobs.register(self.JOB_KIND, self._run)

    def _active(self, session) -> dict[str, Any]:
        """The active calibrations, each key with a loader of its delta (for the global delta sync)."""
        return {PREFIX + cal_id: (lambda cal_id=cal_id: self._load(cal_id)) for cal_id in CalibrationRepo(session).active_ids()}

    def _load(self, cal_id: str) -> Delta | None:
        with self.db.session() as s:
            data = CalibrationRepo(s).delta_data(cal_id)
        return Delta.from_bytes(data) if data else None

    def sync_active(self) -> None:
        """Make the engine's calibration deltas equal the active calibrations in the database (at
        once here; every replica follows within the sync's poll interval)."""
        self.globals.sync(PREFIX)

    # -- create / read / revert ----------------------------------------------------------------
    def create(self, facts: list[Fact], raw_config: dict[str, Any], *, actor: str | None) -> tuple[Calibration, Job]:
        try:
            config = CaliNetConfig.model_validate(raw_config or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise Unprocessable(f"config.{'.'.join(map(str, first['loc']))}: {first['msg']}", code="invalid_config") from None
        try:
            validate_facts(facts, max_facts=min(MAX_CALIBRATION_FACTS, config.max_facts))
            config.resolve_layer(self.lm.arch.num_layers)
        except KnowledgeError as exc:
            raise _as_422(exc) from None
        except ValueError as exc:
            raise Unprocessable(str(exc), code="invalid_config") from None
        with self.db.transaction() as s:
            job = JobRepo(s).add(Job(kind=self.JOB_KIND, status="queued", payload={}, progress={}, result={},
                                     attempts=0, created_by=actor))
            cal = CalibrationRepo(s).add(Calibration(
                job_id=job.id, status="queued", facts=[asdict(f) for f in facts], config=config.model_dump(),
                metrics={}, created_by=actor,
            ))
            job.payload = {"calibration_id": cal.id}
            AuditRepo(s).record(actor=actor, action="calibration.create", entity_type="calibration",
                                entity_id=cal.id, n_facts=len(facts), job_id=job.id)
        self.jobs.enqueue(job.id)
        return cal, job

    def get(self, cal_id: str) -> tuple[Calibration, Job | None]:
        with self.db.session() as s:
            cal = CalibrationRepo(s).get(cal_id)
            if cal is None:
                raise NotFound(f"no calibration {cal_id}", code="calibration_not_found")
            job = JobRepo(s).get(cal.job_id) if cal.job_id else None
            return cal, job

    def list(self, *, status: str | None, limit: int, cursor: str | None):
        from app.store.repos import BadCursor

        with self.db.session() as s:
            try:
                return CalibrationRepo(s).list(status=status, limit=limit, cursor=cursor)
            except BadCursor as exc:
                raise Unprocessable(str(exc), code="invalid_cursor") from exc

    def revert(self, cal_id: str, *, actor: str | None) -> Calibration:
        with self.db.transaction() as s:
            cal = CalibrationRepo(s).get(cal_id)
            if cal is None:
                raise NotFound(f"no calibration {cal_id}", code="calibration_not_found")
            if cal.status != "reverted":
                previous = cal.status
                cal.status, cal.updated_at = "reverted", utcnow()
                AuditRepo(s).record(actor=actor, action="calibration.revert", entity_type="calibration",
                                    entity_id=cal.id, previous_status=previous)
        self.sync_active()
        return self.get(cal_id)[0]

    # -- the job -------------------------------------------------------------------------------
    def _run(self, job: Job, progress) -> dict[str, Any]:
        from app.methods.calinet.method import calibrate

        cal_id = job.payload["calibration_id"]
        with self.db.transaction() as s:
            cal = CalibrationRepo(s).get(cal_id)
            if cal.status == "reverted":
                return {"skipped": "reverted before it ran"}
            cal.status = "running"
            facts = [Fact(**{**f, "negatives": tuple(f.get("negatives") or ())}) for f in cal.facts]
            config = CaliNetConfig.model_validate(cal.config)
        try:
            result = calibrate(self.lm, facts, config, progress)
        except Exception as exc:
            # Interrupted by shutdown: queued again with its job; any other error: failed.
            with self.db.transaction() as s:
                row = CalibrationRepo(s).get(cal_id)
                if row.status == "running":
                    row.status = "queued" if isinstance(exc, JobInterrupted) else "failed"
            raise
        data = result.delta.to_bytes()
        with self.db.transaction() as s:
            row = CalibrationRepo(s).get(cal_id)
            if row.status == "reverted":  # reverted while training: store the result, never activate
                row.metrics = result.metrics
                return {"skipped": "reverted while running"}
            row.status, row.metrics = "active", result.metrics
            row.delta_kind, row.delta, row.delta_size_bytes = result.delta.kind, data, len(data)
            row.delta_sha256 = Delta.sha256(data)
            AuditRepo(s).record(actor="system", action="calibration.activate", entity_type="calibration",
                                entity_id=cal_id, slots=result.metrics.get("slots"))
        self.sync_active()
        return {"calibration_id": cal_id, "steps": result.steps}
