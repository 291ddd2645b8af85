"""What a user sees: generation entropy, repeats, free-form reliability, subject locality, re-edits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from app.eval import metrics as M
from app.eval import pararel as P
from app.eval.datasets import EditCase, fact_key, supersede_plan
from app.eval.runner import EvalConfig, Runner


# -- pure metrics ------------------------------------------------------------------------------------
def test_generation_entropy_matches_hand_computation():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert M.compute_n_gram_entropy("a b a b") == pytest.approx(expected)
    assert M.compute_n_gram_entropy("a b a b") == pytest.approx(0.9727652780181631)
    # Mean over texts, as ROME's n_gram_entropy(agg="arith").
    assert M.n_gram_entropy(["a b a b", "a b a b"]) == pytest.approx(expected)
    assert M.n_gram_entropy([]) is None


def test_repetitive_text_has_lower_entropy_than_varied_text():
    loop = "Keir Starmer, Keir Starmer, Keir Starmer, Keir Starmer, Keir Starmer, Keir Starmer"
    varied = "Keir Starmer is a British politician who has served as Prime Minister since July 2024 ."
    assert M.compute_n_gram_entropy(loop) < M.compute_n_gram_entropy(varied)
    # Punctuation is a token, as nltk.word_tokenize makes it.
    assert M.word_tokens("Paris, France.") == ["Paris", ",", "France", "."]
    assert M.compute_n_gram_entropy("") == 0.0
    assert M.relative_change(3.0, 4.0) == pytest.approx(-0.25) and M.relative_change(1.0, None) is None


def test_equal_length_entropy_sees_repetition_but_not_brevity():
    base = "The UK prime minister is Keir Starmer, who leads the Labour Party and took office in July 2024."
    short = "Keir Starmer."
    stutter = "Keir Starmer, Keir Starmer, Keir Starmer, Keir Starmer, Keir Starmer, Keir Starmer, Keir Starmer."
    # Raw entropy punishes the short, correct answer as much as length does ...
    assert M.compute_n_gram_entropy(short) < 0.5 * M.compute_n_gram_entropy(base)
    # ... at equal length it is as fluent as the base model's first words,
    e, b = M.matched_n_gram_entropy([(short, base)])
    assert e == pytest.approx(b)
    # while a repeated target still scores far below the base model's words.
    e, b = M.matched_n_gram_entropy([(stutter, base)])
    assert e < 0.7 * b
    assert M.matched_n_gram_entropy([]) is None


def test_mentions_repeats_and_free_form_reliability():
    assert M.count_mentions("Keir Starmer, keir  starmer and Keir Starmers", "Keir Starmer") == 2
    assert M.repeats_target(" Keir Starmer, Keir Starmer", "Keir Starmer")
    assert not M.repeats_target(" Keir Starmer is the prime minister", "Keir Starmer")
    assert not M.repeats_target(" Parisian Paris", "Paris")  # "Parisian" is another word
    assert M.names_target_once("The capital is Paris.", "Paris")
    assert not M.names_target_once("Paris. Paris.", "Paris")  # named twice
    assert not M.names_target_once("The capital is Lyon.", "Paris")  # not named


# -- subject-locality queries ------------------------------------------------------------------------
def test_relation_of_counterfact_prompt_and_queries_of_other_relations():
    assert P.find_relation("The mother tongue of Danielle Darrieux is", "Danielle Darrieux") == "P103"
    assert P.find_relation("Michel Denisot was born in", "Michel Denisot") == "P19"
    kind, pool = P.candidate_relations(("P103",))
    assert kind == "person" and "P103" not in pool and "P19" in pool
    q1 = P.subject_queries("7", "Danielle Darrieux", ("P103",), k=2, seed=0)
    q2 = P.subject_queries("7", "Danielle Darrieux", ("P103",), k=2, seed=0)
    assert q1 == q2 and len(q1) == 2  # deterministic per case and seed
    assert len({q.relation for q in q1}) == 2
    for q in q1:
        assert q.relation != "P103" and P.RELATION_TYPE.get(q.relation) == "person"
        assert q.prompt.startswith("Danielle Darrieux ") and "[X]" not in q.prompt and "[Y]" not in q.prompt
    others = {tuple(q.prompt for q in P.subject_queries(str(i), "Danielle Darrieux", ("P103",), seed=0))
              for i in range(20)}
    assert len(others) > 1  # different cases draw different relations


def test_question_style_prompts_get_their_relation():
    assert P.find_relations("What is Jiří Srnka's birthplace?", "Jiří Srnka") == ("P19",)
    assert P.find_relations("In what place did Louis Aragon die?", "Louis Aragon") == ("P20",)
    assert P.find_relations("What was Pierre Dreyfus's city of birth?", "Pierre Dreyfus") == ("P19",)
    assert P.find_relations("Which position does Derrick Brooks play? They play as", "Derrick Brooks") == ("P413",)
    assert P.find_relations("What colour is the sky over Lima?", "Lima") == ()


def test_place_subject_gets_place_relations_and_unknown_relation_gets_no_query():
    qs = P.subject_queries("1", "Wellington", ("P190",), k=3, seed=1)
    assert qs and all(P.RELATION_TYPE.get(q.relation) == "place" or q.relation in P.EXTRA_TYPE_RELATIONS["place"]
                      for q in qs)
    assert len({q.prompt for q in qs}) == len(qs)  # no duplicate prompt
    # With the edited relation unknown ("WEFS, in" -> Brazil), "WEFS is located in" could be that very
    # fact: no question is asked rather than a wrong one.
    assert P.subject_queries("1", "WEFS", (), k=2, seed=1) == []
    assert P.subject_queries("1", None, ("P19",)) == []


def test_synonyms_of_the_edited_relation_are_not_other_relations():
    # An edit of a country (P17) is not tested with "located in" (P131), "continent" (P30) ...
    for seed in range(10):
        for q in P.subject_queries(str(seed), "Bose Institute", ("P17",), k=10, seed=seed):
            assert P.group_of(q.relation) != P.group_of("P17")
    # ... nor a developer edit with "is produced by" (manufacturer), nor spoken language with native language.
    assert P.same_relation(("P178",), ("P176",)) and P.same_relation(("P1412",), ("P103",))
    assert not P.same_relation(("P19",), ("P20",))
    _, pool = P.candidate_relations(("P178",))
    assert "P176" not in pool and "P127" in pool
    cases = [EditCase("0", "GarageBand was created by", "Yahoo", "GarageBand"),
             EditCase("1", "GarageBand is owned by", "Sony", "GarageBand")]
    queries, rels = P.plan_subject_queries(cases, k=20, seed=0)
    for qs in queries:
        assert qs and {P.group_of(q.relation) for q in qs}.isdisjoint({P.group_of(r) for rs in rels for r in rs})


def test_locality_prompt_that_asks_another_edits_fact_is_found():
    cases = [EditCase("0", "The twin city of Sofia is", "Budapest", "Sofia", locality_prompt="The twin city of Moscow is"),
             EditCase("1", "What is the twin city of Moscow? It is", "Birmingham", "Moscow",
                      locality_prompt="Rome is a twin city of"),
             EditCase("2", "Danielle Darrieux was born in", "Rome", "Danielle Darrieux",
                      locality_prompt="Sofia was born in"),  # names Sofia, another relation: a locality test
             EditCase("3", "PostScript, developed by", "Microsoft", "PostScript",
                      locality_prompt="PostScript, developed by")]  # word for word an edit's prompt
    rels = [P.find_relations(c.prompt, c.subject) for c in cases]
    found = P.locality_conflicts(cases, rels)
    assert found[0] == 1  # "The twin city of Moscow is" asks edit 1's fact
    assert found[1] is None and found[2] is None
    assert found[3] is None  # its own prompt is not "another" edit
    cases[2] = EditCase("2", "PostScript, developed by", "Apple", "PostScript")
    cases.append(EditCase("4", "Tokyo is a twin city of", "Lima", "Tokyo", locality_prompt="PostScript, developed by"))
    rels = [P.find_relations(c.prompt, c.subject) for c in cases]
    assert P.locality_conflicts(cases, rels)[4] in (2, 3)


def test_plan_excludes_relations_edited_for_the_same_subject():
    cases = [EditCase("0", "The mother tongue of Ann Lee is", "French", "Ann Lee"),
             EditCase("1", "Ann Lee was born in", "Rome", "Ann Lee")]
    queries, rels = P.plan_subject_queries(cases, k=20, seed=0)
    assert rels == [("P103",), ("P19",)]
    for qs in queries:
        assert {q.relation for q in qs}.isdisjoint({"P103", "P19"}) and qs


# -- re-edits ----------------------------------------------------------------------------------------
def test_supersede_plan_points_to_latest_edit_of_the_same_fact():
    cases = [EditCase("a", "Who is the PM of UK?", "X", "UK"), EditCase("b", "Who is PM of France?", "Y", "France"),
             EditCase("c", "who is the PM of  UK", "Z", "uk"), EditCase("d", "Who is the PM of UK?", "W", "UK")]
    assert fact_key(cases[0]) == fact_key(cases[2])
    assert supersede_plan(cases) == [3, None, 3, None]


class _Stub:
    """Routes a query to the newest active edit whose subject it names; answers its target twice."""

    batch = 8

    def __init__(self):
        self.edits: list[EditCase] = []
        self.modes: set[str] = set()

    def model_id(self):
        return "stub"

    def edit(self, case, method, config=None):
        from app.eval.backends import EditOutcome

        self.edits.append(case)
        return EditOutcome(f"e{len(self.edits) - 1}", 1.0, 2.0, {})

    def revert(self, edit_id):
        pass

    def _text(self, q):
        for i in reversed(range(len(self.edits))):
            c = self.edits[i]
            if c.subject in q and c.prompt == q or (c.subject in q and "born" not in q):
                return f" {c.target}, {c.target} again", f"e{i}"
        return " a quiet village by the sea where nothing happens", None

    def answer(self, queries, mode, max_new_tokens):
        from app.eval.backends import AnswerOutcome

        self.modes.add(mode)
        out = []
        for q in queries:
            t, e = self._text(q)
            out.append(AnswerOutcome(" ".join(t.split()[:max_new_tokens]), e, None, 1.0))
        return out

    def score(self, pairs, mode):
        from app.eval.backends import ScoreOutcome

        self.modes.add(mode)
        out = []
        for p, tgt in pairs:
            t, e = self._text(p)
            want, got = tgt.split(), t.replace(",", " ").split()
            ok = [i < len(got) and got[i] == w for i, w in enumerate(want)]
            out.append(ScoreOutcome(-1.0, sum(ok) / len(ok), all(ok), e, None, ok))
        return out

    def close(self):
        pass


def _run(tmp_path: Path, cases, stub, **kw):
    from app.eval.datasets import Dataset

    ds = Dataset("zsre", tmp_path / "z.json", "0" * 64, cases)
    cfg = EvalConfig(dataset="zsre", file=ds.path, **{"method": "stub", "held": 0, "latency_probe": 0, **kw})
    return Runner(stub, cfg).run(ds)


def test_reedits_are_scored_against_latest_target_and_reported_apart(tmp_path):
    cases = [EditCase("0", "Who leads Ruritania?", "Alice", "Ruritania", None, "Ruritania's leader is"),
             EditCase("1", "Who leads Elbonia?", "Bob", "Elbonia", None, "Elbonia's leader is"),
             EditCase("2", "Who leads Ruritania?", "Carol", "Ruritania", None, "Ruritania's leader is")]
    res = _run(tmp_path, cases, _Stub(), n=3)
    edited = res.rows[1]
    assert edited["n"] == 2  # case 0 is superseded by case 2
    assert edited["rel_em"]["mean"] == 1.0  # case 2 judged by its own (latest) target Carol
    assert res.superseded["count"] == 1
    (old,) = res.superseded["rows"]
    assert old["n"] == 1 and old["rel_em"]["mean"] == 0.0  # the old target is gone, reported apart
    assert [c["superseded_by"] for c in res.cases] == ["2", None, None]
    assert res.fu["updated"] == 2 and res.fu["forgotten"] == 0  # the superseded edit is no forgetting


def test_user_view_metrics_on_stub_and_both_modes(tmp_path):
    cases = [EditCase(str(i), f"The mother tongue of Person{i} is", f"Lang{i}", f"Person{i}", None,
                      f"Person{i} speaks") for i in range(4)]
    stub = _Stub()
    res = _run(tmp_path, cases, stub, n=4, mode="both", fluency_n=3)
    assert [r["name"] for r in res.rows] == ["base (no edits) (completion)", "stub (completion)",
                                              "base (no edits) (chat)", "stub (chat)"]
    assert stub.modes == {"completion", "chat"}
    assert len(stub.edits) == 4  # edits made once for both forms
    base, edited = res.rows[0], res.rows[1]
    # The stub answers every non-"born" question about an edited subject with its target.
    assert base["subject_locality"]["mean"] == 1.0 and edited["subject_locality"]["mean"] < 1.0
    assert edited["repeat_rate"]["mean"] == 1.0 and edited["repeat_rate"]["n"] == 6  # 3 cases x (prompt, paraphrase)
    assert base["repeat_rate"]["mean"] == 0.0
    assert edited["fluency"]["ge"]["n"] == 3 and edited["fluency"]["ge_change"] < 0
    # Free-form reliability: chat only, and the target is named twice -> not reliable.
    assert res.rows[3]["rel_free"]["mean"] == 0.0 and res.rows[3]["rel_free"]["n"] == 3
    assert edited["rel_free"]["n"] == 0
    assert res.user_view["fluency_cases"] == 3 and res.user_view["subject_relation_found"] == 4
    assert len(res.cases) == 8 and {c["mode"] for c in res.cases} == {"completion", "chat"}


def test_locality_prompt_asking_another_edits_fact_is_left_out_of_locality(tmp_path):
    # Case 0's locality prompt asks case 1's edited fact: the stub (like the service) answers it with
    # case 1's target. That is the edit working, not a locality failure.
    cases = [EditCase("0", "The mother tongue of Ann Lee is", "French", "Ann Lee", None, "Ann Lee speaks",
                      locality_prompt="The mother tongue of Bo Chen is"),
             EditCase("1", "The mother tongue of Bo Chen is", "Dutch", "Bo Chen", None, "Bo Chen speaks",
                      locality_prompt="Zed Quill was born in")]
    res = _run(tmp_path, cases, _Stub(), n=2, fluency_n=0)
    edited = res.rows[1]
    assert res.user_view["locality_asks_another_edit"] == 1 and edited["locality_asks_another_edit"] == 1
    assert edited["loc_em"]["n"] == 1 and edited["loc_em"]["mean"] == 1.0
    asks = {c["case_id"]: c["loc_asks"] for c in res.cases}
    assert asks == {"0": "1", "1": None}
    assert [c["loc_after"] for c in res.cases if c["case_id"] == "0"][0].startswith("Dutch")  # still recorded
    # Independent runs apply one edit at a time: the same prompt is then a locality test.
    ind = _run(tmp_path / "ind", cases, _Stub(), n=2, fluency_n=0, sequential=False)
    assert ind.rows[1]["loc_em"]["n"] == 2 and ind.user_view["locality_asks_another_edit"] == 0
