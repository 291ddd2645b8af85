"""Edit metrics on hand-made cases with known answers, and the runner on a model stub."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app.eval import metrics as M
from app.eval.backends import AnswerOutcome, EditOutcome, ScoreOutcome
from app.eval.datasets import EditCase
from app.eval.runner import EvalConfig, Runner, answer_budget


# -- pure metrics ------------------------------------------------------------------------------------
def test_bootstrap_interval_contains_mean_and_is_seeded():
    values = [0.91, 0.13, 0.57, 0.88, 0.02, 0.66, 0.74, 0.39, 0.95, 0.21, 0.5, 0.25]
    mean = sum(values) / len(values)
    low, high = M.bootstrap_ci(values, seed=3)
    assert low <= mean <= high
    assert 0 <= low < high <= 1
    assert M.bootstrap_ci(values, seed=3) == (low, high)
    assert M.bootstrap_ci(values, seed=4) != (low, high)


def test_bootstrap_interval_narrows_with_more_data():
    small = [1, 0] * 5
    large = [1, 0] * 500
    ls, hs = M.bootstrap_ci(small, seed=0)
    ll, hl = M.bootstrap_ci(large, seed=0)
    assert (hl - ll) < (hs - ls)
    assert ll < 0.5 < hl


def test_summarize_skips_none_and_handles_constant_and_empty():
    s = M.summarize([True, None, True, True])
    assert s.mean == 1.0 and s.low == 1.0 and s.high == 1.0 and s.n == 3
    e = M.summarize([None, None])
    assert e.mean is None and e.n == 0 and e.fmt() == "n/a"
    with pytest.raises(ValueError):
        M.bootstrap_ci([])


def test_percentiles_and_latency_summary():
    values = list(range(1, 101))  # 1..100
    assert M.percentile(values, 50) == pytest.approx(50.5)
    assert M.percentile(values, 95) == pytest.approx(95.05)
    s = M.latency_summary(values)
    assert s["n"] == 100 and s["p99"] == pytest.approx(99.01) and s["mean"] == pytest.approx(50.5)
    assert M.latency_summary([])["p50"] is None
    sp = M.spread([3.0, 1.0, 2.0])
    assert sp["median"] == 2.0 and sp["min"] == 1.0 and sp["max"] == 3.0


@pytest.mark.parametrize(
    "generated,target,expected",
    [
        (" Paris, the capital", "Paris", True),
        ("Paris", " Paris ", True),
        (" Parisian food", "Paris", False),
        (" paris", "Paris", False),
        (" New  York City", "New York", True),
        (" Par", "Paris", False),
        ("", "Paris", False),
        (" 1789.", "1789", True),
    ],
)
def test_greedy_exact_match(generated, target, expected):
    assert M.greedy_exact_match(generated, target) is expected


def test_generation_agrees_ignores_whitespace_only():
    assert M.generation_agrees(" the BBC", "the  BBC ")
    assert not M.generation_agrees(" the BBC", " the ITV")


def test_locality_token_agreement_uses_positions_known_before():
    # Pre-edit model reproduces tokens 0,1,3 of its own continuation; post-edit keeps 0 and 3.
    assert M.locality_token_agreement([True, True, False, True], [True, False, True, True], 0.75) == pytest.approx(2 / 3)
    # Without per-token flags: the post-edit accuracy on the pre-edit continuation.
    assert M.locality_token_agreement(None, None, 0.5) == 0.5
    # Nothing of the reference reproduced before the edit: not measurable.
    assert M.locality_token_agreement([False], [True], 0.4) is None
    assert M.locality_token_agreement(None, None, 0.4, 0.0) is None
    # Pre-edit accuracy on its own (re-tokenised) output below 1: relative, capped at 1.
    assert M.locality_token_agreement(None, None, 0.9, 0.9) == 1.0
    assert M.locality_token_agreement(None, None, 0.45, 0.9) == pytest.approx(0.5)


def test_performance_deterioration():
    assert M.performance_deterioration(0.8, 0.6) == pytest.approx(0.25)
    assert M.performance_deterioration(1.0, 1.0) == 0.0
    assert M.performance_deterioration(0.0, 0.5) is None
    assert M.performance_deterioration(1.0, None) is None


def test_fu_ratio_counts_only_forgotten_updates():
    after = [True, True, False, True, True]
    final = [True, False, True, False, True]
    fu = M.fu_ratio(after, final)
    assert (fu.updated, fu.forgotten) == (4, 2)
    assert fu.ratio == pytest.approx(0.5)
    assert M.fu_ratio([False], [False]).ratio is None
    with pytest.raises(ValueError):
        M.fu_ratio([True], [])


def test_routing_confusion():
    r = M.routing_confusion([("a", "a"), ("a", None), ("b", "a"), ("c", "c")], [None, None, "b"])
    assert (r.in_correct, r.in_missed, r.in_wrong_edit, r.out_rejected, r.out_routed) == (2, 1, 1, 2, 1)
    assert r.recall == pytest.approx(0.5)
    assert r.precision == pytest.approx(0.5)
    assert r.false_positive_rate == pytest.approx(1 / 3)
    assert r.accuracy == pytest.approx(4 / 7)
    d = r.as_dict()
    assert d["recall"] == r.recall and d["in_correct"] == 2


def test_answer_budget_covers_target_characters():
    assert answer_budget("Paris", 48) >= 4
    assert answer_budget("x" * 500, 48) == 48


# -- the runner on a stub service --------------------------------------------------------------------
class StubService:
    """A model stub with a selector by subject: only the last ``capacity`` edits stay active.

    Base model: knows ``facts`` (prompt -> answer) and answers "something" otherwise. An edit's
    subject appearing in a query routes it to that edit, whose answer is the target.
    """

    batch = 4

    def __init__(self, facts: dict[str, str], capacity: int | None = None):
        self.facts = facts
        self.capacity = capacity
        self.edits: dict[str, tuple[EditCase, int]] = {}
        self.active: list[str] = []
        self.reverted: list[str] = []
        self.payloads: list[dict] = []

    def model_id(self) -> str:
        return "stub"

    def edit(self, case, method, config=None):
        from app.eval.backends import edit_payload

        self.payloads.append(edit_payload(case, method, config))
        eid = f"e{len(self.edits)}"
        self.edits[eid] = (case, len(self.edits))
        self.active.append(eid)
        if self.capacity is not None:
            self.active = self.active[-self.capacity :]
        return EditOutcome(eid, 10.0 + len(self.edits), 20.0, {})

    def revert(self, edit_id):
        self.reverted.append(edit_id)
        if edit_id in self.active:
            self.active.remove(edit_id)

    def _route(self, q: str) -> str | None:
        for eid in reversed(self.active):
            subject = self.edits[eid][0].subject
            if subject and subject in q:
                return eid
        return None

    def _text(self, q: str) -> tuple[str, str | None]:
        eid = self._route(q)
        if eid:
            return " " + self.edits[eid][0].target + " indeed", eid
        return " " + self.facts.get(q, "something else entirely"), None

    def answer(self, queries, mode, max_new_tokens):
        out = []
        for q in queries:
            text, eid = self._text(q)
            out.append(AnswerOutcome(" ".join(text.split()[:max_new_tokens]), eid, 0.9 if eid else None, 1.0))
        return out

    def score(self, pairs, mode):
        out = []
        for prompt, target in pairs:
            text, eid = self._text(prompt)
            want, got = target.split(), text.split()
            correct = [i < len(got) and got[i] == w for i, w in enumerate(want)]
            out.append(ScoreOutcome(-1.0, sum(correct) / len(correct), all(correct), eid, None, correct))
        return out

    def close(self):
        pass


def _cases(k: int) -> list[EditCase]:
    return [
        EditCase(str(i), f"S{i} plays", f"T{i} sport", f"S{i}", f"truth{i}", f"The game of S{i} is",
                 f"Unrelated {i} is", f"x{i}")
        for i in range(k)
    ]


def _facts(cases) -> dict[str, str]:
    facts = {c.locality_prompt: f"base answer {c.case_id}" for c in cases}
    # The base model knows the truth of every other held record.
    facts.update({c.prompt: c.truth for c in cases if int(c.case_id) % 2 == 0})
    return facts


def _run(tmp_path: Path, cases, backend, **kw):
    from app.eval.datasets import Dataset

    ds = Dataset("counterfact", tmp_path / "x.json", "0" * 64, cases)
    cfg = EvalConfig(dataset="counterfact", file=ds.path, **{"method": "stub", **kw})
    return Runner(backend, cfg).run(ds)


def test_sequential_run_on_stub_measures_forgetting(tmp_path):
    cases = _cases(12)
    stub = StubService(_facts(cases), capacity=2)
    res = _run(tmp_path, cases, stub, n=4, curve_every=2, held=3)
    base, edited = res.rows
    assert base["name"] == "base (no edits)"
    assert base["rel_tf"]["mean"] == 0.0 and base["loc_em"]["mean"] == 1.0
    # Only the last 2 of 4 edits survive: reliability and generalization 0.5, locality untouched.
    assert edited["rel_tf"]["mean"] == pytest.approx(0.5)
    assert edited["rel_em"]["mean"] == pytest.approx(0.5)
    assert edited["gen_em"]["mean"] == pytest.approx(0.5)
    assert edited["loc_tf"]["mean"] == 1.0 and edited["loc_em"]["mean"] == 1.0
    assert res.fu == {"updated": 4, "forgotten": 2, "ratio": 0.5}
    # Held set: unedited records (ids 4..11) whose truth the base knows: the even ones, capped at 3.
    assert res.held["size"] == 3 and res.held["case_ids"] == ["4", "6", "8"]
    assert edited["held_accuracy"] == 1.0 and edited["performance_deterioration"] == 0.0
    # Curves after 2 and 4 edits; after 2 edits nothing is forgotten yet.
    assert [p["edits"] for p in res.curves] == [2, 4]
    assert res.curves[0]["rel_tf"] == 1.0 and res.curves[1]["rel_tf"] == 0.5
    r = res.routing
    assert (r["in_correct"], r["in_missed"], r["out_routed"]) == (4, 4, 0)
    # The edit requests never carried the paraphrase or the locality prompt.
    assert all(set(p) <= {"prompt", "target", "subject", "method", "config"} for p in stub.payloads)
    assert res.timing["edit_fit_ms"]["n"] == 4
    json.dumps(res.as_dict())  # serialisable as results.json


def test_independent_run_reverts_every_edit(tmp_path):
    cases = _cases(6)
    stub = StubService(_facts(cases))
    res = _run(tmp_path, cases, stub, n=3, sequential=False)
    assert stub.reverted == ["e0", "e1", "e2"] and stub.active == []
    edited = res.rows[1]
    assert edited["rel_tf"]["mean"] == 1.0 and edited["gen_tf"]["mean"] == 1.0 and edited["loc_em"]["mean"] == 1.0
    assert res.fu is None and res.curves == []
    assert res.routing["in_correct"] == 6


def test_independent_run_measures_held_accuracy_with_each_edit_in_place(tmp_path):
    cases = _cases(8)
    c = cases[0]  # its subject "S" is in every question: while it is in place, every held answer changes
    cases[0] = EditCase(c.case_id, c.prompt, c.target, "S", c.truth, c.paraphrase, c.locality_prompt,
                        c.locality_answer)
    res = _run(tmp_path, cases, StubService(_facts(cases)), n=2, sequential=False, held=3)
    assert res.held["case_ids"] == ["2", "4", "6"]
    edited = res.rows[1]
    # Edit 0 breaks all three held answers, edit 1 none; each is reverted before the next.
    assert edited["held_accuracy"] == pytest.approx(0.5)
    assert edited["performance_deterioration"] == pytest.approx(0.5)
    assert res.routing["out_routed"] >= 3  # the held questions routed to edit 0 count as outside queries routed


def test_sequential_run_detects_locality_damage(tmp_path):
    cases = _cases(4)
    for i, c in enumerate(cases):  # locality prompts mention the subject: the stub routes them wrongly
        cases[i] = EditCase(c.case_id, c.prompt, c.target, c.subject, c.truth, c.paraphrase,
                            f"Near {c.subject} is", c.locality_answer)
    stub = StubService(_facts(cases))
    res = _run(tmp_path, cases, stub, n=4)
    assert res.rows[1]["loc_em"]["mean"] == 0.0
    assert res.routing["out_routed"] == 4


def test_refused_edit_is_recorded_and_run_goes_on(tmp_path):
    from app.eval.backends import BackendError

    cases = _cases(3)
    stub = StubService(_facts(cases))
    real_edit = stub.edit

    def edit(case, method, config=None):
        if case.case_id == "1":
            raise BackendError(422, "target_already_holds", "nothing to edit")
        return real_edit(case, method, config)

    stub.edit = edit
    res = _run(tmp_path, cases, stub, n=3)
    assert res.extra["edit_errors"] == {"target_already_holds": 1}
    assert [c["edit_id"] for c in res.cases] == ["e0", None, "e1"]
    assert res.routing["in_correct"] == 4  # the refused case counts in no routing cell
    stub.edit = lambda case, method, config=None: (_ for _ in ()).throw(BackendError(422, "unknown_method", "x"))
    with pytest.raises(BackendError):
        _run(tmp_path, cases, stub, n=1)


def test_base_only_run_has_one_row(tmp_path):
    cases = _cases(4)
    stub = StubService(_facts(cases))
    res = _run(tmp_path, cases, stub, n=2, method="none")
    assert len(res.rows) == 1 and stub.edits == {}
    assert not math.isnan(res.rows[0]["rel_tf"]["mean"])


def test_held_set_rule_can_accept_partial_answers(tmp_path):
    cases = [EditCase(str(i), f"S{i} plays", f"T{i} sport", f"S{i}", f"truth{i} extra", None, None, None)
             for i in range(6)]
    facts = {c.prompt: f"truth{c.case_id} nope" for c in cases}  # half of every truth's tokens right
    strict = _run(tmp_path, cases, StubService(facts), n=2, method="none")
    assert strict.held["size"] == 0 and strict.rows[0]["held_accuracy"] is None
    loose = _run(tmp_path, cases, StubService(facts), n=2, method="none", held_min_accuracy=0.5)
    assert loose.held["size"] == 4 and loose.held["base_pool_accuracy"] == 1.0
