"""The shared selector memory on real Redis, and the in-process default."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from app.selector.memory import LocalKeyMemory, RedisKeyMemory, StoredKeys
from app.services.memory_sync import vectors_from_bytes, vectors_to_bytes


def rec(i: int) -> StoredKeys:
    return StoredKeys(f"e{i}", "enc", [f"text {i}"], f"subj {i}", vectors_to_bytes(np.full((2, 4), i, np.float32)))


@pytest.fixture(params=["redis", "local"])
def memory(request, redis_url, redis_prefix):
    m = RedisKeyMemory(redis_url, redis_prefix) if request.param == "redis" else LocalKeyMemory()
    yield m
    m.close()


def test_put_get_delete_and_version(memory):
    assert memory.version() is None  # nothing built yet
    v1 = memory.put(rec(1))
    v2 = memory.put(rec(2))
    assert v2 == v1 + 1
    got = memory.get("e1")
    assert got.texts == ["text 1"] and got.subject == "subj 1"
    assert np.array_equal(vectors_from_bytes(got.vectors), np.full((2, 4), 1, np.float32))
    memory.delete("e1")
    assert memory.get("e1") is None
    assert [r.edit_id for r in memory.all()] == ["e2"]
    memory.replace_all([rec(3), rec(4)])
    assert sorted(r.edit_id for r in memory.all()) == ["e3", "e4"]


def test_state_and_snapshot_read_version_and_records_together(memory):
    assert memory.state() == (None, set()) and memory.snapshot() == (None, [])
    memory.put(rec(1))
    v = memory.put(rec(2))
    assert memory.state() == (v, {"e1", "e2"})
    version, records = memory.snapshot()
    assert version == v and sorted(r.edit_id for r in records) == ["e1", "e2"]
    v = memory.delete("e1")
    assert memory.state() == (v, {"e2"})


def test_a_stopped_redis_fails_fast_without_retries(redis_prefix):
    """Nothing listens: one attempt, no client-side retries (a retried write could land twice)."""
    m = RedisKeyMemory("redis://127.0.0.1:1/0", redis_prefix, socket_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(Exception):
        m.put(rec(1))
    assert time.monotonic() - t0 < 1.0
    m.close()


def test_redis_flush_is_detected_as_missing_version(redis_url, redis_prefix):
    m = RedisKeyMemory(redis_url, redis_prefix)
    m.put(rec(1))
    assert m.version() is not None
    m._redis.delete(*m._redis.keys(f"{redis_prefix}:*"))  # what FLUSHALL does to our keys
    assert m.version() is None and m.all() == []
    m.close()


def test_pubsub_reaches_other_replicas(redis_url, redis_prefix):
    a, b = RedisKeyMemory(redis_url, redis_prefix), RedisKeyMemory(redis_url, redis_prefix)
    got: list[dict] = []
    seen = threading.Event()

    def on_event(ev):
        got.append(ev)
        seen.set()

    b.subscribe(on_event)
    time.sleep(0.3)  # let the subscription register
    a.put(rec(7))
    assert seen.wait(5), "no pub/sub event arrived"
    assert got[0]["op"] == "add" and got[0]["edit_id"] == "e7"
    a.close()
    b.close()


def scoped(i: int) -> tuple[StoredKeys, np.ndarray, np.ndarray]:
    """A subject-scoped record with relation keys, and its two tensors."""
    keys = np.arange(8, dtype=np.float32).reshape(2, 4) + i
    relation = np.arange(12, dtype=np.float32).reshape(3, 4) - i
    return StoredKeys(f"s{i}", "enc", ["a", "b"], "Subj", vectors_to_bytes(keys, relation), "subject"), keys, relation


def test_scope_and_relation_keys_round_trip(memory):
    from app.services.memory_sync import key_tensors_from_bytes

    stored, keys, relation = scoped(1)
    memory.put(stored)
    memory.put(rec(2))  # a fact-scoped record without relation keys beside it
    got = memory.get("s1")
    assert got.scope == "subject" and got.subject == "Subj" and got.texts == ["a", "b"]
    got_keys, got_relation = key_tensors_from_bytes(got.vectors)
    assert np.array_equal(got_keys, keys) and np.array_equal(got_relation, relation)
    plain = memory.get("e2")
    assert plain.scope == "fact" and key_tensors_from_bytes(plain.vectors)[1] is None
    memory.replace_all([stored])
    (again,) = memory.all()
    assert again.scope == "subject" and np.array_equal(key_tensors_from_bytes(again.vectors)[1], relation)


def test_data_written_before_scopes_still_loads(redis_url, redis_prefix):
    """Meta without ``scope`` and vectors without ``relation``: a fact-scoped record without relation keys."""
    import json

    from safetensors.numpy import save

    from app.services.memory_sync import MemorySync

    m = RedisKeyMemory(redis_url, redis_prefix)
    keys = np.eye(2, 4, dtype=np.float32)
    m._redis.hset(f"{redis_prefix}:meta", "old", json.dumps({"encoder": "enc", "texts": ["x", "y"], "subject": "S"}))
    m._redis.hset(f"{redis_prefix}:vec", "old", save({"keys": keys}))
    stored = m.get("old")
    assert stored.scope == "fact" and np.array_equal(vectors_from_bytes(stored.vectors), keys)
    record = MemorySync(None, m, None).to_record(stored)
    assert record.scope == "fact" and record.relation_vectors is None and record.texts == ["x", "y"]
    assert np.array_equal(record.vectors, keys)
    m.close()


class FourDims:
    name, dim = "enc", 4

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.eye(len(texts), 4, dtype=np.float32)


def test_rebuild_from_postgres_keeps_scope_and_relation_keys(pg_url, schema, redis_url, redis_prefix):
    from safetensors.numpy import save

    from app.selector.router import Selector
    from app.services.memory_sync import MemorySync, key_tensors_from_bytes
    from app.store import Database, EditRepo
    from app.store.models import Edit

    db = Database(pg_url, schema)
    db.upgrade()
    keys, relation = np.eye(2, 4, dtype=np.float32), np.eye(3, 4, k=1, dtype=np.float32)
    with db.transaction() as s:
        new = Edit(method="pnp", prompt="a", target="t", subject="Subj", scope="subject", status="active",
                   paraphrases=["b"], locality_prompts=[], config={}, metrics={})
        EditRepo(s).add(new, delta_kind="lora", delta_bytes=b"d", encoder="enc", key_texts=["a", "b"],
                        key_vectors=vectors_to_bytes(keys, relation))
        old = Edit(method="pnp", prompt="c", target="t", status="active", paraphrases=["d"], locality_prompts=[],
                   config={}, metrics={})  # keys as written before relation keys existed
        EditRepo(s).add(old, delta_kind="lora", delta_bytes=b"d", encoder="enc", key_texts=["c", "d"],
                        key_vectors=save({"keys": keys}))
    memory = RedisKeyMemory(redis_url, redis_prefix)
    selector = Selector(FourDims())
    sync = MemorySync(db, memory, selector)
    assert sync.rebuild_from_database() == 2

    shared = {r.edit_id: r for r in memory.all()}
    assert shared[new.id].scope == "subject" and shared[old.id].scope == "fact"
    assert np.array_equal(key_tensors_from_bytes(shared[new.id].vectors)[1], relation)
    assert key_tensors_from_bytes(shared[old.id].vectors)[1] is None
    mirror = selector._records
    assert mirror[new.id].scope == "subject" and np.array_equal(mirror[new.id].relation_vectors, relation)
    assert mirror[old.id].scope == "fact" and mirror[old.id].relation_vectors is None

    # a second replica learns of a change through pub/sub with both intact
    other = Selector(FourDims())
    replica = MemorySync(db, RedisKeyMemory(redis_url, redis_prefix), other, poll_seconds=60)
    replica.start()
    time.sleep(0.3)  # let the subscription register
    stored = sync.to_stored(mirror[new.id], "enc")
    stored.edit_id = "fresh"
    sync.note_local_version(memory.put(stored))
    deadline = time.monotonic() + 5
    while "fresh" not in other and time.monotonic() < deadline:
        time.sleep(0.05)
    assert other._records["fresh"].scope == "subject"
    assert np.array_equal(other._records["fresh"].relation_vectors, relation)

    # the mirror straight from the database (Redis unreachable) carries them too
    sync.load_mirror_from_database()
    assert selector._records[new.id].scope == "subject" and selector._records[old.id].relation_vectors is None
    replica.stop()
    replica.memory.close()
    memory.close()
    db.dispose()


def test_rebuild_reembeds_keys_of_another_encoder_with_scope_and_relation_keys(pg_url, schema, redis_url,
                                                                                redis_prefix):
    from app.selector.router import Selector
    from app.services.memory_sync import MemorySync, key_tensors_from_bytes
    from app.store import Database, EditRepo
    from app.store.models import Edit

    db = Database(pg_url, schema)
    db.upgrade()
    with db.transaction() as s:
        e = Edit(method="pnp", prompt="The pet of Subj is", target="a cat", subject="Subj", scope="subject",
                 status="active", paraphrases=[], locality_prompts=[], config={}, metrics={})
        EditRepo(s).add(e, delta_kind="lora", delta_bytes=b"d", encoder="retired-encoder", key_texts=["x"],
                        key_vectors=vectors_to_bytes(np.ones((1, 8), np.float32)))
    memory = RedisKeyMemory(redis_url, redis_prefix)
    selector = Selector(FourDims())
    assert MemorySync(db, memory, selector).rebuild_from_database() == 1
    (stored,) = memory.all()
    keys, relation = key_tensors_from_bytes(stored.vectors)
    assert stored.encoder == "enc" and stored.scope == "subject" and stored.texts == ["The pet of Subj is"]
    assert keys.shape == (1, 4) and relation is not None and relation.shape[1] == 4
    assert selector._records[e.id].scope == "subject"
    memory.close()
    db.dispose()


def test_the_mirror_check_waits_for_a_local_change_between_memory_and_mirror(tmp_path):
    """A local edit writes the memory inside its transaction and the mirror after the commit; the
    1 s mirror check in between must not take the mirror for stale (and reload it)."""
    from app.selector.router import Selector
    from app.services.memory_sync import MemorySync
    from app.store import Database

    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    db.upgrade()
    memory, selector = LocalKeyMemory(), Selector(FourDims())
    sync = MemorySync(db, memory, selector)
    sync.ensure()
    reloads = sync.reloads
    change = object()
    sync.change_started(change)
    stored = StoredKeys("e1", "enc", ["a", "b"], None, vectors_to_bytes(np.eye(2, 4, dtype=np.float32)))
    sync.note_local_version(memory.put(stored))
    sync.ensure()
    assert sync.reloads == reloads  # in flight: left alone
    sync.change_ended(change)
    sync.ensure()
    assert sync.reloads == reloads + 1 and "e1" in selector.edit_ids()  # afterwards the check does its work
