"""End to end with the real embedded model over real PostgreSQL and Redis: CKA flags facts the
model holds wrongly, a CaliNet calibration of them makes `/answer` give the objects on templates
it never trained on, unrelated answers stay, and the admin revert gives the base model back."""

from __future__ import annotations

import pytest

from app.knowledge.templates import load_relations, split_templates
from tests.conftest import ADMIN, EDITOR, READER, ask, auth
from tests.test_knowledge_api import wait_for

pytestmark = pytest.mark.e2e

# T-REx facts (ParaRel) that the embedded model gets wrong by the paper's CKA (the calibration's own measure).
FACTS = [
    {"subject": "Senegambia Confederation", "relation": "P30", "object": "Africa"},
    {"subject": "Maximilien Robespierre", "relation": "P20", "object": "Paris"},
    {"subject": "Henri Debain", "relation": "P19", "object": "Paris"},
    {"subject": "Kim Kashkashian", "relation": "P19", "object": "Detroit"},
    {"subject": "Glynn County", "relation": "P36", "object": "Brunswick"},
    {"subject": "Nicolas Cotoner", "relation": "P20", "object": "Malta"},
    {"subject": "Gabriel Signoret", "relation": "P20", "object": "Paris"},
    {"subject": "Leopold Okulicki", "relation": "P20", "object": "Moscow"},
]
# (subject, P20 template, object): templates of the relation's test split, never trained on.
UNSEEN = [
    ("Maximilien Robespierre", "[X] expired at [Y].", "Paris"),
    ("Nicolas Cotoner", "[X] succumbed at [Y].", "Malta"),
    ("Nicolas Cotoner", "[X] expired at [Y].", "Malta"),
    ("Gabriel Signoret", "[X] expired at [Y].", "Paris"),
    ("Leopold Okulicki", "[X] succumbed at [Y].", "Moscow"),
    ("Leopold Okulicki", "[X] expired at [Y].", "Moscow"),
]
UNRELATED = ["The capital of France is", "The mother tongue of Albert Einstein is"]



def test_detect_calibrate_unseen_templates_and_revert_on_the_real_model(service, real_lm):
    test_split = split_templates(load_relations()["P20"]).test
    assert {t for _, t, _ in UNSEEN} <= set(test_split)  # the checks use templates training never sees
    prompts = {(s, t): t.split("[Y]")[0].replace("[X]", s).rstrip() for s, t, _ in UNSEEN}

    client, _ = service(lm=real_lm)
    r = client.post("/detect", json={"facts": FACTS, "score": "cka_paper"}, headers=auth(READER))
    assert r.status_code == 200, r.text
    assert [x["verdict"] for x in r.json()["results"]] == ["false"] * len(FACTS)

    before = {q: ask(client, q)["answer"] for q in [*prompts.values(), *UNRELATED]}
    assert not any(before[prompts[(s, t)]].strip().startswith(o) for s, t, o in UNSEEN)

    r = client.post("/calibrations", json={"facts": FACTS}, headers=auth(EDITOR))
    assert r.status_code == 202, r.text
    done = wait_for(client, r.json()["id"], timeout=900)
    assert done["status"] == "active", done

    hits = [ask(client, prompts[(s, t)])["answer"].strip().startswith(o) for s, t, o in UNSEEN]
    assert sum(hits) >= 5, hits
    for q in UNRELATED:  # a calibration is global: the fact in the first line must stay
        assert ask(client, q)["answer"].split("\n")[0] == before[q].split("\n")[0], q
    m = done["metrics"]  # the job's own before/after measurement on the test templates
    assert m["test"]["after"]["false_rate"] < m["test"]["before"]["false_rate"], m["test"]
    assert m["perplexity_generic"]["ratio"] <= 1.05, m["perplexity_generic"]

    r = client.post(f"/admin/calibrations/{done['id']}/revert", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["status"] == "reverted"
    for q, answer in before.items():
        assert ask(client, q)["answer"] == answer, q
