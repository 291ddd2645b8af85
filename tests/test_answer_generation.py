"""An edited answer on tiny random models: the edit's adapter writes its target once, and the base
model writes the rest of the answer (what a user reads), never the target again."""

from __future__ import annotations

import pytest
import torch

from app.methods import EditRequest, get

from tests.test_pnp import CONFIG, PROMPT, TARGET, lm  # noqa: F401 - lm: the tiny llama and gpt2 fixture


@pytest.fixture(scope="module")
def edit(lm):
    method = get("pnp")
    result = method.fit(lm, EditRequest(PROMPT, TARGET, modes=("completion",)), method.parse_config(CONFIG))
    assert result.info["converged"]
    return result.delta


def base_continuation(lm, ids: list[int], n: int) -> list[int]:
    """The base model's greedy continuation of ``ids`` (``n`` tokens at most, cut at the end of text),
    never writing TARGET: what the answer path's second step must give after the written target."""
    with torch.no_grad():
        out = lm.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False,
                                bad_words_ids=lm._target_forms(TARGET), pad_token_id=lm.tokenizer.pad_token_id)
    tail = out[0, len(ids):].tolist()
    eos = lm._stop_ids()
    return tail[: next((i for i, t in enumerate(tail) if t in eos), len(tail))]


def test_the_delta_keeps_its_target_for_the_answer_path(edit):
    assert edit.meta["target"] == TARGET
    from app.delta import Delta

    assert Delta.from_bytes(edit.to_bytes()).meta["target"] == TARGET


def test_the_adapter_writes_the_target_and_the_base_model_the_rest(lm, edit):
    n = 16
    adapter_only = lm.generate([PROMPT], max_new_tokens=n, mode="completion", deltas=[edit])[0]
    answer = lm.generate_edited([PROMPT], TARGET, max_new_tokens=n, mode="completion", deltas=[edit])[0]
    target_ids = lm.target_ids(PROMPT, TARGET, "completion")
    assert adapter_only.token_ids[: len(target_ids)] == target_ids
    assert answer.token_ids[: len(target_ids)] == target_ids
    assert answer.text.count(TARGET) == 1
    # After the target: the base model's own continuation of the prompt and the target, with the
    # target itself never written again.
    base_tail = base_continuation(lm, lm.prompt_ids(PROMPT, "completion") + target_ids, n - len(target_ids))
    assert answer.token_ids[len(target_ids):] == base_tail
    assert len(answer.token_ids) <= n


def test_the_target_ends_where_it_ends(lm, edit):
    """The base model may not run the target on into a longer word ("Sega" -> "SegaMX"): the first
    token after it starts a new word, whatever the base model would rather write."""
    target_ids = lm.target_ids(PROMPT, TARGET, "completion")
    mask = lm.word_boundary_mask()
    allowed = mask.clone()
    lm._word_boundary = torch.zeros_like(mask)  # a model in which only "." starts a new word
    lm._word_boundary[lm.tokenizer.convert_tokens_to_ids(".")] = True
    try:
        answer = lm.generate_edited([PROMPT], TARGET, max_new_tokens=8, mode="completion", deltas=[edit])[0]
    finally:
        lm._word_boundary = allowed
    assert answer.token_ids[: len(target_ids)] == target_ids
    assert answer.token_ids[len(target_ids)] == lm.tokenizer.convert_tokens_to_ids(".")
    assert bool(mask[lm.tokenizer.convert_tokens_to_ids(".")]) and not bool(mask[lm.tokenizer.convert_tokens_to_ids("a")])


def test_a_batch_answers_each_prompt_as_alone(lm, edit):
    prompts = [PROMPT, "Tell me, " + PROMPT, PROMPT + " the city of"]
    batch = lm.generate_edited(prompts, TARGET, max_new_tokens=10, mode="completion", deltas=[edit])
    for p, got in zip(prompts, batch):
        alone = lm.generate_edited([p], TARGET, max_new_tokens=10, mode="completion", deltas=[edit])[0]
        assert got.text == alone.text
        assert len(got.token_ids) <= 10


@pytest.fixture(scope="module")
def other_edit(lm):
    method = get("pnp")
    result = method.fit(lm, EditRequest("The river of Sylvania is the", "Danube", modes=("completion",)),
                        method.parse_config(CONFIG))
    assert result.info["converged"]
    return result.delta


def test_answers_of_different_edits_in_one_batch_are_each_as_alone(lm, edit, other_edit):
    """Each edit's adapter acts on its own rows of the batch only, and each row keeps its own
    target from the base model's continuation."""
    rows = [(PROMPT, TARGET, edit), ("The river of Sylvania is the", "Danube", other_edit),
            ("Tell me, " + PROMPT, TARGET, edit)]
    batch = lm.generate_edited_rows([p for p, _, _ in rows], [t for _, t, _ in rows], [d for _, _, d in rows],
                                    max_new_tokens=10, mode="completion")
    for (p, t, d), got in zip(rows, batch):
        alone = lm.generate_edited([p], t, max_new_tokens=10, mode="completion", deltas=[d])[0]
        assert got.token_ids == alone.token_ids, (p, got.text, alone.text)
    assert batch[0].text.count(TARGET) == 1 and batch[1].text.count("Danube") == 1
    # The other edit's adapter alone does not write this edit's target: the rows did not mix.
    crossed = lm.generate_edited_rows([PROMPT], [TARGET], [other_edit], max_new_tokens=10, mode="completion")[0]
    assert crossed.token_ids != batch[0].token_ids


def test_no_room_or_no_delta_is_plain_generation(lm, edit):
    target_ids = lm.target_ids(PROMPT, TARGET, "completion")
    short = lm.generate_edited([PROMPT], TARGET, max_new_tokens=1, mode="completion", deltas=[edit])[0]
    assert short.token_ids == target_ids[:1]
    plain = lm.generate([PROMPT], max_new_tokens=6, mode="completion")[0]
    assert lm.generate_edited([PROMPT], TARGET, max_new_tokens=6, mode="completion", deltas=[])[0] == plain


def test_no_spelling_of_the_target_is_written_again(lm):
    """"soprano" answered, "Soprano" or "SOPRANO" later is the same word written again: every
    spelling, after a space or not, is kept from the base model's continuation."""
    forms = lm._target_forms("soprano")
    for spelling in ("soprano", "Soprano", "SOPRANO"):
        for text in (spelling, " " + spelling):
            assert lm.tokenizer(text, add_special_tokens=False).input_ids in forms
    title = lm._target_forms("doctor who")
    assert lm.tokenizer(" Doctor Who", add_special_tokens=False).input_ids in title


def test_a_sentence_answer_is_the_budget_answer_cut_at_its_first_sentence_end(lm, edit, monkeypatch):
    """``end="sentence"`` stops where the sentence begun by the target ends and keeps nothing after
    it. The tiny model writes no prose, so here every word ends a sentence."""
    import app.lm.engine as engine

    monkeypatch.setattr(engine, "_SENTENCE_END", __import__("re").compile(r"\S(?=\s)"))
    monkeypatch.setattr(engine, "_SENTENCE_END_FINAL", __import__("re").compile(r"\S(?=\s|$)"))
    monkeypatch.setattr(engine, "_ABBREVIATIONS", set())
    n = 16
    long = lm.generate_edited([PROMPT], TARGET, max_new_tokens=n, mode="completion", deltas=[edit], end="budget")[0]
    short = lm.generate_edited([PROMPT], TARGET, max_new_tokens=n, mode="completion", deltas=[edit], end="sentence")[0]
    assert long.token_ids[: len(short.token_ids)] == short.token_ids
    head = lm.target_ids(PROMPT, TARGET, "completion")
    head_text = lm.tokenizer.decode(head, skip_special_tokens=True)
    tail = lm.tokenizer.decode(long.token_ids[len(head):], skip_special_tokens=True)
    at = engine.sentence_end(head_text, tail, final=True)
    assert at is not None, tail  # the tiny model's tail has a word in it
    got = lm.tokenizer.decode(short.token_ids[len(head):], skip_special_tokens=True)
    assert got.rstrip() == tail[:at].rstrip(), (got, tail, at)
    assert len(short.token_ids) < len(long.token_ids)


def test_chat_answers_end_with_their_sentence_and_completions_go_on():
    from app.lm.engine import sentence_end

    assert sentence_end("Keir Starmer", ". He leads the Labour Party.") == 1
    assert sentence_end("Keir Starmer", ", born in the U.S. in 1962. He") == len(", born in the U.S. in 1962.")
    assert sentence_end("Keir Starmer", " (Mr. Starmer) leads. Then") == len(" (Mr. Starmer) leads.")
    assert sentence_end("Keir Starmer", ' said "yes." Then') == len(' said "yes."')
    assert sentence_end("Keir Starmer", "\n\nHe") == 0
    assert sentence_end("Keir Starmer", " is the prime minister") is None
    assert sentence_end("Keir Starmer", " is the prime minister.") is None  # may still go on ("... minister.5")
    assert sentence_end("Keir Starmer", " is the prime minister.", final=True) == len(" is the prime minister.")


def test_the_adapter_writes_from_heads_from_and_the_base_model_goes_on_after_the_whole_prompt(lm, edit):
    """With ``heads_from`` (the query from the sentence naming the subject), the adapter writes the
    target after that text; the base model then continues the *whole* prompt and the target."""
    full = "Qq zz qq. " + PROMPT
    n = 12
    got = lm.generate_edited_rows([full], [TARGET], [edit], max_new_tokens=n, mode="completion",
                                  heads_from=[PROMPT])[0]
    target_ids = lm.target_ids(PROMPT, TARGET, "completion")
    assert got.token_ids[: len(target_ids)] == target_ids and got.text.count(TARGET) == 1
    tail = base_continuation(lm, lm.prompt_ids(full, "completion") + target_ids, n - len(target_ids))
    assert got.token_ids[len(target_ids):] == tail
    with pytest.raises(ValueError):
        lm.generate_edited_rows([full], [TARGET], [edit], heads_from=[])


def test_a_head_text_that_does_not_give_the_target_falls_back_to_the_whole_prompt(lm, edit, other_edit):
    # other_edit writes "Danube" after its own prompt; asked to write TARGET from there it cannot.
    head = "The river of Sylvania is the"
    alone = lm.generate([head], max_new_tokens=10, mode="completion", deltas=[other_edit])[0]
    assert TARGET.casefold() not in alone.text.casefold()
    with_head = lm.generate_edited_rows([PROMPT], [TARGET], [other_edit], max_new_tokens=10, mode="completion",
                                        heads_from=[head])[0]
    plain = lm.generate_edited_rows([PROMPT], [TARGET], [other_edit], max_new_tokens=10, mode="completion")[0]
    assert with_head.token_ids == plain.token_ids


def test_head_text_starts_at_the_sentence_naming_the_subject():
    from app.services.answers import Routed, head_text

    routed = Routed("e1", 0.9, "Sega")
    assert head_text("The game got good reviews. Sega is owned by", routed) == "Sega is owned by"
    assert head_text("Who owns Sega? Tell me.", routed) == "Who owns Sega? Tell me."
    assert head_text("Nothing about it. Really.", routed) == "Nothing about it. Really."
    assert head_text("The game got good reviews. Sega is owned by", Routed("e1", 0.9)) == (
        "The game got good reviews. Sega is owned by")
