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
    low = client.post("/detect", json={"facts": FACTS[:1], "threshold": -999}, headers=auth(READER)).json()
    high = client.post("/detect", json={"facts": FACTS[:1], "threshold": 999}, headers=auth(READER)).json()
    assert low["results"][0]["verdict"] == "true" and high["results"][0]["verdict"] == "false"
    res = low["results"][0]
    assert res["score_name"] == "contrast" and res["score"] == res["scores"]["contrast"]
    assert set(res["scores"]) >= {"contrast", "pmi", "cka_paper", "p_object"}
    paper = client.post("/detect", json={"facts": FACTS[:1], "score": "cka_paper", "threshold": res["cka"]},
                        headers=auth(READER)).json()["results"][0]
    assert paper["score_name"] == "cka_paper" and paper["score"] == pytest.approx(res["cka"]) and paper["verdict"] == "true"


def test_detect_ranks_the_candidates_of_a_sentence_with_a_blank(service):
    client, _ = service()
    body = {"sentence": "_ is developed by IBM", "candidates": ["Watson", "iPhone", "Windows", "PlayStation"]}
    r = client.post("/detect", json=body, headers=auth(READER))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["match"]["blank"] == "subject" and out["match"]["relation"] in ("P176", "P178")
    assert [x["subject"] for x in out["results"]] == body["candidates"]
    assert {x["object"] for x in out["results"]} == {"IBM"}
    scores = [x["score"] for x in out["results"]]
    assert sorted(out["ranking"]) == [0, 1, 2, 3]
    assert [scores[i] for i in out["ranking"]] == sorted(scores, reverse=True)
    # the same candidates as facts of the matched relation get the same scores
    facts = [{"subject": c, "relation": out["match"]["relation"], "object": "IBM"} for c in body["candidates"]]
    same = client.post("/detect", json={"facts": facts}, headers=auth(READER)).json()["results"]
    assert [x["score"] for x in same] == pytest.approx(scores, abs=1e-4)
    for bad, code in [
        ({"sentence": "IBM makes computers", "candidates": ["a", "b"]}, "invalid_sentence"),
        ({"sentence": "_ tastes of rain", "candidates": ["a", "b"]}, "sentence_not_matched"),
        ({"sentence": "_ is developed by IBM", "candidates": ["a", "b"], "relation": "P9999"}, "unknown_relation"),
        ({"sentence": "_ is developed by IBM"}, "invalid_request"),
        ({"sentence": "_ is developed by IBM", "candidates": ["a", "b"], "facts": FACTS}, "invalid_request"),
    ]:
        r = client.post("/detect", json=bad, headers=auth(READER))
        assert r.status_code == 422 and r.json()["error"]["code"] == code, (bad, r.text)


def test_detect_reports_every_bad_fact_in_place_and_scores_the_rest(service):
    client, _ = service()
    batch = [FACTS[0], {"subject": "France", "relation": "P9999", "object": "Paris"},
             {"subject": "Italy", "relation": "P36", "object": ""}, FACTS[1]]
    r = client.post("/detect", json={"facts": batch}, headers=auth(READER))
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x.get("error", {}).get("code") for x in res] == [None, "unknown_relation", "empty_object", None]
    assert res[0]["verdict"] in ("true", "false") and "verdict" not in res[1]
    bad_only = client.post("/detect", json={"facts": batch[1:3]}, headers=auth(READER))
    assert bad_only.status_code == 422 and bad_only.json()["error"]["code"] == "invalid_facts"
    details = bad_only.json()["error"]["details"]
    assert [(d["index"], d["code"]) for d in details] == [(0, "unknown_relation"), (1, "empty_object")]


def test_detect_accepts_trex_rows_and_any_case_relation_ids(service):
    client, _ = service()
    trex = {"sub_label": "France", "relation": "p36", "obj_label": "Paris", "uuid": "3fe3d4da-9df9-45ba"}
    r = client.post("/detect", json={"facts": [trex, FACTS[0]]}, headers=auth(READER))
    assert r.status_code == 200, r.text
    a, b = r.json()["results"]
    assert a["relation"] == "P36" and a["subject"] == "France" and a["score"] == pytest.approx(b["score"], abs=1e-4)


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
        ({"subject": "France", "object": "Paris", "relation": "P9999", "template": "The capital of [X] is [Y].",
          "negatives": ["[X] hates [Y]."]}, "unknown_relation"),
        ({"subject": "France", "object": "Paris", "relation": "P36", "template": "The capital of [X] is [Y]."},
         "missing_negatives"),
        ({"subject": "France", "object": "Paris", "template": "The capital of [X] is [Y].",
          "negatives": ["The capital of [X] is [Y] ."]}, "negative_is_template"),
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
