"""Migrations and repositories against real PostgreSQL (and the embedded SQLite default)."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from app.store import ApiKeyRepo, AuditRepo, Database, EditRepo
from app.store.models import Edit

TABLES = {"edits", "edit_deltas", "edit_keys", "calibrations", "jobs", "audit_events", "api_keys", "repairs", "repair_deltas"}


def test_migrations_create_tables_in_postgres(pg_url, schema):
    db = Database(pg_url, schema)
    db.upgrade()
    assert db.current_revision() == "0003"
    assert TABLES <= set(inspect(db.engine).get_table_names(schema=schema))
    db.upgrade()  # idempotent
    db.dispose()


def test_migrations_on_sqlite(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    db.upgrade()
    assert TABLES <= set(inspect(db.engine).get_table_names())
    assert "scope" in {c["name"] for c in inspect(db.engine).get_columns("edits")}
    db.downgrade("0001")  # the downgrade drops the column again
    assert "scope" not in {c["name"] for c in inspect(db.engine).get_columns("edits")}


def test_rows_from_before_scopes_read_as_fact(pg_url, schema):
    from datetime import datetime, timezone

    from sqlalchemy import text

    db = Database(pg_url, schema)
    db.upgrade("0001")
    now = datetime.now(timezone.utc)
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO edits (id, method, prompt, target, paraphrases, locality_prompts, config, status, "
                "metrics, created_at, updated_at) VALUES ('old', 'pnp', 'p', 't', '[]', '[]', '{}', 'active', '{}', "
                ":now, :now)"
            ),
            {"now": now},
        )
    db.upgrade()
    assert db.current_revision() == "0003"
    with db.transaction() as s:
        assert EditRepo(s).get("old").scope == "fact"
        e = Edit(method="pnp", prompt="q", target="t", status="active", paraphrases=[], locality_prompts=[],
                 config={}, metrics={}, scope="subject")
        EditRepo(s).add(e, delta_kind="lora", delta_bytes=b"x", encoder="enc", key_texts=["q"], key_vectors=b"v")
        plain = Edit(method="pnp", prompt="r", target="t", status="active", paraphrases=[], locality_prompts=[],
                     config={}, metrics={})
        EditRepo(s).add(plain, delta_kind="lora", delta_bytes=b"x", encoder="enc", key_texts=["r"], key_vectors=b"v")
    with db.session() as s:
        assert EditRepo(s).get(e.id).scope == "subject" and EditRepo(s).get(plain.id).scope == "fact"
    db.dispose()


def test_failed_transaction_leaves_nothing(pg_url, schema):
    db = Database(pg_url, schema)
    db.upgrade()
    with pytest.raises(RuntimeError):
        with db.transaction() as s:
            e = Edit(method="pnp", prompt="p", target="t", status="active", paraphrases=[], locality_prompts=[],
                     config={}, metrics={})
            EditRepo(s).add(e, delta_kind="lora", delta_bytes=b"x", encoder="enc", key_texts=["p"], key_vectors=b"v")
            AuditRepo(s).record(actor="a", action="edit.create", entity_type="edit", entity_id=e.id)
            raise RuntimeError("boom")
    with db.session() as s:
        assert EditRepo(s).count_by_status() == {}
    db.dispose()


def test_pagination_walks_every_row_once(pg_url, schema):
    db = Database(pg_url, schema)
    db.upgrade()
    with db.transaction() as s:
        for i in range(7):
            e = Edit(method="pnp", prompt=f"p{i}", target="t", status="active", paraphrases=[],
                     locality_prompts=[], config={}, metrics={})
            EditRepo(s).add(e, delta_kind="lora", delta_bytes=b"x", encoder="e", key_texts=[], key_vectors=b"v")
    seen, cursor = [], None
    while True:
        with db.session() as s:
            page, cursor = EditRepo(s).list(status="active", limit=3, cursor=cursor)
        seen += [e.prompt for e in page]
        if cursor is None:
            break
    assert sorted(seen) == [f"p{i}" for i in range(7)]
    db.dispose()


def test_api_keys_are_stored_hashed_and_verified(pg_url, schema):
    db = Database(pg_url, schema)
    db.upgrade()
    with db.transaction() as s:
        key, raw = ApiKeyRepo(s).create(name="k", role="editor")
        assert raw not in (key.key_hash, key.prefix) and len(key.key_hash) == 64
    with db.session() as s:
        assert ApiKeyRepo(s).verify(raw).role == "editor"
        assert ApiKeyRepo(s).verify(raw + "x") is None
    with db.transaction() as s:
        assert ApiKeyRepo(s).revoke(key.id)
    with db.session() as s:
        assert ApiKeyRepo(s).verify(raw) is None
    db.dispose()


def test_sqlite_visibility_lock_serialises_changes_until_their_transaction_ends(tmp_path):
    """With SQLite (the embedded default, one process) the visibility lock is a lock of the process:
    a second holder waits until the first transaction commits or rolls back, so the periodic
    check never compares the database and the memory halfway through an edit."""
    import threading
    import time

    db = Database(f"sqlite:///{tmp_path / 'v.db'}")
    db.upgrade()
    held, order = threading.Event(), []

    def first():
        with db.transaction() as s:
            db.lock_visibility(s)
            db.lock_visibility(s)  # a second call in the same transaction is a no-op
            held.set()
            time.sleep(0.4)
            order.append("first commits")

    def second():
        held.wait(5)
        with db.transaction() as s:
            db.lock_visibility(s)
            order.append("second holds")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["first commits", "second holds"]
    # A rolled back transaction lets go too.
    with pytest.raises(RuntimeError):
        with db.transaction() as s:
            db.lock_visibility(s)
            raise RuntimeError("boom")
    got = []
    t = threading.Thread(target=lambda: got.append(db._visibility.acquire(timeout=2)))
    t.start()
    t.join(5)
    assert got == [True]
