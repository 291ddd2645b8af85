"""API keys: bootstrap at start, verify per request (with a short cache), create from the CLI.

A verdict is fresh for ``CACHE_SECONDS``; after that the database is asked again. While the
database cannot be reached, the last verdict known for a key (from a request, or from the list
of all keys loaded at start and refreshed at most every ``KNOWN_SECONDS`` on the way) stands, so
answers keep being served to the keys that were valid when the outage began; a key never seen
gets 503 ``database_unavailable``."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from app.errors import Forbidden, Unauthorized
from app.settings import Settings
from app.store import ROLE_RANK, ApiKeyRepo, Database
from app.store.db import DatabaseUnavailable
from app.store.repos import hash_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    key_id: str
    name: str
    role: str

    def allows(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


ANONYMOUS = Principal(key_id="anonymous", name="anonymous", role="reader")


class KeyService:
    CACHE_SECONDS = 10.0
    KNOWN_SECONDS = 30.0

    def __init__(self, db: Database):
        self.db = db
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._known: dict[str, Principal] = {}  # key hash -> principal of every unrevoked key
        self._known_at: float | None = None
        self._lock = threading.Lock()

    def refresh_known(self) -> None:
        """Load the verdicts of every key (one query) for use while the database is away."""
        with self.db.session() as s:
            known = {k.key_hash: Principal(k.id, k.name, k.role) for k in ApiKeyRepo(s).list() if k.revoked_at is None}
        with self._lock:
            self._known, self._known_at = known, time.monotonic()

    def bootstrap(self, settings: Settings) -> Path | None:
        """Register configured keys; on a first start without any admin key, create one and write it
        to ``home/admin.key`` (mode 0600). Returns that path when a key was written."""
        configured = [("admin", settings.admin_key), ("editor", settings.editor_key), ("reader", settings.reader_key)]
        with self.db.transaction() as s:
            repo = ApiKeyRepo(s)
            for role, secret in configured:
                if secret is not None:
                    repo.ensure(name=f"configured-{role}", role=role, raw=secret.get_secret_value())
            if repo.any_admin():
                return None
            _, raw = repo.create(name="bootstrap-admin", role="admin")
            path = settings.home / "admin.key"
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(raw + "\n")
            os.chmod(path, 0o600)
        log.info("created the first admin API key; it is in %s", path)
        return path

    def create(self, name: str, role: str) -> tuple[str, str]:
        with self.db.transaction() as s:
            key, raw = ApiKeyRepo(s).create(name=name, role=role)
            return key.id, raw

    def verify(self, raw: str) -> Principal | None:
        h = hash_key(raw)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(h)
            if hit and now - hit[0] < self.CACHE_SECONDS:
                return hit[1]
            known_due = self._known_at is None or now - self._known_at >= self.KNOWN_SECONDS
        try:
            with self.db.session() as s:
                key = ApiKeyRepo(s).verify(raw)
                principal = Principal(key.id, key.name, key.role) if key else None
            if known_due:
                self.refresh_known()
        except DatabaseUnavailable:
            with self._lock:
                if hit is not None:
                    return hit[1]  # the last verdict before the outage
                if h in self._known:
                    return self._known[h]
            raise
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[h] = (now, principal)
        return principal

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()

    def authorize(self, header: str | None, role: str, *, public: bool = False) -> Principal:
        if not header:
            if public:
                return ANONYMOUS
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`", code="missing_key")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("malformed Authorization header: expected `Bearer <key>`", code="invalid_key")
        principal = self.verify(token.strip())
        if principal is None:
            raise Unauthorized("unknown or revoked API key", code="invalid_key")
        if not principal.allows(role):
            raise Forbidden(f"this endpoint needs the {role} role; the key has {principal.role}", code="forbidden")
        return principal
