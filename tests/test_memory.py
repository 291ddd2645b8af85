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
