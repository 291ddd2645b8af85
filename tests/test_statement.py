"""The contrastive assessment for causal models (whole filled statements, PMI of the two fillers,
false-relation contrast), sentences with a blank, the development set, and fact validation."""

from __future__ import annotations

import math

import pytest

from app.knowledge.facts import FIELD_ALIASES, Fact, fact_from_dict, resolve
from app.knowledge.sentences import build_sentences, match_sentence, sentence_facts
from app.knowledge.statement import (
    DEFAULT_OBJECT_NULL,
    DEFAULT_PMI_WEIGHT,
    NEUTRAL,
    Assessment,
    assess_statements,
    boundary_ids,
    fill,
    score_texts,
)
from app.knowledge.templates import KnowledgeError
from app.lm.testing import tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def test_fill_marks_both_slots_whichever_comes_first():
    f = fill("[Y] is the capital of [X] .", "France", "Paris")
    assert f.text == "Paris is the capital of France."
    assert f.text[slice(*f.subject_span)] == "France" and f.text[slice(*f.object_span)] == "Paris"
    n = fill("[X] was born in [Y].", NEUTRAL, "Ulm")
    assert n.text == "Something was born in Ulm."  # the neutral word opens a sentence with a capital
    assert fill("[X] was born in [Y].", "de Gaulle", "Lille").text.startswith("de Gaulle")  # names keep their case


def test_sentence_scores_are_the_model_log_probabilities_after_a_boundary(lm):
    texts = ["The capital of France is Paris.", "Paris is the capital of France.", "The capital of France is Paris."]
    scored = score_texts(lm, texts, batch_size=2)
    assert scored[0] == scored[2]
    start = boundary_ids(lm)
    for text, s in zip(texts[:2], scored):
        ids = lm.tokenizer(text, add_special_tokens=not start).input_ids
        ref = lm.score_ids([(start or ids[:1], ids if start else ids[1:])])[0]
        assert s.total() == pytest.approx(ref.logprob, abs=1e-4)
    lp, n, first = scored[0].span(25, 30)  # "Paris" (with its leading space)
    assert n >= 1 and lp == pytest.approx(sum(scored[0].logprobs[first : first + n]))


def test_scores_combine_the_filled_sentences_as_documented(lm):
    t, negs = "[X] is married to [Y].", ("[X] has never met [Y].", "[Y] divorced [X].")
    fact = Fact("Alice", "Bob", None, t, negs)

    def parts(template, s, o):
        texts = [fill(template, a, b).text for a, b in ((s, o), (s, NEUTRAL), (NEUTRAL, o), (NEUTRAL, NEUTRAL))]
        return [x.total() for x in score_texts(lm, texts)]

    [res] = assess_statements(lm, [fact], negative_weight=0.5)
    assert isinstance(res, Assessment) and res.score_name == "contrast"
    a, b, c, d = parts(t, "Alice", "Bob")
    assert res.scores["pmi"] == pytest.approx(a - b - DEFAULT_OBJECT_NULL * (c - d), abs=1e-4)
    assert res.scores["pmi_symmetric"] == pytest.approx(a - b - c + d, abs=1e-4)
    # the object's in-context log-probability: its tokens in the scored sentence
    f = fill(t, "Alice", "Bob")
    lp, n, _ = score_texts(lm, [f.text])[0].span(*f.object_span)
    assert res.scores["p_object"] == pytest.approx(math.exp(lp / n), rel=1e-3)
    neg_lp = []
    for nt in negs:
        g = fill(nt, "Alice", "Bob")
        x, k, _ = score_texts(lm, [g.text])[0].span(*g.object_span)
        neg_lp.append(x / k)
    expected = lp / n + DEFAULT_PMI_WEIGHT * res.scores["pmi"] - 0.5 * sum(neg_lp) / 2
    assert res.score == pytest.approx(expected, abs=1e-4)
    [neutral] = assess_statements(lm, [Fact("Alice", NEUTRAL, None, t, negs)])
    assert neutral.scores["pmi"] == pytest.approx(0.0, abs=1e-4)  # a neutral filler adds nothing
    # the paper's CKA from the same passes: the object's per-token probability against the false relations'
    assert res.scores["cka_paper"] == pytest.approx(
        (res.scores["p_object"] + 1e-9) / (res.scores["p_object_negative"] + 1e-9))
    assert set(res.to_dict()["scores"]) >= {"contrast", "pmi", "cka_paper", "p_object"}


def test_paraphrases_average_over_the_relations_templates(lm):
    one = assess_statements(lm, [Fact("France", "Paris", "P36")], paraphrases=1)[0]
    three = assess_statements(lm, [Fact("France", "Paris", "P36")], paraphrases=3)[0]
    assert one.scores["pmi"] != pytest.approx(three.scores["pmi"], abs=1e-6)
    assert one.scores["cka_paper"] == pytest.approx(three.scores["cka_paper"])  # the paper's: LAMA template only


def test_threshold_and_score_choice_decide_the_verdict(lm):
    f = [Fact("France", "Paris", "P36")]
    low = assess_statements(lm, f, threshold=-1e6)[0]
    high = assess_statements(lm, f, threshold=1e6)[0]
    assert (low.verdict, high.verdict) == ("true", "false")
    paper = assess_statements(lm, f, score="cka_paper", threshold=low.scores["cka_paper"])[0]
    assert paper.score == low.scores["cka_paper"] and paper.verdict == "true"
    with pytest.raises(KnowledgeError) as err:
        assess_statements(lm, f, score="nope")
    assert err.value.code == "unknown_score"


def test_one_bad_fact_does_not_stop_the_others(lm):
    good = Fact("France", "Paris", "P36")
    batch = [good, Fact("France", "Paris", "P9999"), Fact("Italy", "", "P36"), good]
    out = assess_statements(lm, batch)
    assert [type(x).__name__ for x in out] == ["Assessment", "KnowledgeError", "KnowledgeError", "Assessment"]
    assert (out[1].code, out[2].code) == ("unknown_relation", "empty_object")
    alone = assess_statements(lm, [good])[0]
    assert out[0].scores["contrast"] == pytest.approx(alone.scores["contrast"], abs=1e-4)


@pytest.mark.parametrize(
    "fact, code",
    [
        (Fact("France", "Paris", "P9999", "The capital of [X] is [Y].", ("[X] hates [Y].",)), "unknown_relation"),
        (Fact("France", "Paris", "P36", "The capital of [X] is [Y]."), "missing_negatives"),
        (Fact("France", "Paris", None, "The capital of [X] is [Y].", ("The capital of [X] is [Y] .",)), "negative_is_template"),
        (Fact("France", "Paris", "P36", None, ("[Y] is the capital of [X].",)), "negative_is_template"),
        (Fact("France", "Paris", None, "The capital of [X] is [Y].", ("[X] [X] [Y]",)), "invalid_template"),
    ],
)
def test_contradictory_facts_are_refused_with_their_own_code(fact, code):
    with pytest.raises(KnowledgeError) as err:
        resolve(fact)
    assert err.value.code == code and err.value.message


def test_relation_ids_ignore_case():
    assert resolve(Fact("France", "Paris", "p36")).relation.relation == "P36"
    assert resolve(Fact("France", "Paris", " P36 ")).template == resolve(Fact("France", "Paris", "P36")).template


def test_one_set_of_field_names_with_aliases():
    trex = {"sub_label": "France", "relation": "P36", "obj_label": "Paris", "uuid": "x"}
    ours = {"subject": "France", "relation": "P36", "object": "Paris"}
    assert fact_from_dict(trex) == fact_from_dict(ours) == Fact("France", "Paris", "P36")
    assert fact_from_dict({**ours, "negative_templates": ["[X] hates [Y]."]}).negatives == ("[X] hates [Y].",)
    assert set(FIELD_ALIASES) == {"subject", "object", "relation", "template", "negatives"}


def test_sentences_with_a_blank_become_facts_of_the_matching_relation():
    m, facts = sentence_facts("_ is developed by IBM", ["Watson", "iPhone"])
    assert m.blank == "subject" and m.other == "IBM" and m.relation in ("P176", "P178")
    assert [(f.subject, f.object, f.relation) for f in facts] == [("Watson", "IBM", m.relation), ("iPhone", "IBM", m.relation)]
    m, facts = sentence_facts("The capital of France is ___.", ["Paris", "Lyon", "Nice"], "p36")
    assert (m.relation, m.blank, m.other) == ("P36", "object", "France")
    assert [f.object for f in facts] == ["Paris", "Lyon", "Nice"]
    assert match_sentence("Paris is the capital of _", "P36").blank == "subject"
    for sentence, cands, code in [
        ("The capital of France is Paris.", ["a", "b"], "invalid_sentence"),
        ("_ is the capital of _.", ["a", "b"], "invalid_sentence"),
        ("_ is developed by IBM", ["Watson"], "invalid_candidates"),
        ("_ is developed by IBM", ["Watson", "watson"], "invalid_candidates"),
        ("_ tastes of strawberries and rain", ["a", "b"], "sentence_not_matched"),
    ]:
        with pytest.raises(KnowledgeError) as err:
            sentence_facts(sentence, cands)
        assert err.value.code == code, sentence


def test_development_sentences_have_one_true_and_three_false_fillers_of_the_relation():
    facts = [Fact(f"person {i}", f"city {i % 5}", "P19") for i in range(20)]
    facts += [Fact(f"country {i}", f"capital {i}", "P36") for i in range(6)]
    sents = build_sentences(facts, n=12, seed=3)
    assert len(sents) == 12 and {s.blank for s in sents} <= {"subject", "object"}
    known = {(f.subject, f.relation, f.object) for f in facts}
    for s in sents:
        assert len(s.candidates) == 4 and len(set(s.candidates)) == 4
        m, fs = sentence_facts(s.sentence, s.candidates, s.relation)
        assert m.blank == s.blank
        truth = [(f.subject, f.relation, f.object) in known for f in fs]
        assert truth.index(True) == s.answer and sum(truth) == 1


def test_detect_report_puts_every_score_side_by_side(lm, tmp_path):
    from app.cli.detect import SCORES, markdown, measure_sets, plot, report
    from app.knowledge.statement import DEFAULT_THRESHOLDS

    facts = [Fact(f"Person {i}", city, "P19") for i, city in enumerate(["Paris", "Rome", "Oslo", "Lima"] * 3)]
    facts += [Fact(f"Land {i}", f"Town {i}", "P36") for i in range(8)]
    data = measure_sets(lm, facts, n=8, n_sentences=6, seed=0, max_paraphrases=2, batch_size=16)
    assert len(data["pairs"]) == 8 and len(data["sentences"]) == 6
    assert {p["split"] for p in data["pairs"]} <= {"tune", "heldout"}
    r = report(data, paraphrases=2, weight=0.25, pmi_weight=0.1, thresholds=dict(DEFAULT_THRESHOLDS))
    r.update(model="tiny", file="f", seed=0, seconds=1.0, paraphrases=2, weight=0.25, pmi_weight=0.1, command="",
             date="d")
    for split in ("tune", "heldout"):
        for name in SCORES:
            m = r["splits"][split][name]["default_threshold"]
            assert 0.0 <= m["top1"] <= 1.0 or math.isnan(m["top1"])
            assert m["threshold"] == DEFAULT_THRESHOLDS[name]
    md = markdown(r)
    assert all(name in md for name in SCORES) and "top-1" in md
    plot(data, r, tmp_path / "detect.png")
    assert (tmp_path / "detect.png").stat().st_size > 1000
