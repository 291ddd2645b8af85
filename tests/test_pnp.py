"""The `pnp` method on tiny random llama and gpt2 models: it learns a short target, the delta
survives serialisation, and nothing changes while the delta is not active."""

from __future__ import annotations

import pytest
import torch

from app.delta import Delta
from app.lm.arch import linear_dims
from app.methods import EditRequest, get
from app.methods.base import ValidationError
from app.methods.pnp.method import (
    TailForward, adapted_layers, adapted_modules, boundary_tokens, build_groups, init_delta, kept_logits,
)

PROMPT, TARGET = "The capital of Freedonia is", "Paris"
CONFIG = {"lr": 0.05, "max_steps": 150, "min_prob": 0.0, "layers": 2}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    from app.lm.testing import tiny_lm

    torch.set_num_threads(1)
    return tiny_lm(request.param)


@pytest.fixture(scope="module")
def fitted(lm):
    """One fit per architecture, shared by the tests that only read it."""
    method = get("pnp")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    base = lm.score([PROMPT], [TARGET], mode="completion")[0]
    steps_seen: list[int] = []
    req = EditRequest(PROMPT, TARGET, locality_prompts=["The weather today is", "Once upon a time"])
    result = method.fit(lm, req, method.parse_config(CONFIG), progress=lambda s, n, loss: steps_seen.append(s))
    return result, before, base, steps_seen


def test_fit_makes_the_target_the_argmax_in_both_forms(lm, fitted):
    result, _, base, steps_seen = fitted
    assert not base.all_correct  # a random model does not already say it
    assert result.info["converged"] and result.steps >= 1
    assert steps_seen == list(range(1, result.steps + 1))
    for mode in ("completion", "chat"):
        assert lm.score([PROMPT], [TARGET], mode=mode, deltas=[result.delta])[0].all_correct, mode


def test_delta_is_lora_on_the_mlps_of_middle_blocks(lm, fitted):
    delta = fitted[0].delta
    assert delta.kind == "lora" and delta.scale == 1.0
    assert delta.modules() == [lm.arch.blocks[i].mlp_out for i in adapted_layers(lm, get("pnp").parse_config(CONFIG))]
    for path in delta.modules():
        d_in, d_out = linear_dims(lm.arch.module(path))
        assert tuple(delta.get(path, "A").shape) == (4, d_in)
        assert tuple(delta.get(path, "B").shape) == (d_out, 4)
        assert not delta.get(path, "A").requires_grad


def test_delta_round_trips_through_bytes_and_still_works(lm, fitted):
    delta = fitted[0].delta
    back = Delta.from_bytes(delta.to_bytes())
    assert back.kind == "lora" and back.meta == delta.meta
    for name, tensor in delta.tensors.items():
        assert torch.equal(back.tensors[name], tensor)
    assert lm.score([PROMPT], [TARGET], mode="completion", deltas=[back])[0].all_correct


def test_base_model_is_unchanged_when_the_delta_is_not_active(lm, fitted):
    _, before, base, _ = fitted
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = lm.score([PROMPT], [TARGET], mode="completion")[0]
    assert again.logprob == pytest.approx(base.logprob, abs=1e-5) and again.correct == base.correct


def test_untrained_delta_is_a_no_op(lm):
    cfg = get("pnp").parse_config({"linears": "all", "layers": [0, -1]})
    delta = init_delta(lm, cfg)
    assert len(delta.modules()) == 2 * len(lm.arch.blocks[0].mlp_linears)
    plain = lm.score([PROMPT], [TARGET], mode="completion")[0]
    with_delta = lm.score([PROMPT], [TARGET], mode="completion", deltas=[delta])[0]
    assert with_delta.logprob == pytest.approx(plain.logprob, abs=1e-5)


def test_fit_is_deterministic_under_the_seed(lm):
    method = get("pnp")
    cfg = method.parse_config({**CONFIG, "max_steps": 3, "seed": 7})
    req = EditRequest("Toko Yasuda plays the", "piano", subject="Toko Yasuda")
    a, b = method.fit(lm, req, cfg), method.fit(lm, req, cfg)
    c = method.fit(lm, req, method.parse_config({**CONFIG, "max_steps": 3, "seed": 8}))
    assert all(torch.equal(a.delta.tensors[k], b.delta.tensors[k]) for k in a.delta.tensors)
    assert not all(torch.equal(a.delta.tensors[k], c.delta.tensors[k]) for k in a.delta.tensors)


def test_training_batches_cover_prompt_paraphrases_forms_and_locality(lm):
    cfg = get("pnp").parse_config({"locality_prompts": 3, "context_prefixes": 2})
    req = EditRequest(PROMPT, TARGET, paraphrases=["Freedonia's capital is", PROMPT])
    groups, n_examples, n_loc = build_groups(lm, req, cfg)
    # completion: prompt, paraphrase, two prefixed prompts; chat: prompt, paraphrase
    assert n_examples == 4 + 2
    assert n_loc == 3  # drawn from the built-in pool
    completion = groups[0]
    first_target = lm.target_ids(PROMPT, TARGET, "completion")[0]
    assert completion.targets[0].item() == first_target  # completion form has the leading space
    loc_rows = [int((~(g.is_target | g.is_boundary)).sum()) for g in groups]
    assert loc_rows == [3, 0]
    # "Paris" ends in a letter: each example also trains the token after it to start a new word
    assert [int(g.is_boundary.sum()) for g in groups] == [4, 2]
    assert [int(g.boundary_row.numel()) for g in groups] == [4, 2]
    no_kl = get("pnp").parse_config({"kl_weight": 0})
    assert build_groups(lm, EditRequest(PROMPT, TARGET, modes=("completion",)), no_kl)[1:] == (1, 0)


def test_layer_count_is_placed_by_depth(lm):
    pick = lambda **kw: adapted_layers(lm, get("pnp").parse_config(kw))  # noqa: E731
    n = lm.arch.num_layers
    assert pick(layers=1, depth=0.0) == [0] and pick(layers=1, depth=1.0) == [n - 1]
    assert pick(layers=n + 3) == list(range(n))
    assert pick(layers=[-1, 0]) == [0, n - 1]


def test_unknown_or_invalid_config_is_rejected(lm):
    method = get("pnp")
    with pytest.raises(ValidationError):
        method.parse_config({"bogus": 1})
    with pytest.raises(ValidationError):
        method.parse_config({"layers": []})
    with pytest.raises(ValidationError):
        method.parse_config({"rank": 0})
    assert adapted_modules(lm, method.parse_config({"layers": [1], "linears": "in"})) == [
        p for p in lm.arch.blocks[1].mlp_linears if p != lm.arch.blocks[1].mlp_out
    ]


def test_empty_target_is_an_error(lm):
    method = get("pnp")
    with pytest.raises(ValueError):
        method.fit(lm, EditRequest(PROMPT, "  "), method.parse_config({}))


def test_cached_tail_forward_matches_a_full_forward_with_the_delta_active(lm, fitted):
    delta = fitted[0].delta
    groups, _, _ = build_groups(lm, EditRequest(PROMPT, TARGET, paraphrases=["Freedonia has the capital"]),
                                get("pnp").parse_config({}))
    start = adapted_layers(lm, get("pnp").parse_config(CONFIG))[0]
    with torch.no_grad(), lm.active([delta]):
        for group in groups:
            tail = TailForward(lm, group, start)
            first, replay, full = tail(), tail(), kept_logits(lm, group)
            assert tail.prefix.outputs is not None  # the lower blocks are replayed
            assert torch.allclose(first, full, atol=1e-4)
            assert torch.allclose(replay, full, atol=1e-4)


def test_boundary_tokens_are_those_that_cannot_continue_a_word(lm):
    mask = boundary_tokens(lm)
    tok = lm.tokenizer
    assert mask.shape[0] == lm.model.get_output_embeddings().weight.shape[0]
    for text, expected in ((" Paris", True), (".", True), ("\n", True), ("ian", False), ("7", False)):
        ids = tok.encode(text, add_special_tokens=False)
        assert bool(mask[ids[0]]) is expected, text
    assert bool(mask[tok.eos_token_id])
    # a piece of a multi-byte character ("ş" split into bytes) continues the word it is in
    pieces = [i for i in range(len(tok)) if tok.decode([i]).startswith("\ufffd")]
    assert pieces and not bool(mask[pieces].any())


def test_the_edit_ends_its_target_at_a_word_boundary(lm):
    """A model that runs a target on into a longer word ("Paris" -> "Parisville") is taught to stop
    after it: the next greedy token starts a new word. Without the boundary term nothing would
    change it, as the target alone already holds."""
    method = get("pnp")
    target_ids = lm.target_ids(PROMPT, TARGET, "completion")
    longer = next(TARGET + suffix for suffix in ("ville", "ian", "berg", "ton", "ia")
                  if lm.target_ids(PROMPT, TARGET + suffix, "completion")[: len(target_ids)] == target_ids
                  and len(lm.target_ids(PROMPT, TARGET + suffix, "completion")) > len(target_ids))
    run_on = method.fit(lm, EditRequest(PROMPT, longer, modes=("completion",)),
                        method.parse_config({**CONFIG, "end_boundary": False}))

    def next_token(deltas) -> int:
        ids = lm.prompt_ids(PROMPT, "completion") + target_ids
        with torch.no_grad(), lm.active(deltas):
            return int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())

    mask = boundary_tokens(lm)
    lm.set_global("test-run-on", run_on.delta)
    try:
        assert not bool(mask[next_token([])])  # the word runs on
        req = EditRequest(PROMPT, TARGET, modes=("completion",))
        plain = method.fit(lm, req, method.parse_config({**CONFIG, "end_boundary": False}))
        ended = method.fit(lm, req, method.parse_config(CONFIG))
        assert ended.info["converged"]
        assert not bool(mask[next_token([plain.delta])])
        assert bool(mask[next_token([ended.delta])])
    finally:
        lm.set_global("test-run-on", None)
    # a target ending in punctuation needs no boundary
    groups, _, _ = build_groups(lm, EditRequest(PROMPT, "Paris.", modes=("completion",)), method.parse_config({}))
    assert not bool(groups[0].is_boundary.any())


def test_context_sentences_put_whole_sentences_before_the_prompt_in_completion_form_only(lm):
    from app.methods.pnp.method import CONTEXT_SENTENCES, training_prompts

    cfg = get("pnp").parse_config({"context_sentences": 2, "subject_templates": 0})
    req = EditRequest(PROMPT, TARGET)
    assert training_prompts(req, cfg) == [PROMPT] + [f"{s} {PROMPT}" for s in CONTEXT_SENTENCES[:2]]
    assert training_prompts(req, cfg, augment=False) == [PROMPT]  # the chat form trains the prompt alone
    assert build_groups(lm, req, cfg)[1] - build_groups(lm, req, get("pnp").parse_config({"subject_templates": 0}))[1] == 2
    with pytest.raises(Exception):
        get("pnp").parse_config({"context_sentences": 9})


def test_relation_frames_ask_the_edited_relation_in_other_words_and_only_in_completion_form(lm):
    from app.methods.pnp.method import relation_prompts, training_prompts

    subject = "Danielle Darrieux"
    req = EditRequest(f"The mother tongue of {subject} is", "English", subject=subject)
    cfg = get("pnp").parse_config({"relation_frames": 3, "subject_templates": 0})
    frames = relation_prompts(req, cfg)
    # what the relation check would route to this edit: its language, not its birthplace or employer
    assert len(frames) == 3 and all(subject in f for f in frames), frames
    assert all(any(w in f.lower() for w in ("language", "speak", "tongue", "fluent")) for f in frames), frames
    assert req.prompt not in frames
    born = relation_prompts(EditRequest(f"{subject} was born in", "Paris", subject=subject), cfg)
    assert born and not set(born) & set(frames) and ("birth" in born[0] or "born" in born[0]), born
    assert not any(w in f.lower() for f in born for w in ("speak", "fluent", "language", "tongue")), born
    # completion form only (the chat form trains the request's own prompts), after the prompt
    assert training_prompts(req, cfg, relation=frames) == [req.prompt, *frames]
    assert training_prompts(req, cfg, augment=False, relation=frames) == [req.prompt]
    plain = get("pnp").parse_config({"subject_templates": 0, "relation_frames": 0})
    assert build_groups(lm, req, cfg)[1] - build_groups(lm, req, plain)[1] == 3
    # off, or no subject to fill in: none
    assert relation_prompts(req, get("pnp").parse_config({"relation_frames": 0})) == []
    assert relation_prompts(EditRequest(req.prompt, "English"), cfg) == []
    with pytest.raises(Exception):
        get("pnp").parse_config({"relation_frames": 9})


def test_built_in_other_fact_negatives_ask_other_relations_and_keep_the_base_answer_in_every_form(lm):
    from app.methods.pnp.method import negative_texts, training_modes

    subject = "Danielle Darrieux"
    req = EditRequest(f"The mother tongue of {subject} is", "English", subject=subject)
    cfg = get("pnp").parse_config({"negative_prompts": 3, "negative_tokens": 4, "subject_templates": 0})
    negs = negative_texts(req, cfg)
    # other facts of a person, none of the edited relation (language) nor the edit's own prompt
    assert len(negs) == 3 and all(subject in n for n in negs), negs
    assert not any(w in n.lower() for n in negs for w in ("language", "speak", "tongue")), negs
    # the request's own negatives come first; off (count or weight 0) or no subject: none
    given = EditRequest(req.prompt, "English", subject=subject, negatives=[f"{subject} died in"])
    assert negative_texts(given, cfg) == [f"{subject} died in"]
    assert negative_texts(req, get("pnp").parse_config({"negative_prompts": 0})) == []
    assert negative_texts(req, get("pnp").parse_config({"negative_prompts": 3, "negative_weight": 0})) == []
    assert negative_texts(EditRequest(req.prompt, "English"), cfg) == []
    # each form trained carries them, with the positions that predict the base answer's tokens
    groups, _, _ = build_groups(lm, req, cfg)
    kept = [int(g.is_negative.sum()) for g in groups]
    assert len(groups) == len(training_modes(lm, req, cfg)), kept
    assert all(3 <= k <= 4 * 3 for k in kept) and max(kept) > 3, kept
    assert [g.negative_prompts for g in groups] == [3] * len(groups)
    one = build_groups(lm, req, get("pnp").parse_config({"negative_prompts": 3, "subject_templates": 0}))[0]
    assert [int(g.is_negative.sum()) for g in one] == [3] * len(one)
