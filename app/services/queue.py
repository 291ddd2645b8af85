"""The job queue between API replicas and ``factpatch worker`` processes: Dramatiq on Redis.

A message carries one job id (JSON, never pickle); the job itself is a database row
(``app.services.jobs``). Dramatiq's Redis broker keeps each fetched message in the fetching
worker's ack set until the job returns, and every worker process beats its heartbeat into Redis
about once a second (its delay-queue consumer polls even while the job thread is busy). When a
worker is silent for ``worker_heartbeat_seconds`` (killed, its machine gone), the next queue
maintenance puts its unacknowledged messages back on the queue, and another worker runs the job
again (``JobRunner.run_job`` caps that at one retry). Maintenance runs on every queue command, so
a dead worker's job is back within about a second of its heartbeat expiring.

Each worker takes one message at a time (prefetch 1), so a queued job never waits behind a busy
worker while another is idle. Workers also register themselves under
``<prefix>:workers:<id>`` with the same expiry, so replicas can tell callers at once when no
worker is alive (503 ``workers_unavailable``) and ``/health`` can count them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

log = logging.getLogger(__name__)

QUEUE_NAME = "jobs"
ACTOR_NAME = "factpatch_job"
_ALWAYS = 1_000_000  # dramatiq's maintenance scale: maintenance on every queue command


class JobQueue:
    """Sends job ids to the workers (replicas) and consumes them (workers)."""

    def __init__(self, redis_url: str, prefix: str, *, heartbeat_seconds: float = 15.0):
        import redis
        from dramatiq.brokers.redis import RedisBroker

        self.prefix = prefix
        self.heartbeat_seconds = heartbeat_seconds
        self.broker = RedisBroker(
            url=redis_url, namespace=f"{prefix}:queue", middleware=[],
            heartbeat_timeout=int(heartbeat_seconds * 1000), maintenance_chance=_ALWAYS,
        )
        self._run = None  # the worker's job function
        self.actor = self._declare()
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=3)

    def _declare(self):
        from dramatiq import Actor

        def run(job_id: str) -> None:
            if self._run is None:  # pragma: no cover - only workers consume
                raise RuntimeError("this process does not run jobs")
            self._run(job_id)

        run.__module__ = __name__
        return Actor(run, broker=self.broker, actor_name=ACTOR_NAME, queue_name=QUEUE_NAME, priority=0,
                     options={"max_retries": 0})

    # -- replicas ------------------------------------------------------------------------------
    def send(self, job_id: str, *, delay_seconds: float | None = None) -> None:
        """Put one job on the queue (after ``delay_seconds``); 503 ``queue_unavailable`` when
        Redis does not take it."""
        from app.errors import Unavailable

        try:
            delay = int(delay_seconds * 1000) if delay_seconds else None
            self.actor.send_with_options(args=(job_id,), delay=delay)
        except Exception as exc:  # noqa: BLE001 - redis errors, connection or timeout
            raise Unavailable("the job queue (Redis) is unavailable; nothing was queued",
                              code="queue_unavailable") from exc

    def workers(self) -> list[dict]:
        """Workers whose heartbeat is fresh: ``{"id", "host", "pid", "job"}`` each."""
        out = []
        keys = list(self.redis.scan_iter(f"{self.prefix}:workers:*", count=100))
        for raw in self.redis.mget(keys) if keys else []:
            if raw:
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    continue
        return out

    def close(self) -> None:
        try:
            self.broker.close()
        finally:
            self.redis.close()

    # -- workers -------------------------------------------------------------------------------
    def consume(self, run, stop: threading.Event) -> None:
        """Run jobs with ``run(job_id)`` until ``stop`` is set, one at a time, beating the heartbeat;
        then finish the running job and return (the prefetched none: prefetch is 1)."""
        from dramatiq import Worker

        self._run = run
        worker = Worker(self.broker, worker_threads=1)
        worker.queue_prefetch = 1  # take a message only when idle
        me = {"id": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(), "job": None}
        key = f"{self.prefix}:workers:{me['id']}"
        ttl_ms = int(self.heartbeat_seconds * 1000)

        def beat() -> None:
            try:
                self.redis.set(key, json.dumps(me), px=ttl_ms)
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                log.warning("worker heartbeat failed: %s", type(exc).__name__)

        def running(job_id: str) -> None:
            me["job"] = job_id
            beat()
            try:
                run(job_id)
            finally:
                me["job"] = None
                beat()

        self._run = running
        worker.start()
        log.info("worker %s consuming %s:queue", me["id"], self.prefix)
        try:
            beat()
            while not stop.wait(min(1.0, self.heartbeat_seconds / 3)):
                beat()
        finally:
            worker.stop(timeout=int(3600 * 1000))
            try:
                self.redis.delete(key)
            except Exception:  # noqa: BLE001 - it expires anyway
                pass


def wait_for_workers(queue: JobQueue, n: int = 1, timeout: float = 60.0) -> bool:
    """True once ``n`` workers are alive (used by start-up scripts and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(queue.workers()) >= n:
            return True
        time.sleep(0.2)
    return False
