"""Detect and calibrate over HTTP with real PostgreSQL and Redis and a tiny model: validation,
the job lifecycle, the calibration taking effect for every answer, and revert restoring the base."""

from __future__ import annotations

import time

import pytest

from tests.conftest import ADMIN, EDITOR, READER, auth, wait_until

FACTS = [
    {"subject": "France", "relation": "P36", "object": "Paris"},
    {"subject": "Italy", "relation": "P36", "object": "Rome"},
]


def wait_for(client, cal_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/calibrations/{cal_id}", headers=auth(READER)).json()
        if body["status"] in ("active", "failed", "reverted"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"calibration {cal_id} did not finish: {body}")


def test_detect_returns_a_verdict_per_fact(service):
    client, _ = service()
    r = client.post("/detect", json={"facts": FACTS}, headers=auth(READER))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2
    for res in results:
        assert res["verdict"] in ("true", "false") and res["cka"] > 0 and 0 <= res["p_object"] <= 1


def test_detect_threshold_decides_the_verdict(service):
    client, _ = service()
    low = client.post("/detect", json={"facts": FACTS[:1], "threshold": 1e-6}, headers=auth(READER)).json()
    high = client.post("/detect", json={"facts": FACTS[:1], "threshold": 999}, headers=auth(READER)).json()
    assert low["results"][0]["verdict"] == "true" and high["results"][0]["verdict"] == "false"


def test_detect_with_explicit_templates(service):
    client, _ = service()
    fact = {"subject": "Alice", "object": "Bob", "template": "[X] is married to [Y] .",
            "negatives": ["[X] has never met [Y] ."]}
    r = client.post("/detect", json={"facts": [fact]}, headers=auth(READER))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "fact, code",
    [
        ({"subject": "France", "relation": "P99999", "object": "Paris"}, "unknown_relation"),
        ({"subject": "France", "object": "Paris", "template": "no slots here", "negatives": ["[X] [Y]"]}, "invalid_template"),
        ({"subject": "France", "relation": "P36", "object": "  "}, "empty_object"),
    ],
)
def test_detect_bad_facts_are_422_with_stable_code(service, fact, code):
    client, _ = service()
    r = client.post("/detect", json={"facts": [fact]}, headers=auth(READER))
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


def test_detect_request_limits(service):
    client, _ = service()
    assert client.post("/detect", json={"facts": []}, headers=auth(READER)).status_code == 422
    too_many = {"facts": FACTS * 501}
    assert client.post("/detect", json=too_many, headers=auth(READER)).status_code == 422
    assert client.post("/detect", json={"facts": FACTS}).status_code == 401


def test_bad_calibrations_store_nothing(service):
    client, rt = service()
    for body, code in [
        ({"facts": []}, "invalid_request"),
        ({"facts": FACTS, "config": {"no_such_knob": 1}}, "invalid_config"),
        ({"facts": FACTS, "config": {"layer": 99}}, "invalid_config"),
        ({"facts": [{"subject": "x", "relation": "P0", "object": "y"}]}, "unknown_relation"),
    ]:
        r = client.post("/calibrations", json=body, headers=auth(EDITOR))
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
    assert client.post("/calibrations", json={"facts": FACTS}, headers=auth(READER)).status_code == 403
    assert client.get("/calibrations", headers=auth(READER)).json()["items"] == []


def test_calibration_job_activates_then_revert_restores_base(service, tiny_llama):
    client, rt = service()
    prompt, obj = "The capital of France is", "Paris"
    base = tiny_llama.score([prompt], [obj], mode="completion")[0].logprob
    cfg = {"steps": 60, "lr": 0.05, "evaluate": False, "layer": 2, "locality_weight": 0.0}
    r = client.post("/calibrations", json={"facts": FACTS, "config": cfg}, headers=auth(EDITOR))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["job"]["status"] == "queued"
    done = wait_for(client, r.json()["id"])
    assert done["status"] == "active", done
    assert done["job"]["status"] == "succeeded" and done["job"]["progress"]["step"] == done["job"]["progress"]["total"]
    calibrated = client.post("/score", json={"items": [{"prompt": prompt, "target": obj}], "mode": "completion"},
                             headers=auth(READER)).json()["results"][0]["logprob"]
    assert calibrated > base + 0.5  # the calibration is active for every query

    assert client.post(f"/admin/calibrations/{done['id']}/revert", headers=auth(EDITOR)).status_code == 403
    r = client.post(f"/admin/calibrations/{done['id']}/revert", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["status"] == "reverted"
    after = client.post("/score", json={"items": [{"prompt": prompt, "target": obj}], "mode": "completion"},
                        headers=auth(READER)).json()["results"][0]["logprob"]
    assert after == pytest.approx(base, abs=1e-4)
    again = client.post(f"/admin/calibrations/{done['id']}/revert", headers=auth(ADMIN))
    assert again.status_code == 200  # idempotent
    assert client.post("/admin/calibrations/00000000-0000-0000-0000-000000000000/revert",
                       headers=auth(ADMIN)).status_code == 404


def test_interrupted_jobs_are_requeued_or_failed(pg_url, schema):
    from app.services.jobs import JobRunner
    from app.store import Database, JobRepo
    from app.store.models import Job

    db = Database(pg_url, schema)
    db.upgrade()
    with db.transaction() as s:
        fresh = JobRepo(s).add(Job(kind="calibration", status="running", payload={}, progress={}, result={}, attempts=1))
        tired = JobRepo(s).add(Job(kind="calibration", status="running", payload={}, progress={}, result={}, attempts=2))
    JobRunner(db, max_attempts=2).recover()
    with db.session() as s:
        assert JobRepo(s).get(fresh.id).status == "queued"
        assert JobRepo(s).get(tired.id).status == "failed"
    db.dispose()


def test_shutdown_interrupts_a_running_calibration_queues_it_and_clears_the_model(service, tiny_llama):
    """Stopping the service mid-training: the job and its calibration go back to `queued` (the
    next start runs them), nothing is activated, and the shared model keeps no global delta."""
    client, rt = service()
    cfg = {"steps": 100000, "lr": 0.001, "evaluate": False, "layer": 2, "locality_weight": 0.0}
    r = client.post("/calibrations", json={"facts": FACTS, "config": cfg}, headers=auth(EDITOR))
    assert r.status_code == 202, r.text
    cal_id = r.json()["id"]

    def running() -> bool:
        job = client.get(f"/calibrations/{cal_id}", headers=auth(READER)).json()["job"]
        return job["status"] == "running" and (job["progress"] or {}).get("step", 0) >= 1

    assert wait_until(running, timeout=60)
    rt.close()
    with rt.db.session() as s:
        from app.store import CalibrationRepo, JobRepo

        cal = CalibrationRepo(s).get(cal_id)
        job = JobRepo(s).get(cal.job_id)
        assert (cal.status, job.status) == ("queued", "queued")
    assert tiny_llama.global_keys() == []
