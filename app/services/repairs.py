"""Repairs as background jobs: find which trained facts (calibration facts, edits) caused reported
failures, and erase them with a new delta on top of the calibration.

``apply: false`` (the default) stores the report only. An applied repair's deltas are global
deltas of the engine (``repair:<id>:<calibration id>``) while the repair and its calibration are
active; the edits among its causes are reverted through the edit service. Reverting the repair
takes its deltas off and reinstates those edits. Every step is an audit event.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from app.delta import Delta
from app.errors import Conflict, NotFound, Unprocessable
from app.knowledge import Fact, KnowledgeError
from app.knowledge.facts import resolve
from app.lm.engine import LM
from app.methods.repair.config import RepairConfig
from app.services.global_deltas import GlobalDeltaSync
from app.services.jobs import JobInterrupted, JobRunner
from app.store import AuditRepo, CalibrationRepo, Database, EditRepo, JobRepo, RepairRepo
from app.store.models import Job, Repair, utcnow

log = logging.getLogger(__name__)

MAX_FAILURES = 500
MAX_SCOPE_IDS = 1000


def _config_error(exc: ValidationError) -> Unprocessable:
    first = exc.errors()[0]
    return Unprocessable(f"config.{'.'.join(map(str, first['loc']))}: {first['msg']}", code="invalid_config")


PREFIX = "repair:"


class RepairService:
    JOB_KIND = "repair"

    def __init__(self, db: Database, lm: LM, jobs: JobRunner, edits, answers, deltas, globals: GlobalDeltaSync):
        self.db = db
        self.lm = lm
        self.jobs = jobs
        self.edits = edits
        self.answers = answers
        self.deltas = deltas
        self.globals = globals
        globals.register(PREFIX, self._active)
        jobs.register(self.JOB_KIND, self._run)

    def _active(self, session) -> dict[str, Any]:
        """The active repairs of active calibrations, each key with a loader of its delta."""
        return {f"{PREFIX}{r}:{c}": (lambda r=r, c=c: self._load(r, c)) for r, c in RepairRepo(session).active_delta_keys()}

    def _load(self, repair_id: str, cal_id: str) -> Delta | None:
        with self.db.session() as s:
            data = RepairRepo(s).delta_data(repair_id, cal_id)
        return Delta.from_bytes(data) if data else None

    def sync_active(self) -> None:
        """Make the engine's repair deltas equal the active repairs of active calibrations."""
        self.globals.sync(PREFIX)

    # -- create / read / revert ----------------------------------------------------------------
    def create(self, request: dict[str, Any], *, actor: str | None) -> tuple[Repair, Job]:
        """``request``: failures (facts as dicts or {prompt, target}), scope, identify, treatment,
        apply and config, validated here before anything is stored."""
        raw_config = dict(request.get("config") or {})
        for key in ("identify", "treatment"):
            if request.get(key) is not None:
                raw_config[key] = request[key]
        try:
            config = RepairConfig.model_validate(raw_config)
        except ValidationError as exc:
            raise _config_error(exc) from None
        failures = request.get("failures") or []
        if not failures:
            raise Unprocessable("at least one failure is needed", code="no_failures")
        if len(failures) > MAX_FAILURES:
            raise Unprocessable(f"at most {MAX_FAILURES} failures", code="too_many_failures")
        for i, f in enumerate(failures):
            if "prompt" in f:
                continue
            try:
                resolve(_fact(f), need_negatives=False)
            except KnowledgeError as exc:
                raise Unprocessable(f"failures[{i}]: {exc.message}", code=exc.code) from None
        scope = request.get("scope") or {}
        cal_scope, edit_scope = scope.get("calibrations", "all"), scope.get("edits", "all")
        with self.db.session() as s:
            if isinstance(cal_scope, list):
                for cid in cal_scope:
                    cal = CalibrationRepo(s).get(cid)
                    if cal is None:
                        raise NotFound(f"no calibration {cid}", code="calibration_not_found")
                    if cal.status != "active":
                        raise Conflict(f"calibration {cid} is {cal.status}, not active", code="calibration_not_active")
            if isinstance(edit_scope, list):
                for eid in edit_scope:
                    edit = EditRepo(s).get(eid)
                    if edit is None:
                        raise NotFound(f"no edit {eid}", code="edit_not_found")
                    if edit.status != "active":
                        raise Conflict(f"edit {eid} is {edit.status}, not active", code="edit_not_active")
        stored = {"failures": failures, "scope": {"calibrations": cal_scope, "edits": edit_scope},
                  "config": config.model_dump()}
        with self.db.transaction() as s:
            job = JobRepo(s).add(Job(kind=self.JOB_KIND, status="queued", payload={}, progress={}, result={},
                                     attempts=0, created_by=actor))
            rep = RepairRepo(s).add(Repair(job_id=job.id, status="queued", apply=bool(request.get("apply")),
                                           request=stored, result={}, reverted_edits=[], created_by=actor))
            job.payload = {"repair_id": rep.id}
            AuditRepo(s).record(actor=actor, action="repair.create", entity_type="repair", entity_id=rep.id,
                                n_failures=len(failures), apply=rep.apply, job_id=job.id)
        self.jobs.enqueue(job.id)
        return rep, job

    def get(self, repair_id: str) -> tuple[Repair, Job | None]:
        with self.db.session() as s:
            rep = RepairRepo(s).get(repair_id)
            if rep is None:
                raise NotFound(f"no repair {repair_id}", code="repair_not_found")
            job = JobRepo(s).get(rep.job_id) if rep.job_id else None
            return rep, job

    def revert(self, repair_id: str, *, actor: str | None) -> Repair:
        with self.db.transaction() as s:
            rep = RepairRepo(s).get(repair_id)
            if rep is None:
                raise NotFound(f"no repair {repair_id}", code="repair_not_found")
            if rep.status == "reverted":
                return rep
            if rep.status in ("queued", "running"):
                previous = rep.status
                rep.status, rep.updated_at = "reverted", utcnow()
                AuditRepo(s).record(actor=actor, action="repair.revert", entity_type="repair", entity_id=rep.id,
                                    previous_status=previous)
                edits_back: list[str] = []
            elif rep.status != "active":
                raise Conflict(f"repair {repair_id} is {rep.status}; only an applied repair can be reverted",
                               code="repair_not_applied")
            else:
                rep.status, rep.updated_at = "reverted", utcnow()
                AuditRepo(s).record(actor=actor, action="repair.revert", entity_type="repair", entity_id=rep.id,
                                    previous_status="active")
                edits_back = list(rep.reverted_edits or [])
        self.sync_active()
        for eid in edits_back:
            try:
                self.edits.reinstate(eid, actor=actor, reason=f"revert of repair {repair_id}")
            except Conflict as exc:
                log.info("edit %s not reinstated: %s", eid, exc)
        return self.get(repair_id)[0]

    # -- the job -------------------------------------------------------------------------------
    def _run(self, job: Job, progress) -> dict[str, Any]:
        from app.methods.repair.method import (
            Failure, RepairError, ScopedCalibration, ScopedEdit, build_questions, repair,
        )

        rep_id = job.payload["repair_id"]
        with self.db.transaction() as s:
            rep = RepairRepo(s).get(rep_id)
            if rep.status == "reverted":
                return {"skipped": "reverted before it ran"}
            rep.status = "running"
            request = dict(rep.request)
            apply = rep.apply
        config = RepairConfig.model_validate(request["config"])
        try:
            failures = [Failure(prompt=f["prompt"], target=f["target"]) if "prompt" in f else Failure(fact=_fact(f))
                        for f in request["failures"]]
            scope = request["scope"]
            with self.db.session() as s:
                active_cals = CalibrationRepo(s).active()
                in_scope = [c for c in active_cals
                            if scope["calibrations"] == "all" or c.id in set(scope["calibrations"])]
                calibrations = [ScopedCalibration(c.id, Delta.from_bytes(c.delta), [_fact(f) for f in c.facts])
                                for c in in_scope if c.delta is not None]
                background = [Delta.from_bytes(c.delta) for c in active_cals
                              if c.delta is not None and c not in in_scope]
                background += [Delta.from_bytes(d.data) for d in RepairRepo(s).active_deltas()]
                if scope["edits"] == "all":
                    edit_ids = [e.id for e in EditRepo(s).active_with_keys()]
                else:
                    edit_ids = [e for e in scope["edits"] if (row := EditRepo(s).get(e)) is not None and row.status == "active"]
            questions = build_questions(self.lm, failures, config.seed)
            routes = [r.edit_id for r in self.answers.route([q.text for q in questions])]
            edit_deltas = {}
            for eid in set(edit_ids) | {r for r in routes if r}:
                d = self.deltas.get(eid)
                if d is not None:
                    edit_deltas[eid] = d
            edits = [ScopedEdit(e, edit_deltas[e]) for e in edit_ids if e in edit_deltas]
            if not calibrations and not edits:
                raise RepairError("nothing in scope: no active calibration or edit", "empty_scope")
            outcome = repair(self.lm, questions, calibrations, edits, background=background, routes=routes,
                             edit_deltas=edit_deltas, config=config, progress=progress)
        except Exception as exc:
            with self.db.transaction() as s:
                row = RepairRepo(s).get(rep_id)
                if row.status == "running":
                    row.status = "queued" if isinstance(exc, JobInterrupted) else "failed"
                    if isinstance(exc, RepairError):
                        row.result = {"error": {"code": exc.code, "message": exc.message}}
            raise
        result = {
            "causes": [c.to_dict() for c in outcome.causes[: config.max_causes_reported]],
            "treated": [c.to_dict() for c in outcome.treated],
            "reverted_edits": outcome.reverted_edits,
            **outcome.report,
        }
        with self.db.transaction() as s:
            row = RepairRepo(s).get(rep_id, with_deltas=True)
            row.result = result
            if row.status == "reverted":
                return {"skipped": "reverted while running"}
            for cid, delta in outcome.deltas.items():
                RepairRepo(s).add_delta(row, calibration_id=cid, kind=delta.kind, data=delta.to_bytes())
            row.status = "active" if apply else "reported"
            row.updated_at = utcnow()
            AuditRepo(s).record(actor="system", action="repair.apply" if apply else "repair.report",
                                entity_type="repair", entity_id=rep_id, treated=len(outcome.treated),
                                deltas=sorted(outcome.deltas), reverted_edits=outcome.reverted_edits)
        if apply:
            done = []
            for eid in outcome.reverted_edits:
                try:
                    self.edits.revert(eid, actor=f"repair:{rep_id}"[:64])
                    done.append(eid)
                except NotFound:
                    pass
            with self.db.transaction() as s:
                RepairRepo(s).get(rep_id).reverted_edits = done
            self.sync_active()
        return {"repair_id": rep_id, "treated": len(outcome.treated)}


def _fact(f: dict[str, Any]) -> Fact:
    return Fact(subject=f.get("subject", ""), object=f.get("object", ""), relation=f.get("relation") or None,
                template=f.get("template") or None, negatives=tuple(f.get("negatives") or ()))


__all__ = ["RepairService", "MAX_FAILURES"]
