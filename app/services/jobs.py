"""Long work as jobs: rows in the database, run one at a time by a worker thread, with progress.

A job left ``running`` by a process that died is re-queued at the next start (or marked failed
after ``max_attempts``), so no job stays "running" forever. Claiming a job is one conditional
UPDATE, so two replicas never run the same job.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from sqlalchemy import update

from app.store import Database, JobRepo
from app.store.models import Job, utcnow

log = logging.getLogger(__name__)

Handler = Callable[[Job, Callable[[int, int, float], None]], dict[str, Any]]


class JobRunner:
    def __init__(self, db: Database, *, max_attempts: int = 2, poll_seconds: float = 1.0):
        self.db = db
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self._handlers: dict[str, Handler] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
            return True
        except Exception as exc:  # noqa: BLE001 - a failed job is recorded, never raised
            log.exception("job %s (%s) failed", job.id, job.kind)
            result, status, error = {}, "failed", _public_error(exc)
        with self.db.transaction() as s:
            row = JobRepo(s).get(job.id)
            row.status, row.error, row.result, row.finished_at = status, error, result or {}, utcnow()
        return True


class JobInterrupted(Exception):
    """Raised from a job's progress callback when the service is stopping: the job is queued
    again (its handler puts its own records back) instead of failing or staying `running`."""


def _public_error(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if code and message:
        return f"{code}: {message}"
    return f"{type(exc).__name__}"
