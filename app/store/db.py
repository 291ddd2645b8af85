"""Engine, sessions, schema and migrations.

PostgreSQL (psycopg 3) in production and tests; a SQLite file under FACTPATCH_HOME by default.
A PostgreSQL schema can be chosen (tests use one per run); it is created if missing and used
for the Alembic version table too.

A database that cannot be reached (connection refused or lost) surfaces from ``session`` and
``transaction`` as ``DatabaseUnavailable`` (503 ``database_unavailable``), never as a driver error.
Two PostgreSQL advisory locks coordinate replicas: ``lock_visibility`` (held by every
transaction that changes which edits the shared selector memory holds, and by a rebuild, so a
rebuild never sees a change half made) and ``claim`` (one holder per name, e.g. an
Idempotency-Key, taken before any training).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import Unavailable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
CONNECT_TIMEOUT_S = 3


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached; the request changed nothing there."""

    code = "database_unavailable"

    def __init__(self, message: str = "the database is unavailable; try again later", **kw):
        super().__init__(message, **kw)


def is_unavailable(exc: BaseException) -> bool:
    """A driver error that means the database is unreachable (not a bad statement)."""
    return isinstance(exc, (DatabaseUnavailable, OperationalError, InterfaceError))


class Database:
    def __init__(self, url: str, schema: str | None = None):
        if schema is not None and not _SCHEMA_RE.match(schema):
            raise ValueError(f"invalid schema name {schema!r}")
        self.url = url
        self.schema = schema
        self._visibility = threading.RLock()  # SQLite's stand-in for the visibility advisory lock
        kwargs: dict = {"pool_pre_ping": True, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
            if schema:
                kwargs["connect_args"]["options"] = f"-csearch_path={schema}"
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def describe(self) -> str:
        """URL without password, for health and logs."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commit on success, roll back everything on any exception."""
        with _unavailable_as_503():
            with self._sessions() as session, session.begin():
                yield session

    @contextmanager
    def session(self) -> Iterator[Session]:
        with _unavailable_as_503():
            with self._sessions() as session:
                yield session

    # -- coordination between replicas ---------------------------------------------------------
    def _lock_key(self, name: str) -> int:
        digest = hashlib.sha256(f"factpatch:{self.schema or ''}:{name}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)

    def lock_visibility(self, session: Session) -> None:
        """Hold the memory-visibility lock until ``session``'s transaction ends: a PostgreSQL
        advisory lock across replicas; with SQLite (one process) a lock of this process, so the
        periodic check never reads the database and the memory halfway through a change."""
        if self.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": self._lock_key("visibility")})
            return
        if session.info.get("visibility_held"):
            return
        self._visibility.acquire()
        session.info["visibility_held"] = True

        def release(sess, transaction) -> None:
            if transaction.parent is None and sess.info.pop("visibility_held", False):
                self._visibility.release()

        event.listen(session, "after_transaction_end", release)

    @contextmanager
    def claim(self, name: str) -> Iterator[bool]:
        """Try to hold ``name`` (across replicas) for the block: yields False at once when another
        holder has it. The claim lives on its own connection and ends with it, so a crashed
        holder frees it. SQLite: always True (one process)."""
        if self.dialect != "postgresql":
            yield True
            return
        key = self._lock_key(f"claim:{name}")
        with _unavailable_as_503():
            conn = self.engine.connect()
        got = False
        try:
            with _unavailable_as_503():
                got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
                conn.commit()
            yield got
        finally:
            try:
                if got:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
            except Exception:  # noqa: BLE001 - a lost connection released the lock already
                conn.invalidate()
            finally:
                conn.close()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def ensure_schema(self) -> None:
        if self.schema and self.dialect == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))

    def drop_schema(self) -> None:
        if self.schema and self.dialect == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))

    def upgrade(self, revision: str = "head") -> None:
        """Run Alembic migrations up to ``revision``."""
        from alembic import command

        self.ensure_schema()
        with self.engine.begin() as conn:
            cfg = alembic_config(self.url)
            cfg.attributes["connection"] = conn
            cfg.attributes["schema"] = self.schema
            command.upgrade(cfg, revision)

    def downgrade(self, revision: str) -> None:
        """Run Alembic migrations down to ``revision``."""
        from alembic import command

        with self.engine.begin() as conn:
            cfg = alembic_config(self.url)
            cfg.attributes["connection"] = conn
            cfg.attributes["schema"] = self.schema
            command.downgrade(cfg, revision)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            opts = {"version_table_schema": self.schema} if self.schema and self.dialect == "postgresql" else {}
            return MigrationContext.configure(conn, opts=opts).get_current_revision()

    def dispose(self) -> None:
        self.engine.dispose()


@contextmanager
def _unavailable_as_503() -> Iterator[None]:
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        log.warning("database unavailable: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise DatabaseUnavailable() from exc


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()
