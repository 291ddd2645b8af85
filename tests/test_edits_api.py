"""Edits over HTTP with real PostgreSQL and Redis and a tiny model: an edit changes the answer for
its prompt, leaves unrelated queries alone, and a revert restores the base model; supersede,
idempotency, validation, failures that leave nothing behind, restart, Redis flush, replicas and
concurrent isolation."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import ADMIN, EDITOR, READER, auth, wait_until

FAST = {"max_steps": 60, "kl_weight": 0.0, "locality_prompts": 0}
EDIT = {"prompt": "The favourite colour of Zorblax Quint is", "target": "ultraviolet",
        "subject": "Zorblax Quint", "config": FAST}
UNRELATED = "The capital of Norway is"


def answer(client, q, n=4):
    r = client.get("/answer", params={"q": q, "max_new_tokens": n, "mode": "completion"}, headers=auth(READER))
    assert r.status_code == 200, r.text
    return r.json()


def create(client, body=EDIT, **headers):
    return client.post("/edits", json=body, headers={**auth(EDITOR), **headers})


def count_rows(rt) -> dict:
    from app.store import EditRepo

    with rt.db.session() as s:
        return EditRepo(s).count_by_status()


def test_edit_changes_answer_and_revert_restores_it(service, tiny_llama):
    client, rt = service()
    before = answer(client, EDIT["prompt"])
    other_before = answer(client, UNRELATED)
    r = create(client)
    assert r.status_code == 201, r.text
    edit = r.json()
    assert edit["status"] == "active" and edit["method"] == "pnp" and edit["metrics"]["success"] == 1.0
    assert edit["scope"] == "fact"  # the default
    assert edit["metrics"]["steps"] >= 1 and edit["metrics"]["train_ms"] > 0

    after = answer(client, EDIT["prompt"])
    assert after["edit_id"] == edit["id"] and after["similarity"] > 0.5
    assert after["answer"].startswith("ultraviolet") and after["answer"] != before["answer"]
    unrelated = answer(client, UNRELATED)
    assert unrelated["answer"] == other_before["answer"] and unrelated["edit_id"] is None

    assert client.get(f"/edits/{edit['id']}", headers=auth(READER)).json()["status"] == "active"
    assert client.post(f"/admin/edits/{edit['id']}/revert", headers=auth(EDITOR)).status_code == 403
    r = client.post(f"/admin/edits/{edit['id']}/revert", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json() == {"id": edit["id"], "status": "reverted"}
    restored = answer(client, EDIT["prompt"])
    assert restored["edit_id"] is None and restored["answer"] == before["answer"]
    assert client.post(f"/admin/edits/{edit['id']}/revert", headers=auth(ADMIN)).json()["status"] == "reverted"
    actions = [e["action"] for e in client.get(f"/edits/{edit['id']}/history", headers=auth(READER)).json()["items"]]
    assert actions == ["edit.create", "edit.revert"]
    listing = client.get("/edits", params={"status": "reverted"}, headers=auth(READER)).json()
    assert [e["id"] for e in listing["items"]] == [edit["id"]]


def test_second_edit_supersedes_and_revert_reinstates(service):
    client, _ = service()
    first = create(client).json()
    second = create(client, {**EDIT, "target": "infrared"}).json()
    assert second["supersedes_id"] == first["id"]
    assert client.get(f"/edits/{first['id']}", headers=auth(READER)).json()["status"] == "superseded"
    now = answer(client, EDIT["prompt"])
    assert now["edit_id"] == second["id"] and now["answer"].startswith("infrared")
    client.post(f"/admin/edits/{second['id']}/revert", headers=auth(ADMIN))
    assert client.get(f"/edits/{first['id']}", headers=auth(READER)).json()["status"] == "active"
    back = answer(client, EDIT["prompt"])
    assert back["edit_id"] == first["id"] and back["answer"].startswith("ultraviolet")


def test_idempotency_key_returns_the_same_edit(service):
    client, rt = service()
    a = create(client, **{"Idempotency-Key": "k-1"})
    b = create(client, **{"Idempotency-Key": "k-1"})
    assert a.status_code == 201 and b.status_code == 200 and a.json()["id"] == b.json()["id"]
    c = create(client, {**EDIT, "target": "infrared"}, **{"Idempotency-Key": "k-1"})
    assert c.status_code == 409 and c.json()["error"]["code"] == "idempotency_key_reused"
    d = create(client, {**EDIT, "scope": "subject"}, **{"Idempotency-Key": "k-1"})
    assert d.status_code == 409 and d.json()["error"]["code"] == "idempotency_key_reused"
    e = create(client, {**EDIT, "scope": "fact"}, **{"Idempotency-Key": "k-1"})  # the default, spelt out
    assert e.status_code == 200 and e.json()["id"] == a.json()["id"]
    assert count_rows(rt) == {"active": 1}


def test_request_hash_of_the_default_scope_is_the_hash_from_before_scopes():
    import hashlib
    import json

    from app.services.edits import EditInput

    fields = dict(prompt="p", target="t", subject=None, paraphrases=[], locality_prompts=[], method="pnp", config={})
    before = hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert EditInput(**fields).request_hash() == before  # a replay of a stored request still matches
    assert EditInput(**fields, scope="subject").request_hash() != before


def test_scope_round_trips_and_survives_a_rebuild(service):
    import numpy as np

    client, rt = service()
    r = create(client, {**EDIT, "scope": "subject", "paraphrases": ["Zorblax Quint likes the colour"]})
    assert r.status_code == 201, r.text
    edit = r.json()
    assert edit["scope"] == "subject"
    assert client.get(f"/edits/{edit['id']}", headers=auth(READER)).json()["scope"] == "subject"
    listed = client.get("/edits", headers=auth(READER)).json()["items"]
    assert [(e["id"], e["scope"]) for e in listed] == [(edit["id"], "subject")]

    def records():
        mirror = rt.selector._records[edit["id"]]
        return mirror, rt.sync.to_record(rt.memory.get(edit["id"]))

    for record in records():
        assert record.scope == "subject" and record.relation_vectors is not None
    relation = records()[0].relation_vectors
    assert client.post("/admin/selector/rebuild", headers=auth(ADMIN)).json() == {"edits": 1}
    for record in records():
        assert record.scope == "subject" and np.array_equal(record.relation_vectors, relation)


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({**EDIT, "prompt": ""}, 422, "invalid_request"),
        ({**EDIT, "target": "   "}, 422, "invalid_request"),
        ({**EDIT, "prompt": "x" * 2001}, 422, "invalid_request"),
        ({**EDIT, "target": "y" * 201}, 422, "invalid_request"),
        ({**EDIT, "paraphrases": ["p"] * 21}, 422, "invalid_request"),
        ({**EDIT, "paraphrases": "not a list"}, 422, "invalid_request"),
        ({**EDIT, "extra": 1}, 422, "invalid_request"),
        ({**EDIT, "scope": "everything"}, 422, "invalid_request"),
        ({**EDIT, "scope": None}, 422, "invalid_request"),
        ({**EDIT, "scope": "Subject"}, 422, "invalid_request"),
        ({**EDIT, "method": "nope"}, 422, "unknown_method"),
        ({**EDIT, "method": "calinet"}, 422, "unknown_method"),
        ({**EDIT, "config": {"no_such_knob": 1}}, 422, "invalid_config"),
        ({**EDIT, "config": {"rank": 0}}, 422, "invalid_config"),
    ],
)
def test_bad_edit_requests_write_nothing(service, body, status, code):
    client, rt = service()
    r = create(client, body)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert count_rows(rt) == {}
    assert len(rt.selector) == 0 and rt.memory.all() == []


@pytest.mark.parametrize("method, config", [("pnp", FAST), ("ft", {"layers": -1, "max_steps": 5})])
def test_target_the_model_already_gives_is_refused(service, tiny_llama, method, config):
    # The prompt routes to no edit: the method's first forward (the unedited model) sees it.
    client, rt = service()
    prompt = "hello there"
    current = tiny_llama.generate([prompt], max_new_tokens=2, mode="completion")[0].text.strip()
    r = create(client, {"prompt": prompt, "target": current, "method": method, "config": config})
    assert r.status_code == 422 and r.json()["error"]["code"] == "target_already_holds"
    assert count_rows(rt) == {}
    assert len(rt.selector) == 0 and rt.memory.all() == []


def test_edit_that_an_active_edit_already_serves_is_refused(service):
    # The prompt routes to an edit: the served answer (with that edit's delta) is checked first.
    client, rt = service()
    r = create(client, {**EDIT, "config": FAST})
    assert r.status_code == 201, r.text
    rows = count_rows(rt)
    again = create(client, {**EDIT, "config": FAST})
    assert again.status_code == 422 and again.json()["error"]["code"] == "target_already_holds"
    assert count_rows(rt) == rows and len(rt.selector) == 1


def test_training_failure_leaves_nothing(service, monkeypatch):
    client, rt = service()
    from app.methods import get

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(type(get("pnp")), "fit", broken)
    r = create(client)
    assert r.status_code == 500 and r.json()["error"]["code"] == "training_failed"
    assert count_rows(rt) == {} and len(rt.selector) == 0 and rt.memory.all() == []


def test_redis_failure_midway_leaves_nothing(service):
    client, rt = service(redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    r = create(client)
    assert r.status_code == 503 and r.json()["error"]["code"] == "memory_unavailable"
    assert count_rows(rt) == {} and len(rt.selector) == 0


def test_database_failure_midway_leaves_no_key(service, monkeypatch):
    client, rt = service()
    from sqlalchemy.exc import OperationalError

    from app.store import AuditRepo

    def down(*a, **k):
        raise OperationalError("INSERT", {}, Exception("connection lost"))

    monkeypatch.setattr(AuditRepo, "record", down)
    r = create(client)
    assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
    assert count_rows(rt) == {} and rt.memory.all() == [] and len(rt.selector) == 0


def test_restart_and_redis_flush_lose_nothing(service, tiny_llama):
    client, rt = service()
    edit = create(client).json()
    edited = answer(client, EDIT["prompt"])
    rt.close()

    client2, rt2 = service()  # a new process on the same database and Redis
    assert answer(client2, EDIT["prompt"])["answer"] == edited["answer"]

    import redis

    r = redis.Redis.from_url(rt2.settings.redis_url)
    r.delete(*r.keys(f"{rt2.settings.redis_prefix}:*"))  # Redis lost everything
    assert rt2.memory.version() is None
    rt2.sync.ensure()  # what the periodic check does
    assert [k.edit_id for k in rt2.memory.all()] == [edit["id"]]
    assert answer(client2, EDIT["prompt"])["edit_id"] == edit["id"]


def test_replicas_share_edits_through_redis(service):
    a, rt_a = service()
    b, rt_b = service()
    edit = create(a).json()
    wait_until(lambda: edit["id"] in rt_b.selector)
    assert answer(b, EDIT["prompt"])["edit_id"] == edit["id"]
    a.post(f"/admin/edits/{edit['id']}/revert", headers=auth(ADMIN))
    wait_until(lambda: edit["id"] not in rt_b.selector)
    assert answer(b, EDIT["prompt"])["edit_id"] is None


def test_supersede_of_an_edit_another_replica_reverts_meanwhile_is_refused(service, monkeypatch):
    """Replica B routes a new edit to an active one and trains it; meanwhile replica A reverts
    that edit. B's commit must not mark the reverted edit superseded (the row lock decides)."""
    a, rt_a = service()
    b, rt_b = service()
    first = create(a).json()
    assert wait_until(lambda: first["id"] in rt_b.selector)
    measure = type(rt_b.edits)._measure

    def revert_meanwhile(self, *args, **kwargs):
        assert a.post(f"/admin/edits/{first['id']}/revert", headers=auth(ADMIN)).status_code == 200
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(rt_b.edits, "_measure", revert_meanwhile.__get__(rt_b.edits))
    r = create(b, {**EDIT, "target": "infrared"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "edit_conflict", r.text
    assert count_rows(rt_a) == {"reverted": 1}
    assert [k.edit_id for k in rt_a.memory.all()] == []
    monkeypatch.undo()
    wait_until(lambda: first["id"] not in rt_b.selector)
    retry = create(b, {**EDIT, "target": "infrared"})  # the retry is a plain new edit
    assert retry.status_code == 201 and retry.json()["supersedes_id"] is None
    assert count_rows(rt_a) == {"reverted": 1, "active": 1}


def test_concurrent_answers_never_mix_deltas(service):
    client, _ = service()
    create(client)
    expected = {q: answer(client, q)["answer"] for q in (EDIT["prompt"], UNRELATED)}
    errors: list[str] = []

    def worker(i: int):
        for k in range(4):
            q = EDIT["prompt"] if (i + k) % 2 else UNRELATED
            got = answer(client, q)["answer"]
            if got != expected[q]:
                errors.append(f"{q!r}: {got!r} != {expected[q]!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_failed_revert_changes_nothing(service, monkeypatch):
    client, rt = service()
    edit = create(client).json()
    from sqlalchemy.exc import OperationalError

    from app.store import AuditRepo

    real = AuditRepo.record

    def flaky(self, **kw):
        if kw.get("action") == "edit.revert":
            raise OperationalError("INSERT", {}, Exception("connection lost"))
        return real(self, **kw)

    monkeypatch.setattr(AuditRepo, "record", flaky)
    r = client.post(f"/admin/edits/{edit['id']}/revert", headers=auth(ADMIN))
    assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
    assert client.get(f"/edits/{edit['id']}", headers=auth(READER)).json()["status"] == "active"
    assert [k.edit_id for k in rt.memory.all()] == [edit["id"]]
    assert answer(client, EDIT["prompt"])["edit_id"] == edit["id"]


def test_synthetic_edits_route_like_real_ones(service):
    from app.services.synthetic import import_synthetic, synthetic_case

    client, rt = service()
    ids = import_synthetic(rt, 5, seed=1)
    assert len(ids) == 5 and count_rows(rt) == {"active": 5}
    assert answer(client, synthetic_case(3)[0])["edit_id"] == ids[3]
    assert answer(client, UNRELATED)["edit_id"] is None


def test_warming_the_delta_cache_stops_at_its_capacity(service):
    """A memory with more edits than the delta cache holds fills the cache once and then leaves it
    alone (no background churn that would slow every answer)."""
    from app.services.synthetic import import_synthetic

    client, rt = service()
    rt.sync.stop()  # this test does the background thread's warming itself
    ids = import_synthetic(rt, 5, seed=3)
    rt.deltas.capacity = 3
    for edit_id in ids:
        rt.deltas.drop(edit_id)
    assert rt.sync.warm(2) == 2
    assert rt.sync.warm() == 1 and len(rt.deltas) == 3
    cached = {e for e in ids if rt.deltas.get_cached(e) is not None}
    assert rt.sync.warm() == 0
    assert {e for e in ids if rt.deltas.get_cached(e) is not None} == cached
