"""Where selector keys are shared: Redis (several replicas) or an in-process store (one replica).

Both keep, per active edit, its key vectors (safetensors bytes: ``keys`` and, when the edit has
them, its relation keys ``relation``), key texts, subject, scope and encoder name, plus a version
number bumped by every change. Redis also carries a pub/sub channel so that
replicas learn of each change at once; a periodic check of the version and the set of edit ids
(``state``, one round trip) catches anything missed, and a missing version (Redis flushed or
restarted empty) tells the service to rebuild from the database.
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class StoredKeys:
    """One edit's keys as stored: a JSON meta (encoder, texts, subject, scope) beside the vectors.

    ``vectors`` is safetensors bytes holding the float32 tensor ``keys`` [n, d] and, for an edit
    keyed with relation keys, ``relation`` [m, d] (see ``app.services.memory_sync``). Data written
    before scopes existed has neither ``scope`` nor ``relation``: it reads as scope ``fact``."""

    edit_id: str
    encoder: str
    texts: list[str]
    subject: str | None
    vectors: bytes
    scope: str = "fact"

    def meta_json(self) -> str:
        return json.dumps({"encoder": self.encoder, "texts": self.texts, "subject": self.subject, "scope": self.scope})

    @classmethod
    def from_parts(cls, edit_id: str, meta: str | bytes, vectors: bytes) -> "StoredKeys":
        m = json.loads(meta)
        return cls(edit_id, m["encoder"], m["texts"], m.get("subject"), vectors, m.get("scope") or "fact")


Event = dict  # {"op": "add" | "remove" | "reload", "edit_id": str | None, "version": int}


class KeyMemory(ABC):
    kind: str

    @abstractmethod
    def put(self, rec: StoredKeys) -> int: ...

    @abstractmethod
    def delete(self, edit_id: str) -> int: ...

    @abstractmethod
    def get(self, edit_id: str) -> StoredKeys | None: ...

    @abstractmethod
    def all(self) -> list[StoredKeys]: ...

    @abstractmethod
    def version(self) -> int | None:
        """Current version; None when the memory holds no state at all (never built, or flushed)."""

    @abstractmethod
    def replace_all(self, records: list[StoredKeys]) -> int: ...

    def state(self) -> tuple[int | None, set[str]]:
        """The version and the edit ids held, read together."""
        return self.version(), {r.edit_id for r in self.all()}

    def snapshot(self) -> tuple[int | None, list[StoredKeys]]:
        """The version and every record, read together (a version never newer than the records)."""
        version = self.version()
        return version, self.all()

    def ping(self) -> None:
        return None

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback`` for changes made by other replicas (no-op for a single process)."""

    def close(self) -> None:
        return None

    def describe(self) -> str:
        return self.kind


class LocalKeyMemory(KeyMemory):
    kind = "local"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, StoredKeys] = {}
        self._version: int | None = None

    def _bump(self) -> int:
        self._version = (self._version or 0) + 1
        return self._version

    def put(self, rec: StoredKeys) -> int:
        with self._lock:
            self._records[rec.edit_id] = rec
            return self._bump()

    def delete(self, edit_id: str) -> int:
        with self._lock:
            self._records.pop(edit_id, None)
            return self._bump()

    def get(self, edit_id: str) -> StoredKeys | None:
        with self._lock:
            return self._records.get(edit_id)

    def all(self) -> list[StoredKeys]:
        with self._lock:
            return list(self._records.values())

    def version(self) -> int | None:
        return self._version

    def state(self) -> tuple[int | None, set[str]]:
        with self._lock:
            return self._version, set(self._records)

    def snapshot(self) -> tuple[int | None, list[StoredKeys]]:
        with self._lock:
            return self._version, list(self._records.values())

    def replace_all(self, records: list[StoredKeys]) -> int:
        with self._lock:
            self._records = {r.edit_id: r for r in records}
            return self._bump()


class RedisKeyMemory(KeyMemory):
    """Keys: ``{p}:meta`` and ``{p}:vec`` hashes by edit id, ``{p}:version``; channel ``{p}:events``."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "factpatch", *, socket_timeout: float = 5.0):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No client retries: a write retried after a timeout may be applied twice (the stalled
        # one too, once Redis resumes), and a request would wait minutes on a stalled Redis. A
        # failed call fails fast; the periodic check and the pub/sub listener try again.
        self._redis = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
        )
        self.url = url
        self.prefix = prefix
        self._meta, self._vec = f"{prefix}:meta", f"{prefix}:vec"
        self._ver, self._chan = f"{prefix}:version", f"{prefix}:events"
        self._pubsub_thread = None
        self._stop = threading.Event()

    def describe(self) -> str:
        from redis.connection import parse_url

        parts = parse_url(self.url)
        return f"redis://{parts.get('host', '?')}:{parts.get('port', 6379)}/{parts.get('db', 0)}"

    def ping(self) -> None:
        self._redis.ping()

    def _publish(self, pipe, op: str, edit_id: str | None) -> int:
        pipe.incr(self._ver)
        results = pipe.execute()
        version = int(results[-1])
        self._redis.publish(self._chan, json.dumps({"op": op, "edit_id": edit_id, "version": version}))
        return version

    def put(self, rec: StoredKeys) -> int:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._meta, rec.edit_id, rec.meta_json())
        pipe.hset(self._vec, rec.edit_id, rec.vectors)
        return self._publish(pipe, "add", rec.edit_id)

    def delete(self, edit_id: str) -> int:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(self._meta, edit_id)
        pipe.hdel(self._vec, edit_id)
        return self._publish(pipe, "remove", edit_id)

    def get(self, edit_id: str) -> StoredKeys | None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(self._meta, edit_id)
        pipe.hget(self._vec, edit_id)
        meta, vec = pipe.execute()
        if meta is None or vec is None:
            return None
        return StoredKeys.from_parts(edit_id, meta, vec)

    def all(self) -> list[StoredKeys]:
        return self.snapshot()[1]

    def snapshot(self) -> tuple[int | None, list[StoredKeys]]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._ver)
        pipe.hgetall(self._meta)
        pipe.hgetall(self._vec)
        raw, metas, vecs = pipe.execute()
        out = []
        for raw_id, meta in metas.items():
            vec = vecs.get(raw_id)
            if vec is not None:
                out.append(StoredKeys.from_parts(raw_id.decode(), meta, vec))
        return (None if raw is None else int(raw)), out

    def state(self) -> tuple[int | None, set[str]]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._ver)
        pipe.hkeys(self._meta)
        pipe.hkeys(self._vec)
        raw, metas, vecs = pipe.execute()
        return (None if raw is None else int(raw)), {k.decode() for k in metas} & {k.decode() for k in vecs}

    def version(self) -> int | None:
        raw = self._redis.get(self._ver)
        return None if raw is None else int(raw)

    def replace_all(self, records: list[StoredKeys]) -> int:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._meta, self._vec)
        for rec in records:
            pipe.hset(self._meta, rec.edit_id, rec.meta_json())
            pipe.hset(self._vec, rec.edit_id, rec.vectors)
        return self._publish(pipe, "reload", None)

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        if self._pubsub_thread is not None:
            return

        def run() -> None:
            while not self._stop.is_set():
                try:
                    pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self._chan)
                    while not self._stop.is_set():
                        msg = pubsub.get_message(timeout=1.0)
                        if msg and msg.get("type") == "message":
                            try:
                                callback(json.loads(msg["data"]))
                            except Exception:  # noqa: BLE001 - a bad message must not kill the listener
                                log.exception("selector event handler failed")
                    pubsub.close()
                except Exception as exc:  # noqa: BLE001 - reconnect after Redis outages
                    log.warning("selector pub/sub disconnected (%s); retrying", type(exc).__name__)
                    self._stop.wait(1.0)

        self._pubsub_thread = threading.Thread(target=run, name="factpatch-selector-pubsub", daemon=True)
        self._pubsub_thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._pubsub_thread is not None:
            self._pubsub_thread.join(timeout=3)
        self._redis.close()


def build_memory(redis_url: str | None, prefix: str) -> KeyMemory:
    return RedisKeyMemory(redis_url, prefix) if redis_url else LocalKeyMemory()
