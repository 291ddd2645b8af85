"""Repair on a tiny random model: a planted wrong fact in a small calibration is found first for the
failure it causes and its treatment fixes that failure while the other facts hold; over HTTP,
`apply: false` changes nothing served, an applied repair changes the answer and its revert
restores it."""

from __future__ import annotations

import time

import pytest
import torch

from app.knowledge.cka import ScoreItem, encode_item
from app.knowledge.facts import Fact
from app.methods.calinet import CaliNetConfig, calibrate
from app.methods.repair import Failure, RepairConfig, ScopedCalibration, build_questions, repair
from app.methods.repair.method import score_rows
from tests.conftest import ADMIN, EDITOR, READER, auth

T = "[X] lives in [Y]."
OTHERS = [("Maria", "Rome"), ("Kenji", "Berlin"), ("Olga", "Madrid"), ("Pedro", "Vienna"), ("Aisha", "Lisbon")]
CAL = dict(steps=60, lr=0.05, slots=16, evaluate=False, locality_weight=0.0, kl_weight=0.0, eval_every=1000)


def base_object(lm, subject: str) -> str:
    """The base model's own greedy one-token object for ``subject`` (what it 'knows')."""
    p, _, _ = encode_item(lm, ScoreItem(T, subject, "x"))
    with torch.no_grad(), lm.active(None, include_global=False):
        logits = lm.model(input_ids=torch.tensor([p])).logits[0, -1]
    for t in logits.argsort(descending=True)[:50].tolist():
        obj = lm.tokenizer.decode([t]).strip()
        if obj.isalpha() and len(obj) > 2 and encode_item(lm, ScoreItem(T, subject, obj))[1] == [t]:
            return obj
    raise AssertionError("no usable base answer")


def planted_facts(lm) -> tuple[list[Fact], Fact]:
    """Calibration facts with a wrong object for Paul first, and the true fact it breaks."""
    known = base_object(lm, "Paul")
    wrong = "Paris" if known != "Paris" else "Oslo"
    facts = [Fact("Paul", wrong, None, T)] + [Fact(s, o, None, T) for s, o in OTHERS]
    return facts, Fact("Paul", known, None, T)


def rows_of(lm, facts):
    return [tuple(encode_item(lm, ScoreItem(T, f.subject, f.object))[:2]) for f in facts]


@pytest.fixture(scope="module")
def planted(tiny_llama):
    facts, truth = planted_facts(tiny_llama)
    result = calibrate(tiny_llama, facts, CaliNetConfig(**CAL))
    assert all(ok for _, ok in score_rows(tiny_llama, rows_of(tiny_llama, facts), [result.delta]))
    return facts, truth, result.delta


def test_planted_wrong_fact_ranks_first_and_its_treatment_fixes_the_failure(tiny_llama, planted):
    lm = tiny_llama
    facts, truth, delta = planted
    questions = build_questions(lm, [Failure(fact=truth)])
    assert [q.half for q in questions] == ["query"]
    assert not score_rows(lm, [(questions[0].prompt, questions[0].target)], [delta])[0][1]  # the failure

    out = repair(lm, questions, [ScopedCalibration("cal", delta, facts)], [],
                 config=RepairConfig(top_k=1, treatment="finetune"))
    assert out.causes[0].kind == "calibration_fact" and out.causes[0].fact == 0
    assert out.causes[0].score > out.causes[1].score
    assert [(c.id, c.fact) for c in out.treated] == [("cal", 0)]
    assert out.report["failures"]["query"]["fixed"] == 1
    # the repair is a new delta on top of the calibration's, which stays as it was
    repaired = [delta, out.deltas["cal"]]
    assert score_rows(lm, [(questions[0].prompt, questions[0].target)], repaired)[0][1]
    assert all(ok for _, ok in score_rows(lm, rows_of(lm, facts[1:]), repaired))
    assert out.report["remaining_facts"]["accuracy_after"] == 1.0


def test_newton_removal_keeps_the_other_facts(tiny_llama, planted):
    """The Newton step is chosen on the query half within the guards: whatever it does to the
    failure, the facts not treated keep their answers."""
    lm = tiny_llama
    facts, truth, delta = planted
    questions = build_questions(lm, [Failure(fact=truth)])
    out = repair(lm, questions, [ScopedCalibration("cal", delta, facts)], [],
                 config=RepairConfig(top_k=1, treatment="newton"))
    assert out.causes[0].fact == 0
    assert out.report["step_size"] is not None and out.report["step_search"]
    assert all(ok for _, ok in score_rows(lm, rows_of(lm, facts[1:]), [delta, out.deltas["cal"]]))
    influence = repair(lm, questions, [ScopedCalibration("cal", delta, facts)], [],
                       config=RepairConfig(top_k=1, identify="influence", treatment="revert"))
    assert influence.deltas == {} and len(influence.causes) == len(facts)



TRUE = [("Paul", "Lyon"), ("Maria", "Rome"), ("Kenji", "Berlin"), ("Olga", "Madrid"), ("Pedro", "Vienna"), ("Aisha", "Lisbon")]


@pytest.fixture(scope="module")
def knowing():
    """A tiny model of its own, taught the TRUE facts (a few Adam steps on its weights: it must hold
    them with a margin, which a random model does not), and a calibration in which a wrong object
    for Paul pulls his answer away; the other facts are calibrated with their true objects."""
    from app.lm.testing import tiny_lm
    from app.methods.repair.method import _row_logp

    lm = tiny_lm("llama", seed=1)
    rows = [tuple(encode_item(lm, ScoreItem(T, s, o))[:2]) for s, o in TRUE]
    params = list(lm.model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=2e-3)
    for _ in range(25):
        loss = -_row_logp(lm, rows, []).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    facts = [Fact("Paul", "Paris", None, T)] + [Fact(s, o, None, T) for s, o in TRUE[1:]]
    cal = dict(CAL, steps=40)
    return lm, facts, Fact("Paul", "Lyon", None, T), cal, calibrate(lm, facts, CaliNetConfig(**cal)).delta


def test_newton_removal_with_the_empirical_fisher_fixes_the_failure_of_a_planted_fact(knowing):
    lm, facts, truth, cal, delta = knowing
    true_rows = rows_of(lm, [truth] + facts[1:])
    assert all(ok for _, ok in score_rows(lm, true_rows, []))  # the model knows every true fact
    assert not score_rows(lm, true_rows[:1], [delta])[0][1]  # the calibration broke Paul's answer
    # ... and the planted fact is why: calibrated without it, Paul is answered right (the reference)
    without = calibrate(lm, facts[1:], CaliNetConfig(**cal)).delta
    assert all(ok for _, ok in score_rows(lm, true_rows, [without]))

    questions = build_questions(lm, [Failure(fact=truth)])
    out = repair(lm, questions, [ScopedCalibration("cal", delta, facts)], [],
                 config=RepairConfig(top_k=1, treatment="newton", curvature="empirical"))
    assert out.causes[0].fact == 0 and out.causes[0].score > out.causes[1].score
    assert out.report["failures"]["query"]["fixed"] == 1
    repaired = [delta, out.deltas["cal"]]
    assert all(ok for _, ok in score_rows(lm, true_rows, repaired))  # Paul fixed, the others still hold
    assert out.report["perplexity_generic"]["ratio"] <= 1.01


# -- over HTTP -----------------------------------------------------------------------------------


def _wait(client, path: str, done: tuple[str, ...], timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(path, headers=auth(READER)).json()
        if body["status"] in done:
            return body
        time.sleep(0.2)
    raise AssertionError(f"{path} did not finish: {body}")


def _score(client, prompt: str, target: str) -> float:
    r = client.post("/score", json={"items": [{"prompt": prompt, "target": target}], "mode": "completion"},
                    headers=auth(READER))
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["logprob"]


def test_repair_over_http_report_apply_and_revert(service, tiny_llama):
    client, rt = service()
    facts, truth = planted_facts(tiny_llama)
    body = {"facts": [{"subject": f.subject, "object": f.object, "template": T, "negatives": ["[X] never saw [Y]."]}
                      for f in facts], "config": CAL}
    r = client.post("/calibrations", json=body, headers=auth(EDITOR))
    assert r.status_code == 202, r.text
    cal = _wait(client, f"/calibrations/{r.json()['id']}", ("active", "failed"))
    assert cal["status"] == "active", cal
    prompt = "Paul lives in"
    probes = [(prompt, truth.object), (prompt, facts[0].object), ("Maria lives in", "Rome")]
    served = [_score(client, p, t) for p, t in probes]
    failure = {"subject": "Paul", "object": truth.object, "template": T, "negatives": ["[X] never saw [Y]."]}

    # bad requests: clear 4xx, nothing stored
    assert client.post("/repairs", json={"failures": []}, headers=auth(EDITOR)).status_code == 422
    bad = client.post("/repairs", json={"failures": [failure], "treatment": "magic"}, headers=auth(EDITOR))
    assert bad.status_code == 422 and bad.json()["error"]["code"]
    assert client.post("/repairs", json={"failures": [failure]}, headers=auth(READER)).status_code == 403
    r = client.post("/repairs", json={"failures": [failure], "apply": True}, headers=auth(EDITOR))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    missing = client.post("/repairs", json={"failures": [failure], "scope": {
        "calibrations": ["00000000-0000-0000-0000-000000000000"]}}, headers=auth(EDITOR))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "calibration_not_found"

    # apply: false reports and changes nothing served
    globals_before = rt.lm.global_keys()
    r = client.post("/repairs", json={"failures": [failure], "treatment": "finetune", "config": {"top_k": 1}},
                    headers=auth(EDITOR))
    assert r.status_code == 202, r.text
    rep = _wait(client, f"/repairs/{r.json()['id']}", ("reported", "active", "failed"))
    assert rep["status"] == "reported", rep
    first = rep["result"]["causes"][0]
    assert first["kind"] == "calibration_fact" and first["id"] == cal["id"] and first["fact"] == 0
    assert rep["result"]["failures"]["query"]["fixed"] == 1
    assert rt.lm.global_keys() == globals_before
    assert [_score(client, p, t) for p, t in probes] == pytest.approx(served, abs=1e-5)

    # applied by an admin: the answer changes; the calibration's own delta is untouched
    r = client.post("/repairs", json={"failures": [failure], "treatment": "finetune", "apply": True,
                                      "config": {"top_k": 1}}, headers=auth(ADMIN))
    assert r.status_code == 202, r.text
    rep = _wait(client, f"/repairs/{r.json()['id']}", ("reported", "active", "failed"))
    assert rep["status"] == "active", rep
    # "active" is the committed result; this process switches the deltas on right after, and the
    # job has succeeded once they are on (other replicas follow by polling)
    deadline = time.monotonic() + 60
    while rep["job"]["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
        rep = client.get(f"/repairs/{rep['id']}", headers=auth(READER)).json()
    assert rep["job"]["status"] == "succeeded", rep
    assert any(k.startswith(f"repair:{rep['id']}") for k in rt.lm.global_keys())
    fixed = [_score(client, p, t) for p, t in probes]
    assert fixed[0] > served[0] and fixed[1] < served[1]
    assert client.get(f"/calibrations/{cal['id']}", headers=auth(READER)).json()["status"] == "active"

    # revert: admin only, restores what was served
    assert client.post(f"/admin/repairs/{rep['id']}/revert", headers=auth(EDITOR)).status_code == 403
    r = client.post(f"/admin/repairs/{rep['id']}/revert", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["status"] == "reverted"
    assert rt.lm.global_keys() == globals_before
    assert [_score(client, p, t) for p, t in probes] == pytest.approx(served, abs=1e-5)
    assert client.post("/admin/repairs/00000000-0000-0000-0000-000000000000/revert",
                       headers=auth(ADMIN)).status_code == 404


def test_a_bad_edit_is_found_by_leaving_it_out_and_reverted(tiny_llama, planted):
    """Edits are their own data: leaving one out is exact (the questions it serves, answered with
    and without it). The edit that serves the failing question and pushes its answer away ranks
    first; edits serving nothing in F score 0; the treatment switches it off."""
    from app.delta import Delta
    from app.methods.repair import ScopedEdit

    lm = tiny_llama
    facts, truth, delta = planted
    questions = build_questions(lm, [Failure(fact=truth)])
    q = questions[0]
    from app.lm.arch import linear_dims

    mlp = lm.arch.blocks[-1].mlp_out
    d_in, d_out = linear_dims(lm.arch.module(mlp))
    gen = torch.Generator().manual_seed(0)

    def lora(scale: float) -> Delta:
        a = torch.randn(2, d_in, generator=gen) * scale
        b = torch.randn(d_out, 2, generator=gen) * scale
        return Delta("lora", {f"{mlp}::A": a, f"{mlp}::B": b}, {"scale": "1.0"})

    # the bad edit: an adapter that pushes the failing question's answer further away
    base_lp = score_rows(lm, [(q.prompt, q.target)], [delta])[0][0]
    bad = lora(4.0)
    if score_rows(lm, [(q.prompt, q.target)], [delta, bad])[0][0] > base_lp:
        bad = Delta("lora", {f"{mlp}::A": bad.get(mlp, "A"), f"{mlp}::B": -bad.get(mlp, "B")}, dict(bad.meta))
    assert score_rows(lm, [(q.prompt, q.target)], [delta, bad])[0][0] < base_lp - 0.01
    goods = [ScopedEdit(f"good-{i}", lora(0.1)) for i in range(5)]
    edits = goods[:2] + [ScopedEdit("bad", bad)] + goods[2:]
    out = repair(lm, questions, [], edits, background=[delta], routes=["bad"],
                 config=RepairConfig(top_k=1, treatment="revert"))
    ranked = out.causes
    assert [c.kind for c in ranked] == ["edit"] * 6
    assert ranked[0].id == "bad" and ranked[0].score > 0.01
    assert all(c.score == 0.0 for c in ranked[1:])
    assert out.reverted_edits == ["bad"] and out.deltas == {}


def test_empirical_curvature_solves_the_damped_fisher_exactly():
    """The Woodbury solve of ``(λI + GᵀG) x = v`` matches the dense solve; the diagonal form divides."""
    from app.methods.repair.method import Curvature

    g = torch.Generator().manual_seed(0)
    G = torch.randn(5, 40, generator=g)
    v = torch.randn(40, generator=g)
    c = Curvature("empirical", G, G.pow(2).sum(0), 5, damping=0.5)
    H = (G.T @ G).double() + c.lam * torch.eye(40, dtype=torch.float64)
    assert torch.allclose(c.solve(v).double(), torch.linalg.solve(H, v.double()), atol=1e-5)
    assert c.lam == pytest.approx(0.5 * float(G.pow(2).sum()) / 40)
    d = Curvature("diagonal", G, G.pow(2).sum(0), 5, damping=0.5)
    fisher = G.pow(2).sum(0) / 5
    assert torch.allclose(d.solve(v), v / (5 * (fisher + 0.5 * fisher.mean())))
