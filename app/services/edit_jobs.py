"""Edits as jobs: queued by a replica, trained by whoever runs jobs, waited for or polled.

``submit`` refuses what it can before anything is queued (method and config, a replayed
Idempotency-Key, no live worker), then writes a ``queued`` job whose payload is the request and
the id the edit will get, and hands it to the runner (a worker through the queue, or this
process's job thread). The job id of a request with an Idempotency-Key is derived from the key,
so the same request sent to two replicas at once makes one job, which both wait for. ``wait``
follows the job row until it finishes: the stored edit, the error the training raised (same
status and code as when it runs in-process), or 504 ``edit_pending`` (the job goes on).

A job run again after its worker died finds its edit by the pre-chosen id when the first run got
as far as the commit, and returns it: no edit is stored twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError

from app.errors import Conflict, FactpatchError, Unavailable
from app.services.edits import CreateResult, EditInput, EditService
from app.services.jobs import JobRunner
from app.store import Database, EditRepo, JobRepo
from app.store.models import Edit, Job, new_id

log = logging.getLogger(__name__)

_KEY_NAMESPACE = uuid.UUID("6f0c4d1e-35a4-4b8e-9a63-0b7f64f0e8a1")


class EditPending(FactpatchError):
    status, code = 504, "edit_pending"


@dataclass
class Submitted:
    job: Job
    edit_id: str
    replayed: Edit | None = None  # the stored edit when the Idempotency-Key was used before
    attached: bool = False  # an earlier request with this Idempotency-Key queued the job


class EditJobs:
    JOB_KIND = "edit"

    def __init__(self, db: Database, edits: EditService, jobs: JobRunner, queue=None, sync=None,
                 poll_seconds: float = 0.05):
        self.db, self.edits, self.jobs, self.queue, self.sync = db, edits, jobs, queue, sync
        self.poll_seconds = poll_seconds
        jobs.register(self.JOB_KIND, self._run)

    # -- replicas ------------------------------------------------------------------------------
    def submit(self, req: EditInput, *, actor: str | None, idempotency_key: str | None) -> Submitted:
        self.edits.validate(req)
        if idempotency_key:
            with self.db.session() as s:
                existing = EditRepo(s).by_idempotency_key(idempotency_key)
            if existing is not None:
                if existing.request_hash != req.request_hash():
                    raise Conflict("this Idempotency-Key was used with a different request",
                                   code="idempotency_key_reused")
                return Submitted(job=None, edit_id=existing.id, replayed=existing)  # type: ignore[arg-type]
        self.require_workers()
        job_id = str(uuid.uuid5(_KEY_NAMESPACE, idempotency_key)) if idempotency_key else new_id()
        payload = {"edit_id": new_id(), "request": asdict(req), "request_hash": req.request_hash(),
                   "actor": actor, "idempotency_key": idempotency_key}
        try:
            with self.db.transaction() as s:
                job = JobRepo(s).add(Job(id=job_id, kind=self.JOB_KIND, status="queued", payload=payload,
                                         progress={}, result={}, attempts=0, created_by=actor))
        except IntegrityError:
            return self._attach(job_id, req)
        self.jobs.enqueue(job.id)
        return Submitted(job=job, edit_id=payload["edit_id"])

    def _attach(self, job_id: str, req: EditInput) -> Submitted:
        """A job for this Idempotency-Key exists: the same request waits for it (a failed one is
        queued again, as a repeated in-process request would train again); another is refused."""
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job.payload.get("request_hash") != req.request_hash():
                raise Conflict("this Idempotency-Key was used with a different request", code="idempotency_key_reused")
            if job.status == "failed":
                self.require_workers()  # before it is queued again: never a queued job without a message
        with self.db.transaction() as s:
            job = s.get(Job, job_id, with_for_update=True)
            again = job.status == "failed"
            if again:
                job.status, job.error, job.result, job.attempts = "queued", None, {}, 0
                job.started_at = job.finished_at = None
        if again:
            self.jobs.enqueue(job.id)
        return Submitted(job=job, edit_id=job.payload["edit_id"], attached=not again)

    def require_workers(self) -> None:
        """503 ``workers_unavailable`` when jobs go to workers and none is alive."""
        if self.queue is None:
            return
        try:
            alive = self.queue.workers()
        except Exception as exc:  # noqa: BLE001 - redis errors
            raise Unavailable("the job queue (Redis) is unavailable; the edit was not queued",
                              code="queue_unavailable") from exc
        if not alive:
            raise Unavailable("no training worker is running; the edit was not queued (start `factpatch worker`)",
                              code="workers_unavailable")

    def wait(self, submitted: Submitted, timeout: float) -> CreateResult:
        """The finished edit (also visible to this replica's answers when this returns), the job's
        error, or 504 ``edit_pending``."""
        if submitted.replayed is not None:
            return CreateResult(submitted.replayed, replayed=True)
        job_id = submitted.job.id
        deadline = time.monotonic() + timeout
        while True:
            with self.db.session() as s:
                job = JobRepo(s).get(job_id)
            if job.status == "succeeded":
                edit = self.edits.get(job.result["edit_id"])
                self._catch_up(edit)
                replayed = submitted.attached or edit.id != submitted.edit_id
                return CreateResult(edit, replayed=replayed)
            if job.status == "failed":
                raise _job_error(job)
            if time.monotonic() >= deadline:
                pending = EditPending(
                    f"the edit is still being trained (job {job_id}, {job.status}); poll GET /jobs/{job_id}, "
                    f"then GET /edits/{submitted.edit_id}",
                )
                pending.extra = {"job_id": job_id, "edit_id": submitted.edit_id}
                raise pending
            time.sleep(self.poll_seconds)

    def _catch_up(self, edit: Edit) -> None:
        """This replica's mirror holds what the worker committed before the caller hears of it
        (the pub/sub message usually got here first)."""
        if self.sync is None or edit.status != "active":
            return
        try:
            if edit.id not in set(self.sync.selector.edit_ids()):
                self.sync.ensure()
        except Exception as exc:  # noqa: BLE001 - the periodic check catches up
            log.warning("could not refresh the selector mirror after an edit: %s", type(exc).__name__)

    # -- whoever runs jobs ---------------------------------------------------------------------
    def _run(self, job: Job, progress) -> dict[str, Any]:
        p = job.payload
        req = EditInput(**p["request"])
        result = self.edits.create(req, actor=p.get("actor"), idempotency_key=p.get("idempotency_key"),
                                   edit_id=p["edit_id"])
        if result.edit.id != p["edit_id"]:  # the Idempotency-Key's edit, stored by an in-process request
            log.info("job %s: Idempotency-Key replayed edit %s", job.id, result.edit.id)
        return {"edit_id": result.edit.id, "replayed": result.replayed}


def _job_error(job: Job) -> FactpatchError:
    err = (job.result or {}).get("error") or {}
    code = err.get("code") or "job_failed"
    status = int(err.get("status") or 500)
    message = err.get("message") or job.error or "the job failed"
    return FactpatchError(message, code=code, status=status)
