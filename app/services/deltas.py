"""A bounded cache of edit deltas, loaded from the database (safetensors) when first routed to."""

from __future__ import annotations

import threading
from collections import OrderedDict

from app.delta import Delta
from app.store import Database, EditRepo


class DeltaCache:
    def __init__(self, db: Database, lm, capacity: int = 2048):
        self.db = db
        self.lm = lm
        self.capacity = capacity
        self._items: OrderedDict[str, Delta] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, edit_id: str, delta: Delta) -> None:
        delta = delta.to(self.lm.device, self.lm.dtype)
        with self._lock:
            self._items[edit_id] = delta
            self._items.move_to_end(edit_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, edit_id: str) -> None:
        with self._lock:
            self._items.pop(edit_id, None)

    def get(self, edit_id: str) -> Delta | None:
        """The delta of an *active* edit, or None (unknown, reverted or superseded)."""
        with self._lock:
            hit = self._items.get(edit_id)
            if hit is not None:
                self._items.move_to_end(edit_id)
                return hit
        with self.db.session() as s:
            edit = EditRepo(s).get(edit_id, with_delta=True)
            if edit is None or edit.status != "active" or edit.delta is None:
                return None
            delta = Delta.from_bytes(edit.delta.data)
            if edit.method == "pnp":
                # Deltas stored before the target was kept in their metadata.
                delta.meta.setdefault("target", edit.target.strip())
        self.put(edit_id, delta)
        return self.get_cached(edit_id)

    def get_cached(self, edit_id: str) -> Delta | None:
        with self._lock:
            return self._items.get(edit_id)
