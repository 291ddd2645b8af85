"""The deltas every query goes through (calibrations, their repairs, global edits), kept equal to the
database on every replica.

A global delta is stored once, in PostgreSQL, by the process that made it; every other replica
finds it here: one thread polls the database every ``poll_seconds`` and switches on what became
active and off what was reverted. Each kind of global delta registers a source: a key prefix and a
function that returns, for the active rows, each key with a loader of its delta (called only for
keys not yet switched on). A source may name a lock that its own writers hold while they make a
change visible (the edits' visibility lock), so that a poll never undoes a change it read too
early.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

from app.delta import Delta

log = logging.getLogger(__name__)

Loader = Callable[[], "Delta | None"]
ActiveFn = Callable[[Any], dict[str, Loader]]  # (database session) -> {key: loader}


@dataclass
class _Source:
    prefix: str
    active: ActiveFn
    lock: Any | None


class GlobalDeltaSync:
    def __init__(self, db, lm, poll_seconds: float = 2.0):
        self.db = db
        self.lm = lm
        self.poll_seconds = poll_seconds
        self._sources: dict[str, _Source] = {}
        self._owned: set[str] = set()  # keys this process switched on (and must switch off at stop)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, prefix: str, active: ActiveFn, *, lock: Any | None = None) -> None:
        """Follow one kind of global delta: keys starting with ``prefix``, active as ``active`` says."""
        self._sources[prefix] = _Source(prefix, active, lock)

    # -- changes made by this process ------------------------------------------------------------
    def set(self, key: str, delta: Delta | None) -> None:
        """Switch one delta on (or off, with None) now, as the process that made the change."""
        with self._lock:
            self.lm.set_global(key, delta)
            (self._owned.add if delta is not None else self._owned.discard)(key)

    # -- following the database ------------------------------------------------------------------
    def sync(self, prefix: str | None = None) -> None:
        """Make the engine's global deltas of ``prefix`` (None: every source) equal the database."""
        for source in ([self._sources[prefix]] if prefix is not None else list(self._sources.values())):
            guard: ContextManager = source.lock if source.lock is not None else contextlib.nullcontext()
            with guard:
                with self.db.session() as s:
                    wanted = source.active(s)
                with self._lock:
                    if self._stop.is_set():
                        return
                    have = {k for k in self._owned if k.startswith(source.prefix)}
                    for key in have - wanted.keys():
                        self.set(key, None)
                    for key in wanted.keys() - have:
                        delta = wanted[key]()
                        if delta is not None:
                            self.set(key, delta)

    def start(self) -> None:
        self.sync()
        self._thread = threading.Thread(target=self._poll, name="factpatch-global-deltas", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following the database and take this process's global deltas off the engine (a model
        shared with another runtime must not keep them)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=3)
        with self._lock:
            for key in list(self._owned):
                self.lm.set_global(key, None)
            self._owned = set()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 - a database outage must not end the thread
                log.warning("global delta sync failed: %s", type(exc).__name__)
