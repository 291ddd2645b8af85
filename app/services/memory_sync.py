"""Keep the in-process selector mirror equal to the shared key memory, and the memory equal to
the database (the source of truth) when it was lost."""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from app.selector.memory import Event, KeyMemory, StoredKeys
from app.store import Database, EditRepo

log = logging.getLogger(__name__)


KEYS = "keys"
RELATION = "relation"


def vectors_to_bytes(vectors: np.ndarray, relation: np.ndarray | None = None) -> bytes:
    """An edit's key vectors as safetensors bytes: float32 ``keys`` [n, d] and, when the edit has
    relation keys, float32 ``relation`` [m, d] beside them (the format of ``edit_keys.vectors``
    in the database and of the Redis vector hash)."""
    tensors = {KEYS: np.ascontiguousarray(vectors, dtype=np.float32)}
    if relation is not None:
        tensors[RELATION] = np.ascontiguousarray(relation, dtype=np.float32)
    return np_save(tensors)


def key_tensors_from_bytes(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``keys`` and the ``relation`` keys (None when absent, as in data written before
    relation keys existed) of ``vectors_to_bytes`` output."""
    tensors = np_load(data)
    return tensors[KEYS], tensors.get(RELATION)


def vectors_from_bytes(data: bytes) -> np.ndarray:
    """The ``keys`` tensor alone."""
    return key_tensors_from_bytes(data)[0]


def stored_from_edit(edit) -> StoredKeys:
    """The memory record of an edit row loaded with its keys (rows from before scopes: ``fact``)."""
    keys = edit.keys
    return StoredKeys(edit.id, keys.encoder, list(keys.texts), edit.subject, keys.vectors, edit.scope or "fact")


class MemorySync:
    def __init__(self, db: Database, memory: KeyMemory, selector, poll_seconds: float = 2.0):
        self.db = db
        self.memory = memory
        self.selector = selector
        self.poll_seconds = poll_seconds
        self._local_version: int | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rebuilds = 0

    # -- conversions ---------------------------------------------------------------------------
    def to_record(self, stored: StoredKeys):
        from app.selector.router import KeyRecord

        vectors, relation = key_tensors_from_bytes(stored.vectors)
        return KeyRecord(
            edit_id=stored.edit_id, vectors=vectors, texts=list(stored.texts), subject=stored.subject,
            scope=stored.scope, relation_vectors=relation,
        )

    def to_stored(self, record, encoder: str) -> StoredKeys:
        return StoredKeys(
            record.edit_id, encoder, list(record.texts), record.subject,
            vectors_to_bytes(record.vectors, record.relation_vectors), record.scope,
        )

    # -- start / rebuild -----------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.ensure()
        except Exception as exc:  # noqa: BLE001 - serve from the database until the memory is back
            log.warning("selector memory unavailable at start (%s); routing from the database", type(exc).__name__)
            self.load_mirror_from_database()
        self.memory.subscribe(self._on_event)
        self._thread = threading.Thread(target=self._poll, name="factpatch-memory-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=3)

    def rebuild_from_database(self) -> int:
        """Write every active edit's keys from the database into the memory, then reload the mirror."""
        with self.db.session() as s:
            edits = [e for e in EditRepo(s).active_with_keys() if e.keys is not None]
        encoder = self.selector.encoder.name
        stale = sum(e.keys.encoder != encoder for e in edits)
        if stale:
            log.warning("%d edits were keyed with another encoder; re-embedding them with %s", stale, encoder)
        stored = [stored_from_edit(e) if e.keys.encoder == encoder else self._reembed(e) for e in edits]
        with self._lock:
            version = self.memory.replace_all(stored)
            self._load_mirror(version)
        self.rebuilds += 1
        log.info("selector memory rebuilt from the database: %d edits", len(stored))
        return len(stored)

    def load_mirror_from_database(self) -> None:
        """Fill the in-process mirror straight from the database (the shared memory is unreachable)."""
        with self.db.session() as s:
            records = [self.to_record(stored_from_edit(e)) for e in EditRepo(s).active_with_keys() if e.keys is not None]
        with self._lock:
            self.selector.replace_all(records)
            self._local_version = None

    def _reembed(self, edit) -> StoredKeys:
        """Keys (and relation keys) of an edit row embedded afresh, as a new edit's are."""
        record = self.selector.keys_for(
            edit.prompt, list(edit.paraphrases or []), edit.subject, target=edit.target, scope=edit.scope or "fact",
        )
        record.edit_id = edit.id
        return self.to_stored(record, self.selector.encoder.name)

    def ensure(self) -> None:
        """Rebuild when the memory holds nothing (first start, or Redis lost its data); else load it."""
        with self._lock:
            version = self.memory.version()
            if version is None:
                self.rebuild_from_database()
            elif version != self._local_version:
                self._load_mirror(version)

    def _load_mirror(self, version: int | None) -> None:
        records = [self.to_record(r) for r in self.memory.all()]
        self.selector.replace_all(records)
        self._local_version = version

    # -- changes made here ---------------------------------------------------------------------
    def note_local_version(self, version: int) -> None:
        with self._lock:
            if self._local_version is not None and version == self._local_version + 1:
                self._local_version = version

    # -- changes made elsewhere ----------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        with self._lock:
            version = event.get("version")
            if version is not None and version == self._local_version:
                return  # our own change
            op, edit_id = event.get("op"), event.get("edit_id")
            if op == "add" and edit_id and self._local_version is not None and version == self._local_version + 1:
                stored = self.memory.get(edit_id)
                if stored is not None:
                    self.selector.add(self.to_record(stored))
                    self._local_version = version
                    return
            if op == "remove" and edit_id and self._local_version is not None and version == self._local_version + 1:
                self.selector.remove(edit_id)
                self._local_version = version
                return
            self._load_mirror(self.memory.version())

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.ensure()
            except Exception as exc:  # noqa: BLE001 - keep serving from the mirror while Redis is away
                log.warning("selector memory check failed: %s", type(exc).__name__)
