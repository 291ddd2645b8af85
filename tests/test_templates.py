"""Relation templates, their per-relation split, fact rendering, loading and corruption."""

from __future__ import annotations

import json

import pytest

from app.knowledge.facts import Fact, corrupt_pairs, load_facts, object_pool, prefix, render, resolve, suffix
from app.knowledge.templates import (
    KnowledgeError,
    RelationTemplates,
    load_relations,
    normalize_template,
    split_templates,
    subject_first,
    validate_template,
)


def test_relations_load_from_package_with_negatives_and_paraphrases():
    rels = load_relations()
    assert {"P36", "P19", "P1376", "P103"} <= set(rels)
    p36 = rels["P36"]
    assert p36.template == "The capital of [X] is [Y]."
    assert len(p36.negatives) == 3 and p36.template not in p36.negatives
    assert len(p36.paraphrases) >= 10
    for rel in rels.values():
        for t in (rel.template, *rel.negatives, *rel.paraphrases):
            assert t.count("[X]") == 1 and t.count("[Y]") == 1, t
            assert " ." not in t


def test_normalize_template_drops_space_before_punctuation():
    assert normalize_template("[X]  was born in [Y] .") == "[X] was born in [Y]."
    assert normalize_template("[X] and [Y] , again ;") == "[X] and [Y], again;"


@pytest.mark.parametrize("rid", sorted(load_relations()))
def test_split_is_disjoint_subject_first_and_covers_the_pool(rid):
    rel = load_relations()[rid]
    split = split_templates(rel)
    pool = {t for t in rel.true_templates() if subject_first(t)}
    if split is None:
        assert len(pool) < 3
        return
    train, val, test = set(split.train), set(split.val), set(split.test)
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == pool


def test_split_is_deterministic_and_independent_of_paraphrase_order():
    rel = load_relations()["P19"]
    shuffled = RelationTemplates(rel.relation, rel.label, rel.template, rel.negatives, tuple(reversed(rel.paraphrases)))
    assert split_templates(rel) == split_templates(rel) == split_templates(shuffled)


def test_split_fractions():
    rel = RelationTemplates("PX", "x", "[X] a [Y].", (), tuple(f"[X] p{i} [Y]." for i in range(16)))
    split = split_templates(rel, test_fraction=0.25, val_fraction=0.125)
    assert (len(split.train), len(split.val), len(split.test)) == (11, 2, 4)
    assert split_templates(RelationTemplates("PY", "y", "[X] a [Y].", (), ("[X] b [Y].",))) is None


@pytest.mark.parametrize(
    "template, code",
    [("[X] is a city", "invalid_template"), ("[Y] only", "invalid_template"), ("", "invalid_template"),
     ("[X] [X] [Y]", "invalid_template")],
)
def test_validate_template_rejects_missing_or_repeated_slots(template, code):
    with pytest.raises(KnowledgeError) as err:
        validate_template(template)
    assert err.value.code == code
    assert isinstance(err.value, ValueError)


def test_render_prefix_suffix():
    t = "[X] plays in [Y] position."
    assert render(t, "Pelé", "forward") == "Pelé plays in forward position."
    assert prefix(t, "Pelé") == "Pelé plays in"
    assert suffix(t, "Pelé") == " position."
    assert prefix("[Y] is a small city in [X].", "France") == ""
    assert suffix("[Y] is a small city in [X].", "France") == " is a small city in France."


def test_resolve_validates_and_picks_templates():
    ft = resolve(Fact("France", "Paris", "P36"))
    assert ft.template == "The capital of [X] is [Y]." and len(ft.negatives) == 3
    own = resolve(Fact("Italy", "Rome", None, "The capital of [X] is [Y] .", ("[X] is far from [Y].",)))
    assert own.template == "The capital of [X] is [Y]." and own.negatives == ("[X] is far from [Y].",)
    cases = [
        (Fact("France", "Paris", "P9999"), "unknown_relation"),
        (Fact("France", "", "P36"), "empty_object"),
        (Fact(" ", "Paris", "P36"), "empty_subject"),
        (Fact("France", "Paris", None), "missing_template"),
        (Fact("France", "Paris", None, "capital of [X]", ("[X] [Y]",)), "invalid_template"),
        (Fact("France", "Paris", None, "The capital of [X] is [Y]."), "missing_negatives"),
        (Fact("France", "Paris", None, "The capital of [X] is [Y].", ("no slots",)), "invalid_template"),
        (Fact("France", "x" * 400, "P36"), "field_too_long"),
    ]
    for fact, code in cases:
        with pytest.raises(KnowledgeError) as err:
            resolve(fact)
        assert err.value.code == code, fact


def test_load_facts_reads_both_formats_and_samples_deterministically(tmp_path):
    rows = [{"sub_label": f"S{i}", "relation": "P36" if i % 2 else "P19", "obj_label": f"O{i}"} for i in range(20)]
    trex = tmp_path / "trex.jsonl"
    trex.write_text("\n".join(json.dumps(r) for r in rows))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"subject": "France", "relation": "P36", "object": "Paris"}]))
    assert load_facts(plain) == [Fact("France", "Paris", "P36")]
    p36 = load_facts(trex, relation="P36")
    assert len(p36) == 10 and all(f.relation == "P36" for f in p36)
    a, b = load_facts(trex, n=5, seed=3), load_facts(trex, n=5, seed=3)
    assert a == b and len(a) == 5
    assert load_facts(trex, n=5, seed=4) != a


def test_corrupt_uses_another_object_of_the_same_relation():
    facts = [Fact(f"S{i}", f"O{i % 4}", "P36") for i in range(12)] + [Fact("Z", "Q", "P19")]
    known = [Fact("S0", "O1", "P36")]  # S0 has two true objects
    pairs = corrupt_pairs(facts, object_pool(facts), seed=0, known=known)
    assert len(pairs) == 12  # the lone P19 fact has no other candidate
    for true, bad in pairs:
        assert bad.subject == true.subject and bad.relation == true.relation
        assert bad.object != true.object and bad.object in {f"O{i}" for i in range(4)}
    s0_bad = next(bad for true, bad in pairs if true.subject == "S0")
    assert s0_bad.object not in {"O0", "O1"}
    assert corrupt_pairs(facts, object_pool(facts), seed=0, known=known) == pairs
