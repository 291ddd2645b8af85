"""Keep the in-process selector mirror equal to the shared key memory, and the memory equal to
the database (the source of truth).

Each replica checks every ``poll_seconds`` (one Redis round trip): the memory's version and set
of edit ids against its mirror's; any difference, or a local change that failed midway
(``mark_dirty``), reloads the mirror. Every ``reconcile_seconds``, and at once after a change whose
outcome in Redis is unknown (``request_reconcile``: a write timed out or its undo failed), the
active edits in the database are compared with the memory's ids; a difference that holds under
the visibility lock (no edit or revert is between its memory write and its commit) rebuilds the
memory from the database. A missing version (Redis flushed or restarted empty) rebuilds too.
While Redis or the database is away the mirror keeps serving as it is.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from app.selector.memory import Event, KeyMemory, StoredKeys
from app.store import Database, EditRepo
from app.store.models import Edit

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
    WARM_PER_CHECK = 64  # deltas loaded per check at most (a start with many edits warms gradually)

    def __init__(self, db: Database, memory: KeyMemory, selector, poll_seconds: float = 1.0,
                 reconcile_seconds: float = 10.0, deltas=None):
        self.db = db
        self.memory = memory
        self.selector = selector
        self.poll_seconds = poll_seconds
        self.reconcile_seconds = reconcile_seconds
        self.deltas = deltas  # a DeltaCache to warm with the mirror's edits (answers survive a DB outage)
        self._local_version: int | None = None
        self._dirty = False  # the mirror may differ from the memory: reload at the next check
        self._suspect = False  # the memory may differ from the database: reconcile at the next check
        self._inactive: set[str] = set()
        self._in_flight: dict[int, float] = {}  # local changes written to the memory, not yet to the mirror
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rebuilds = 0
        self.reloads = 0

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
            self._thread.join(timeout=6)

    def rebuild_from_database(self) -> int:
        """Write every active edit's keys from the database into the memory, then reload the mirror.
        Runs under the visibility lock: no edit or revert is halfway through meanwhile."""
        with self.db.transaction() as s:
            self.db.lock_visibility(s)
            return self._rebuild(s)

    def _rebuild(self, session) -> int:
        edits = [e for e in EditRepo(session).active_with_keys() if e.keys is not None]
        encoder = self.selector.encoder.name
        stale = sum(e.keys.encoder != encoder for e in edits)
        if stale:
            log.warning("%d edits were keyed with another encoder; re-embedding them with %s", stale, encoder)
        stored = [stored_from_edit(e) if e.keys.encoder == encoder else self._reembed(e) for e in edits]
        with self.lock:
            self.memory.replace_all(stored)
            self._load_mirror()
        self.rebuilds += 1
        log.info("selector memory rebuilt from the database: %d edits", len(stored))
        return len(stored)

    def load_mirror_from_database(self) -> None:
        """Fill the in-process mirror straight from the database (the shared memory is unreachable)."""
        with self.db.session() as s:
            records = [self.to_record(stored_from_edit(e)) for e in EditRepo(s).active_with_keys() if e.keys is not None]
        with self.lock:
            self.selector.replace_all(records)
            self._local_version = None
            self._dirty = True  # load from the memory as soon as it answers

    def _reembed(self, edit) -> StoredKeys:
        """Keys (and relation keys) of an edit row embedded afresh, as a new edit's are."""
        record = self.selector.keys_for(
            edit.prompt, list(edit.paraphrases or []), edit.subject, target=edit.target, scope=edit.scope or "fact",
        )
        record.edit_id = edit.id
        return self.to_stored(record, self.selector.encoder.name)

    def ensure(self) -> None:
        """Rebuild when the memory holds nothing (first start, or Redis lost its data); reload the
        mirror when its version or its edit ids differ from the memory's, or it was marked dirty."""
        with self.lock:
            if self._changing():
                return  # a change of this process is between the memory and the mirror: next time
            version, ids = self.memory.state()
            if version is not None:
                if self._dirty or version != self._local_version or ids != set(self.selector.edit_ids()):
                    if not self._dirty and version == self._local_version:
                        log.warning("selector mirror differs from the memory at the same version; reloading")
                    self._load_mirror()
                return
        with self.db.transaction() as s:
            self.db.lock_visibility(s)
            if self.memory.version() is None:  # another replica may have rebuilt meanwhile
                self._rebuild(s)
                return
        with self.lock:
            self._load_mirror()

    def reconcile(self) -> bool:
        """Make the memory hold exactly the active edits of the database; True when it had to be
        rebuilt. A difference seen outside the lock may be a change in flight, so it is checked
        again under the visibility lock before anything is rewritten."""
        _, ids = self.memory.state()
        if self._active_ids() == ids:
            return False
        with self.db.transaction() as s:
            self.db.lock_visibility(s)
            version, ids = self.memory.state()
            if version is not None and self._active_ids(s) == ids:
                return False
            log.warning("selector memory differs from the database; rebuilding it")
            self._rebuild(s)
            return True

    def _active_ids(self, session=None) -> set[str]:
        from sqlalchemy import select

        stmt = select(Edit.id).where(Edit.status == "active")
        if session is not None:
            return set(session.scalars(stmt))
        with self.db.session() as s:
            return set(s.scalars(stmt))

    def _load_mirror(self) -> None:
        version, stored = self.memory.snapshot()
        self.selector.replace_all([self.to_record(r) for r in stored])
        self._local_version = version
        self._dirty = False
        self.reloads += 1

    # -- changes made here ---------------------------------------------------------------------
    def change_started(self, change: object) -> None:
        """A local change has begun writing the memory; its mirror update follows (``change_ended``)."""
        self._in_flight.setdefault(id(change), time.monotonic())

    def change_ended(self, change: object) -> None:
        self._in_flight.pop(id(change), None)

    def _changing(self, horizon_s: float = 30.0) -> bool:
        """A local change is in flight (one older than ``horizon_s`` is taken as abandoned)."""
        now = time.monotonic()
        for key, since in list(self._in_flight.items()):
            if now - since > horizon_s:
                self._in_flight.pop(key, None)
        return bool(self._in_flight)

    def note_local_version(self, version: int) -> None:
        with self.lock:
            if self._local_version is not None and version == self._local_version + 1:
                self._local_version = version

    def mark_dirty(self) -> None:
        """The mirror may no longer equal the memory (a local change failed halfway)."""
        self._dirty = True

    def request_reconcile(self) -> None:
        """The memory may no longer equal the database (a write's outcome in Redis is unknown)."""
        self._suspect = True
        self._dirty = True

    @property
    def suspect(self) -> bool:
        return self._suspect

    # -- changes made elsewhere ----------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        with self.lock:
            version = event.get("version")
            if version is not None and version == self._local_version and not self._dirty:
                return  # our own change
            op, edit_id = event.get("op"), event.get("edit_id")
            incremental = (not self._dirty and edit_id and self._local_version is not None
                           and version == self._local_version + 1)
            if op == "add" and incremental:
                stored = self.memory.get(edit_id)
                if stored is not None:
                    self.selector.add(self.to_record(stored))
                    self._local_version = version
                    return
            if op == "remove" and incremental:
                self.selector.remove(edit_id)
                self._local_version = version
                return
            self._load_mirror()

    def check(self, *, reconcile: bool = False) -> None:
        """One periodic check (what the background thread runs): the database against the memory
        when due or suspect, then the memory against the mirror (also while the database is away)."""
        if reconcile or self._suspect:
            try:
                self.reconcile()
                self._suspect = False
            except Exception as exc:  # noqa: BLE001 - retried at the next check
                log.warning("selector memory reconciliation failed: %s", type(exc).__name__)
        if reconcile:
            self._inactive.clear()
        self.ensure()
        self.warm(self.WARM_PER_CHECK)

    def warm(self, limit: int | None = None) -> int:
        """Load the deltas of edits in the mirror that are not cached yet (at most ``limit``, and
        never beyond the cache's free room, so a memory larger than the cache does not churn it),
        so that answers keep their edits while the database is away. An id found inactive is
        retried only after the next reconciliation: it may be an edit between its memory write
        and its commit. Returns how many were loaded."""
        if self.deltas is None:
            return 0
        room = self.deltas.capacity - len(self.deltas)
        if limit is not None:
            room = min(room, limit)
        if room <= 0:
            return 0
        loaded = 0
        for edit_id in self.selector.edit_ids():
            if loaded >= room:
                break
            if edit_id in self._inactive or self.deltas.get_cached(edit_id) is not None:
                continue
            if self.deltas.get(edit_id) is None:
                self._inactive.add(edit_id)
            else:
                loaded += 1
        return loaded

    def _poll(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.poll_seconds):
            due = time.monotonic() - last >= self.reconcile_seconds
            try:
                self.check(reconcile=due)
                if due:
                    last = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - keep serving from the mirror while Redis is away
                log.warning("selector memory check failed: %s", type(exc).__name__)
