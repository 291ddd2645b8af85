"""CaliNet on tiny random llama and gpt2: the slots lower the loss on their facts, leave the base
model alone when inactive, and survive a trip through bytes."""

from __future__ import annotations

import pytest
import torch

from app import methods
from app.delta import Delta
from app.knowledge.facts import Fact
from app.knowledge.templates import KnowledgeError
from app.lm.testing import tiny_lm
from app.methods.calinet import CaliNetConfig, CalibrationRequest, calibrate
from app.methods.calinet.method import (
    generic_kl,
    _mean_loss,
    build_examples,
    cut_prediction,
    exact_match,
    f1_score,
    fact_splits,
    generic_sentences,
)

FACTS = [
    Fact("France", "Paris", "P36"),
    Fact("Germany", "Berlin", "P36"),
    Fact("Albert Einstein", "Ulm", "P19"),
    Fact("Italy", "Rome", None, "The capital of [X] is [Y].", ("[Y] is a small city in [X].",)),
]
FAST = dict(steps=25, lr=0.05, slots=8, evaluate=False, locality_weight=0.0, kl_weight=0.0, eval_every=5)


@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def gpt2():
    return tiny_lm("gpt2")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained(request):
    lm = request.getfixturevalue(request.param)
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = lm.model(input_ids=ids).logits.clone()
    calls = []
    result = calibrate(lm, FACTS, CaliNetConfig(**FAST), progress=lambda s, t, loss: calls.append((s, t, loss)))
    return lm, result, ids, base_logits, calls


def _zero_like(delta: Delta) -> Delta:
    return Delta(delta.kind, {k: torch.zeros_like(v) for k, v in delta.tensors.items()}, dict(delta.meta))


def test_calibration_lowers_the_loss_on_its_facts(trained):
    lm, result, *_ = trained
    examples = build_examples(lm, FACTS, [s.train for s in fact_splits(FACTS)])
    before = _mean_loss(lm, examples, _zero_like(result.delta), 16)
    after = _mean_loss(lm, examples, result.delta, 16)
    assert after < before - 0.3


def test_delta_is_ffn_slots_on_one_mlp(trained):
    lm, result, *_ = trained
    delta = result.delta
    layer = result.metrics["layer"]
    mlp = lm.arch.blocks[layer].mlp
    assert delta.kind == "ffn_slots" and delta.modules() == [mlp] and delta.act == "gelu"
    k, v = delta.get(mlp, "K"), delta.get(mlp, "V")
    assert k.shape == (8, lm.arch.hidden_size) and v.shape == (8, lm.arch.hidden_size)
    assert result.metrics["extra_params"] == k.numel() + v.numel()
    assert result.metrics["param_fraction"] < 0.01
    assert not k.requires_grad and not v.requires_grad


def test_base_output_unchanged_when_delta_inactive(trained):
    lm, result, ids, base_logits, _ = trained
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        with lm.active([result.delta]):
            patched = lm.model(input_ids=ids).logits
        again = lm.model(input_ids=ids).logits
    assert torch.equal(plain, base_logits) and torch.equal(again, base_logits)
    assert not torch.allclose(patched, base_logits)
    assert all(not p.requires_grad for p in lm.model.parameters())


def test_delta_round_trips_through_bytes(trained):
    lm, result, ids, _, _ = trained
    restored = Delta.from_bytes(result.delta.to_bytes())
    assert restored.kind == "ffn_slots" and restored.meta == result.delta.meta
    for name, t in result.delta.tensors.items():
        assert torch.equal(restored.tensors[name], t)
    with torch.no_grad():
        with lm.active([result.delta]):
            a = lm.model(input_ids=ids).logits
        with lm.active([restored]):
            b = lm.model(input_ids=ids).logits
    assert torch.equal(a, b)


def test_generic_kl_is_zero_without_change_and_positive_with_it(trained):
    lm, result, *_ = trained
    sents = [lm.tokenizer(t).input_ids for t in generic_sentences("fit")[:3]]
    with torch.no_grad():
        assert float(generic_kl(lm, sents, [_zero_like(result.delta)])) == pytest.approx(0.0, abs=1e-6)
        assert float(generic_kl(lm, sents, [result.delta])) > 0.0


def test_kl_and_locality_terms_train(llama):
    config = CaliNetConfig(steps=3, slots=4, evaluate=False, kl_weight=1.0, locality_weight=1.0)
    result = calibrate(llama, FACTS[:2], config)
    assert result.steps == 3 and result.metrics["last_train_loss"] > 0


def test_data_keys_fire_on_their_own_prompt(llama):
    import random

    from app.methods.calinet.method import _data_keys

    lm = llama
    examples = build_examples(lm, FACTS[:2], [s.train[:1] for s in fact_splits(FACTS[:2])])
    mlp = lm.arch.blocks[1].mlp
    mu = torch.zeros(lm.arch.hidden_size)
    keys = _data_keys(lm, mlp, examples, 2, mu, 1.5, random.Random(0))
    seen = []
    handle = lm.arch.module(mlp).register_forward_hook(lambda m, i, o: seen.append(i[0][0, -1]))
    with torch.no_grad():
        for e in examples:
            lm.model(input_ids=torch.tensor([list(e.prompt)]))
    handle.remove()
    acts = torch.stack(seen) @ keys.T  # each example matches exactly one key at 1.5
    assert keys.shape == (2, lm.arch.hidden_size)
    assert sorted(round(float(a), 3) for a in acts.max(dim=1).values) == [1.5, 1.5]


def test_progress_reports_every_step(trained):
    *_, calls = trained
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
    assert all(c[1] == 25 for c in calls)
    assert all(c[2] > 0 for c in calls)


def test_registered_method_fits_a_calibration_request(llama):
    lm = llama
    method = methods.get("calinet")
    config = method.parse_config({"steps": 2, "slots": 4, "evaluate": False})
    fit = method.fit(lm, CalibrationRequest(FACTS[:2]), config)
    assert fit.delta.kind == "ffn_slots" and fit.steps == 2 and fit.info["n_facts"] == 2
    with pytest.raises(Exception):
        method.parse_config({"no_such_knob": 1})


def test_evaluation_reports_before_and_after_on_test_templates(gpt2):
    result = calibrate(gpt2, FACTS[:2], CaliNetConfig(steps=2, slots=4, evaluate=True))
    test = result.metrics["test"]
    for side in ("before", "after"):
        m = test[side]
        assert m["n_facts"] == 2 and m["n_pairs"] >= 2
        assert 0.0 <= m["false_rate"] <= 1.0 and 0.0 <= m["exact_match"] <= 1.0 and 0.0 <= m["f1"] <= 1.0
    assert result.metrics["perplexity_generic"]["before"] > 0


@pytest.mark.parametrize(
    "facts, config, code",
    [
        ([], {}, "no_facts"),
        ([Fact("France", "", "P36")], {}, "empty_object"),
        ([Fact("France", "Paris", "P0")], {}, "unknown_relation"),
        (FACTS, {"slots": 60000}, "invalid_config"),
        (FACTS, {"layer": 99}, "invalid_config"),
        (FACTS, {"max_facts": 2}, "too_many_facts"),
    ],
)
def test_bad_calibration_input_is_rejected(llama, facts, config, code):
    with pytest.raises(KnowledgeError) as err:
        calibrate(llama, facts, CaliNetConfig(**config))
    assert err.value.code == code


def test_fact_splits_keep_test_templates_unseen():
    splits = fact_splits(FACTS)
    for s in splits[:3]:
        assert s.test and not set(s.test) & set(s.train) and not set(s.val) & set(s.train)
    assert splits[3].train == ("The capital of [X] is [Y].",) and splits[3].test == ()


def test_generic_text_halves_are_disjoint():
    fit, held = generic_sentences("fit"), generic_sentences("eval")
    assert len(fit) >= 40 and len(held) >= 40 and not set(fit) & set(held)


def test_answer_metrics():
    assert exact_match("the Paris", "Paris") and not exact_match("Paris Hilton", "Paris")
    assert f1_score("Paris France", "Paris") == pytest.approx(2 / 3)
    assert f1_score("Berlin", "Paris") == 0.0
    assert cut_prediction(" Paris, the capital") == "Paris"
    assert cut_prediction(" forward position and more", " position.") == "forward"
    assert cut_prediction(" Paris-born person", "-born person.") == "Paris"
