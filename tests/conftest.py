"""Shared fixtures: real PostgreSQL and Redis (a fresh schema and key prefix per test run), tiny
random models for fast tests, and the real embedded model for the end-to-end ones."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

PG_URL = os.environ.get("FACTPATCH_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FACTPATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN = uuid.uuid4().hex[:8]

ADMIN, EDITOR, READER = "fp_test_admin_key", "fp_test_editor_key", "fp_test_reader_key"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(predicate())


def ask(client, q: str, n: int = 6) -> dict:
    """``GET /answer`` in completion form as the reader; asserts 200."""
    r = client.get("/answer", params={"q": q, "max_new_tokens": n, "mode": "completion"}, headers=auth(READER))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="session")
def pg_url() -> str:
    return PG_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


_schemas: list[str] = []
_prefixes: list[str] = []


@pytest.fixture
def schema() -> str:
    name = f"t_{RUN}_{len(_schemas)}"
    _schemas.append(name)
    return name


@pytest.fixture
def redis_prefix() -> str:
    p = f"fptest:{RUN}:{len(_prefixes)}"
    _prefixes.append(p)
    return p


@pytest.fixture(scope="session", autouse=True)
def _cleanup():
    yield
    from sqlalchemy import create_engine, text

    eng = create_engine(PG_URL)
    for s in _schemas:  # one transaction a schema: dropping them all at once can exhaust the lock table
        with eng.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{s}" CASCADE'))
    eng.dispose()
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    for p in _prefixes:
        keys = list(r.scan_iter(f"{p}:*"))
        if keys:
            r.delete(*keys)
    r.close()


@pytest.fixture(scope="session")
def tiny_llama():
    from app.lm.testing import tiny_lm

    return tiny_lm("llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from app.lm.testing import tiny_lm

    return tiny_lm("gpt2")


@pytest.fixture(scope="session")
def real_lm():
    from app.lm import LM
    from app.settings import EMBEDDED_MODEL, get_settings

    return LM.load(EMBEDDED_MODEL, get_settings().home)


def make_settings(tmp_path: Path, *, pg_url: str | None, schema: str | None, redis_url: str | None,
                  redis_prefix: str = "factpatch", **extra):
    from app.settings import Settings

    return Settings(
        home=tmp_path / "home", database_url=pg_url, database_schema=schema, redis_url=redis_url,
        redis_prefix=redis_prefix, admin_key=ADMIN, editor_key=EDITOR, reader_key=READER, **extra,
    )


@pytest.fixture
def service(tmp_path, pg_url, schema, redis_url, redis_prefix, tiny_llama):
    """A factory for a TestClient on the full app over real Postgres and Redis with a tiny model."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.runtime import Runtime

    clients = []

    def make(lm=None, *, fresh_runtime: bool = True, **extra):
        opts = dict(pg_url=pg_url, schema=schema, redis_url=redis_url, redis_prefix=redis_prefix)
        opts.update(extra)
        settings = make_settings(tmp_path, **opts)
        rt = Runtime.build(settings, lm=lm or tiny_llama)
        client = TestClient(create_app(runtime=rt))
        client.__enter__()
        clients.append((client, rt))
        return client, rt

    yield make
    for client, rt in clients:
        client.__exit__(None, None, None)
        rt.close()
