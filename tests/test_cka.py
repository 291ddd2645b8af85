"""CKA math, AUROC, batched scoring against the engine's scorer, and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.knowledge.cka import (
    Assessment,
    ContinuationScore,
    ScoreItem,
    assess,
    auroc,
    best_threshold,
    cka_value,
    roc_curve,
    score_items,
    verdict,
)
from app.knowledge.facts import Fact
from app.knowledge.templates import KnowledgeError
from app.lm.testing import tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def test_cka_of_hand_made_probabilities():
    assert cka_value(0.5, [0.1, 0.3], alpha=0.0) == pytest.approx(2.5)
    assert cka_value(0.5, [0.1, 0.3], alpha=0.1) == pytest.approx(0.6 / 0.3)
    assert cka_value(0.0, [0.0], alpha=0.01) == pytest.approx(1.0)  # alpha keeps 0/0 defined
    assert cka_value(0.02, [0.2, 0.2, 0.2], alpha=0.0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        cka_value(0.1, [], alpha=0.0)


def test_verdict_threshold_is_inclusive_for_true():
    assert verdict(1.0, 1.0) == "true"
    assert verdict(0.999, 1.0) == "false"
    assert verdict(3.0, 5.0) == "false"


def test_probability_is_product_or_geometric_mean_of_token_probabilities():
    s = ContinuationScore(logprob=math.log(0.5 * 0.2), n_tokens=2, suffix_logprob=math.log(0.5),
                          first_rank=0, candidate_rank=0, greedy=True)
    assert s.prob(length_norm=False) == pytest.approx(0.1)
    assert s.prob(length_norm=True) == pytest.approx(math.sqrt(0.1))
    assert s.prob(scoring="sentence", length_norm=False) == pytest.approx(0.05)


def test_auroc_hand_computed():
    assert auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auroc([0, 1], [2, 3]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    # pairs (pos, neg): (2,1) win, (2,3) loss, (4,1) win, (4,3) win -> 3/4
    assert auroc([2, 4], [1, 3]) == pytest.approx(0.75)
    # one tie among four pairs counts one half
    assert auroc([1, 3], [1, 0]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert math.isnan(auroc([], [1.0]))


def test_roc_curve_and_best_threshold():
    fpr, tpr = roc_curve([0.9, 0.8, 0.4], [0.5, 0.1])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert best_threshold([0.9, 0.8, 0.7], [0.1, 0.2, 0.75, 0.76]) == pytest.approx(0.8)


def test_batched_scores_match_the_engine_scorer(lm):
    items = [
        ScoreItem("The capital of [X] is [Y].", "France", "Paris"),
        ScoreItem("[X] was born in [Y].", "Albert Einstein", "Ulm an der Donau"),
        ScoreItem("[X] plays in [Y] position.", "Pelé", "forward"),
    ]
    ours = score_items(lm, items, batch_size=2)
    ref = lm.score(["The capital of France is", "Albert Einstein was born in", "Pelé plays in"],
                   ["Paris", "Ulm an der Donau", "forward"], mode="completion")
    for a, b in zip(ours, ref):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.n_tokens == len(b.token_logprobs)
        assert a.greedy == b.all_correct
    assert ours[1].n_tokens > 1  # multi-token object: the sum over its tokens


def test_assess_combines_scores_into_cka(lm):
    facts = [Fact("France", "Paris", "P36"), Fact("Germany", "Berlin", "P36"),
             Fact("Italy", "Rome", None, "The capital of [X] is [Y].", ("[X] is far from [Y].", "[X] hates [Y]."))]
    out = assess(lm, facts, threshold=1.0, alpha=1e-4, length_norm=False)
    assert [type(a) for a in out] == [Assessment] * 3
    for a in out:
        assert a.cka == pytest.approx((a.p_object + 1e-4) / (a.p_object_negative + 1e-4))
        assert a.verdict == ("true" if a.cka >= 1.0 else "false")
        assert 0.0 < a.p_object < 1.0 and 0.0 < a.p_object_negative < 1.0
    lp = lm.score(["The capital of France is"], ["Paris"], mode="completion")[0].logprob
    assert out[0].p_object == pytest.approx(math.exp(lp), rel=1e-3)
    multi = Fact("Albert Einstein", "Ulm an der Donau", "P19")
    lp_multi = lm.score(["Albert Einstein was born in"], ["Ulm an der Donau"], mode="completion")[0]
    [normed] = assess(lm, [multi], length_norm=True)
    assert normed.p_object == pytest.approx(math.exp(lp_multi.logprob / len(lp_multi.token_logprobs)), rel=1e-3)
    low, high = assess(lm, facts[:1], threshold=0.0), assess(lm, facts[:1], threshold=1e9)
    assert low[0].verdict == "true" and high[0].verdict == "false"
    assert set(out[0].to_dict()) == {"subject", "relation", "object", "cka", "p_object", "p_object_negative", "verdict"}


@pytest.mark.parametrize(
    "facts, code",
    [
        ([], "no_facts"),
        ([Fact("France", "Paris", "P0")], "unknown_relation"),
        ([Fact("France", "", "P36")], "empty_object"),
        ([Fact("France", "Paris", None, "The capital of [X] is", ("[X] [Y]",))], "invalid_template"),
        ([Fact("France", "Paris", "P36")] * 3, "too_many_facts"),
    ],
)
def test_assess_rejects_bad_input_before_scoring(lm, facts, code):
    with pytest.raises(ValueError) as err:
        assess(lm, facts, max_facts=2)
    assert isinstance(err.value, KnowledgeError) and err.value.code == code
    assert err.value.message
