"""Edits (and calibrations) as jobs, with a tiny model over real PostgreSQL and Redis: `Prefer: respond-async` queues
the edit and answers 202 with its job (in-process and on workers); with FACTPATCH_TRAINING=workers
the replica trains nothing itself, `POST /edits` waits for a worker's result, refuses at once when
no worker is alive, answers 504 `edit_pending` past its wait, and a job run again finds its
stored edit instead of storing another."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import EDITOR, READER, auth, wait_until

# Few, cheap steps: the tiny model takes the target as its argmax in a few (completion form only).
QUICK = {"max_steps": 60, "kl_weight": 0.0, "locality_prompts": 0, "subject_templates": 0, "relation_frames": 0,
         "chat": False, "min_prob": 0.0}
EDIT = {"prompt": "The favourite colour of Zorblax Quint is", "target": "ultraviolet",
        "subject": "Zorblax Quint", "config": QUICK}
ASYNC = {"Prefer": "respond-async"}


def answer(client, q, n=4):
    r = client.get("/answer", params={"q": q, "max_new_tokens": n, "mode": "completion"}, headers=auth(READER))
    assert r.status_code == 200, r.text
    return r.json()


def job(client, job_id):
    r = client.get(f"/jobs/{job_id}", headers=auth(READER))
    assert r.status_code == 200, r.text
    return r.json()


def rows(rt) -> tuple[dict, int]:
    from sqlalchemy import func, select

    from app.store import EditRepo
    from app.store.models import Job

    with rt.db.session() as s:
        return EditRepo(s).count_by_status(), s.scalar(select(func.count()).select_from(Job))


@pytest.fixture
def worker(tmp_path, pg_url, schema, redis_url, redis_prefix, tiny_llama):
    """Start a worker runtime (in a thread of this process) on the service's database and queue."""
    from app.runtime import Runtime, run_worker
    from tests.conftest import make_settings

    started = []

    def start(**extra):
        settings = make_settings(tmp_path, pg_url=pg_url, schema=schema, redis_url=redis_url,
                                 redis_prefix=redis_prefix, training="workers", **extra)
        rt = Runtime.build(settings, lm=tiny_llama, worker=True)
        stop = threading.Event()
        thread = threading.Thread(target=run_worker, args=(rt, stop), daemon=True)
        thread.start()
        started.append((rt, stop, thread))
        assert wait_until(lambda: len(rt.queue.workers()) >= 1, 10)
        return rt

    yield start
    for rt, stop, thread in started:
        stop.set()
        thread.join(30)
        rt.close()


def test_respond_async_in_process_queues_the_edit_and_a_rerun_stores_nothing_twice(service):
    client, rt = service()
    before = answer(client, EDIT["prompt"])
    r = client.post("/edits", json=EDIT, headers={**auth(EDITOR), **ASYNC})
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["Location"] == f"/jobs/{body['job_id']}" and r.headers["Preference-Applied"] == "respond-async"
    assert wait_until(lambda: job(client, body["job_id"])["status"] == "succeeded", 60)
    done = job(client, body["job_id"])
    assert done["kind"] == "edit" and done["result"]["edit_id"] == body["edit_id"] and done["attempts"] == 1
    edit = client.get(f"/edits/{body['edit_id']}", headers=auth(READER)).json()
    assert edit["status"] == "active" and edit["metrics"]["success"] > 0
    after = answer(client, EDIT["prompt"])
    assert after["edit_id"] == body["edit_id"] and after["answer"].startswith("ultraviolet")
    assert not before["answer"].startswith("ultraviolet")
    # A bad request is refused before anything is queued.
    r = client.post("/edits", json={**EDIT, "method": "nope"}, headers={**auth(EDITOR), **ASYNC})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_method"
    assert rows(rt) == ({"active": 1}, 1)
    # A worker that died between the commit and marking its job done: the job's next run finds
    # the edit by its pre-chosen id and stores nothing again.
    from app.store.models import Job

    with rt.db.transaction() as s:  # as the dead worker left it
        row = s.get(Job, body["job_id"])
        row.status, row.result = "running", {}
    ran = rt.jobs.run_job(body["job_id"])
    assert ran
    done = job(client, body["job_id"])
    assert done["status"] == "succeeded" and done["result"]["edit_id"] == body["edit_id"] and done["attempts"] == 2
    assert rows(rt) == ({"active": 1}, 1)
    # A third delivery finds the job finished and does nothing.
    assert not rt.jobs.run_job(body["job_id"])
    assert job(client, body["job_id"])["attempts"] == 2


def test_workers_mode_refuses_without_a_worker_waits_for_one_and_ends_in_504_past_its_wait(service, worker):
    client, rt = service(training="workers", worker_heartbeat_seconds=3)
    assert client.get("/health").json()["training"] == {"mode": "workers", "workers": 0}
    r = client.post("/edits", json=EDIT, headers={**auth(EDITOR), "Idempotency-Key": "k-1"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "workers_unavailable"
    assert rows(rt) == ({}, 0)  # nothing stored, nothing queued

    wrt = worker(worker_heartbeat_seconds=3)
    assert client.get("/health").json()["training"] == {"mode": "workers", "workers": 1}
    before = answer(client, EDIT["prompt"])
    r = client.post("/edits", json=EDIT, headers={**auth(EDITOR), "Idempotency-Key": "k-1"})
    assert r.status_code == 201, r.text
    edit = r.json()
    assert edit["metrics"]["success"] > 0
    # The replica that answered the POST serves the edit at once; the worker trained it.
    after = answer(client, EDIT["prompt"])
    assert after["edit_id"] == edit["id"] and after["answer"].startswith("ultraviolet")
    assert not before["answer"].startswith("ultraviolet")
    assert edit["id"] in set(wrt.selector.edit_ids())
    # The same request again: the stored edit, nothing queued.
    again = client.post("/edits", json=EDIT, headers={**auth(EDITOR), "Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true" and again.json()["id"] == edit["id"]
    other = client.post("/edits", json={**EDIT, "target": "infrared"}, headers={**auth(EDITOR), "Idempotency-Key": "k-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert rows(rt) == ({"active": 1}, 1)
    # Past its wait the request ends in 504 with the job to poll; the job goes on.
    body = {**EDIT, "prompt": "The pet of Quibble Marsh is a", "subject": "Quibble Marsh", "target": "heron"}
    r = client.post("/edits", json=body, headers={**auth(EDITOR), "Prefer": "wait=0.01"})
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "edit_pending" and err["job_id"] in err["message"]
    assert wait_until(lambda: job(client, err["job_id"])["status"] == "succeeded", 60)
    edit = client.get(f"/edits/{err['edit_id']}", headers=auth(READER)).json()
    assert edit["status"] == "active" and edit["target"] == "heron"
    assert rows(rt) == ({"active": 2}, 2)

    # A calibration is a job too: queued by the replica, run by the worker, active everywhere.
    facts = [{"subject": "France", "relation": "P36", "object": "Paris"}]
    cfg = {"steps": 20, "lr": 0.05, "evaluate": False, "layer": 2, "locality_weight": 0.0}
    r = client.post("/calibrations", json={"facts": facts, "config": cfg}, headers=auth(EDITOR))
    assert r.status_code == 202, r.text
    cal_id = r.json()["id"]

    def calibration():
        return client.get(f"/calibrations/{cal_id}", headers=auth(READER)).json()

    assert wait_until(lambda: calibration()["status"] in ("active", "failed"), 60)
    assert calibration()["status"] == "active" and calibration()["job"]["status"] == "succeeded"
    # A message for a job whose claim another holder has (a worker still running it after the
    # queue handed its message on) comes back later, and the job runs once the claim is free.
    import uuid

    from app.services.edit_jobs import _KEY_NAMESPACE

    held = str(uuid.uuid5(_KEY_NAMESPACE, "k-held"))
    body = {**EDIT, "prompt": "The pet of Orrin Tavel is a", "subject": "Orrin Tavel", "target": "badger"}
    with rt.db.claim(f"job:{held}") as claimed:
        assert claimed
        r = client.post("/edits", json=body, headers={**auth(EDITOR), **ASYNC, "Idempotency-Key": "k-held"})
        assert r.status_code == 202 and r.json()["job_id"] == held
        assert not wait_until(lambda: job(client, held)["status"] != "queued", 2)
    assert wait_until(lambda: job(client, held)["status"] == "succeeded", 60)
    assert job(client, held)["attempts"] == 1
