"""Long work as jobs: rows in the database, run one at a time, with progress.

Two ways to run them. ``local`` (the default): this process's job thread picks queued rows; a job
left ``running`` by a process that died is re-queued at the next start (or marked failed after
``max_attempts``), and claiming a job is one conditional UPDATE, so two replicas never run the
same job. ``workers``: each job is also a message on the job queue (``app.services.queue``) and a
``factpatch worker`` runs it through ``run_job``, under a per-job claim that a dead worker's
connection gives up (a message for a job whose claim is held comes back later); the queue hands a dead worker's message to another worker, which runs the
job again while it has attempts left (``max_attempts`` = 2: one retry).

A failed job keeps its error as ``"code: message"`` in ``error`` and, for errors of the service,
``{"error": {"code", "message", "status"}}`` in ``result``, so a caller waiting for the job can
answer as if it had run the work itself.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from sqlalchemy import update

from app.errors import NotFound
from app.store import Database, JobRepo
from app.store.models import Job, utcnow

log = logging.getLogger(__name__)

Handler = Callable[[Job, Callable[[int, int, float], None]], dict[str, Any]]


class JobRunner:
    def __init__(self, db: Database, *, max_attempts: int = 2, poll_seconds: float = 1.0, queue=None):
        self.db = db
        self.queue = queue  # a JobQueue when jobs run on workers; None: this process's job thread
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self._handlers: dict[str, Handler] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, job_id: str) -> Job:
        """One job (404 ``job_not_found`` when there is none)."""
        with self.db.session() as s:
            job = JobRepo(s).get(job_id)
            if job is None:
                raise NotFound(f"no job {job_id}", code="job_not_found")
            return job

    def register(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="factpatch-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            # A running job stops at its next progress call (one training step).
            self._thread.join(timeout=60)

    def recover(self) -> list[str]:
        """Jobs a dead process left running: queue them again, or fail them after too many tries."""
        touched = []
        with self.db.transaction() as s:
            for job in JobRepo(s).unfinished():
                if job.status != "running":
                    continue
                touched.append(job.id)
                if job.attempts >= self.max_attempts:
                    job.status, job.error, job.finished_at = "failed", "interrupted by a restart too often", utcnow()
                else:
                    job.status, job.error = "queued", "re-queued after a restart"
        if touched:
            log.info("recovered %d interrupted jobs", len(touched))
        return touched

    def notify(self) -> None:
        self._wake.set()

    def enqueue(self, job_id: str) -> None:
        """Hand a job whose row is committed (``queued``) to whoever runs jobs: the queue's workers,
        or this process's job thread. When the queue cannot take it, the job is marked failed and
        the queue's error (503) propagates: no job stays queued without a message."""
        if self.queue is None:
            self.notify()
            return
        try:
            self.queue.send(job_id)
        except Exception:
            with self.db.transaction() as s:
                row = JobRepo(s).get(job_id)
                if row is not None and row.status == "queued":
                    row.status, row.error, row.finished_at = "failed", "the job queue was unavailable", utcnow()
            raise

    # -- work ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_next()
            except Exception:  # noqa: BLE001 - the loop must survive a broken database for a while
                log.exception("job loop error")
                ran = False
            if not ran:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def _claim(self) -> Job | None:
        with self.db.transaction() as s:
            candidates = s.query(Job).filter(Job.status == "queued").order_by(Job.created_at).limit(5).all()
            for job in candidates:
                if job.kind not in self._handlers:
                    continue
                claimed = s.execute(
                    update(Job).where(Job.id == job.id, Job.status == "queued")
                    .values(status="running", started_at=utcnow(), attempts=Job.attempts + 1)
                ).rowcount
                if claimed:
                    s.flush()
                    s.refresh(job)
                    return job
        return None

    def run_next(self) -> bool:
        job = self._claim()
        if job is None:
            return False
        return self._execute(job)

    def run_job(self, job_id: str) -> bool:
        """Run the job a queue message names (on a worker). The claim on ``job:<id>`` lives on its
        own database connection, so it is free again the moment a worker dies; a message for a job
        another live worker holds, or for a finished job, is dropped. A job found ``running``
        (its worker died) runs again while it has attempts left, else it fails. True when it ran."""
        with self.db.claim(f"job:{job_id}") as claimed:
            if not claimed:
                # A live worker runs it (its heartbeat was late, so the queue handed the message
                # on): look again later, so the job is not left without a message if that worker dies.
                log.info("job %s is held by another worker; checking again later", job_id)
                if self.queue is not None:
                    self.queue.send(job_id, delay_seconds=self.queue.heartbeat_seconds)
                return False
            with self.db.transaction() as s:
                job = s.get(Job, job_id, with_for_update=True)
                if job is None or job.status not in ("queued", "running"):
                    return False
                if job.kind not in self._handlers:
                    job.status, job.error, job.finished_at = "failed", f"no handler for jobs of kind {job.kind}", utcnow()
                    return False
                if job.attempts >= self.max_attempts:
                    log.warning("job %s (%s) was interrupted %d times; failed", job.id, job.kind, job.attempts)
                    job.status, job.finished_at = "failed", utcnow()
                    job.error = f"interrupted: its worker died {job.attempts} times"
                    job.result = {"error": {"code": "job_interrupted", "status": 503, "message": job.error}}
                    return False
                if job.status == "running":
                    log.warning("job %s (%s): its worker died; running it again", job.id, job.kind)
                job.status, job.started_at, job.attempts, job.error = "running", utcnow(), job.attempts + 1, None
                s.flush()
                s.refresh(job)
            return self._execute(job)

    def _execute(self, job: Job) -> bool:
        started = time.monotonic()
        last = [0.0]

        def progress(step: int, total: int, loss: float) -> None:
            if self._stop.is_set():
                raise JobInterrupted(job.id)
            now = time.monotonic()
            if now - last[0] < 0.5 and step < total:
                return
            last[0] = now
            elapsed = now - started
            eta = elapsed / step * (total - step) if step else None
            with self.db.transaction() as s:
                JobRepo(s).set_progress(job.id, {
                    "step": step, "total": total, "loss": None if loss != loss else round(loss, 5),
                    "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1),
                })

        try:
            result = self._handlers[job.kind](job, progress)
            status, error = "succeeded", None
        except JobInterrupted:
            log.info("job %s (%s) interrupted by shutdown; queued again", job.id, job.kind)
            with self.db.transaction() as s:
                row = JobRepo(s).get(job.id)
                row.status, row.error, row.started_at = "queued", "interrupted by shutdown; queued again", None
                row.attempts = max(0, row.attempts - 1)  # a shutdown is not a failed attempt
            if self.queue is not None:
                self.enqueue(job.id)
            return True
        except Exception as exc:  # noqa: BLE001 - a failed job is recorded, never raised
            log.exception("job %s (%s) failed", job.id, job.kind)
            result, status, error = _error_result(exc), "failed", _public_error(exc)
        with self.db.transaction() as s:
            row = JobRepo(s).get(job.id)
            row.status, row.error, row.result, row.finished_at = status, error, result or {}, utcnow()
        return True


class JobInterrupted(Exception):
    """Raised from a job's progress callback when the service is stopping: the job is queued
    again (its handler puts its own records back) instead of failing or staying `running`."""


def _error_result(exc: Exception) -> dict[str, Any]:
    from app.errors import FactpatchError

    if isinstance(exc, FactpatchError):
        return {"error": {"code": exc.code, "status": exc.status, "message": exc.message}}
    return {"error": {"code": "job_failed", "status": 500, "message": f"the job failed: {type(exc).__name__}"}}


def _public_error(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if code and message:
        return f"{code}: {message}"
    return f"{type(exc).__name__}"
