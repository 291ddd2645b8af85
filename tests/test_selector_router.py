"""The selector's routing rule, on a bag-of-words fake encoder (fast) and once on MiniLM (e2e)."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from app.selector.encoders import l2_normalise
from app.selector.router import KeyRecord, Selector, normalise_words, subject_in


class BagOfWords:
    """Texts sharing words get similar unit vectors: each word hashes to a fixed random vector."""

    name = "bag-of-words"
    dim = 64

    def __init__(self) -> None:
        self.calls = 0

    def _word(self, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        rows = [sum((self._word(w) for w in normalise_words(t).split()), np.zeros(self.dim)) for t in texts]
        return l2_normalise(np.array(rows, dtype=np.float32))


def make(threshold=0.5, unnamed_threshold=1.01, subjectless_threshold=0.8, **kw) -> Selector:
    return Selector(
        BagOfWords(), threshold, unnamed_threshold=unnamed_threshold, subjectless_threshold=subjectless_threshold, **kw
    )


def add(sel: Selector, edit_id: str, prompt: str, subject: str | None = None, paraphrases=()) -> None:
    rec = sel.keys_for(prompt, list(paraphrases), subject)
    rec.edit_id = edit_id
    sel.add(rec)


def test_in_scope_routes_to_its_own_edit_and_unrelated_query_to_none():
    sel = make()
    add(sel, "uk", "The prime minister of the United Kingdom is", "United Kingdom")
    add(sel, "fr", "The capital city of France is", "France")
    route = sel.route("Today the prime minister of the United Kingdom is")
    assert route is not None and route.edit_id == "uk" and route.subject_match
    assert route.key_text == "The prime minister of the United Kingdom is"
    assert sel.route("The capital city of France is").edit_id == "fr"
    assert sel.route("How do penguins keep warm in winter") is None


def test_subject_rule_rejects_a_query_sharing_relation_and_half_the_subject():
    bbc_one, bbc_radio = "BBC One, by", "BBC Radio, by"
    strict = make(threshold=0.3)
    add(strict, "e1", bbc_one, "BBC One")
    assert strict.route(bbc_one).edit_id == "e1"
    assert strict.route(bbc_radio) is None
    # similarity alone (unnamed threshold = threshold) lets the look-alike through: the rule matters
    loose = make(threshold=0.3, unnamed_threshold=0.3)
    add(loose, "e1", bbc_one, "BBC One")
    assert loose.rule == "similarity" and strict.rule == "subject"
    assert loose.route(bbc_radio) is not None


def test_subject_named_but_too_dissimilar_is_not_routed():
    sel = make(threshold=0.6)
    add(sel, "e1", "The mother tongue of Danielle Darrieux is", "Danielle Darrieux")
    assert sel.route("Danielle Darrieux was born in the city of") is None


def test_edit_without_subject_uses_similarity_alone():
    sel = make(threshold=0.3, subjectless_threshold=0.9)
    add(sel, "e1", "the best pizza topping is")
    add(sel, "e2", "The capital city of France is", "France")
    route = sel.route("the best pizza topping is")
    assert route.edit_id == "e1" and not route.subject_match  # identical: similarity 1
    assert sel.route("the best topping for a salad is") is None
    assert sel.route("the capital city of Germany is") is None  # e2 needs France named


def test_two_edits_on_one_subject_pick_the_closer_key():
    sel = make(threshold=0.2)
    add(sel, "job", "The profession of Arun Nehru is", "Arun Nehru")
    add(sel, "born", "Arun Nehru was born in the city of", "Arun Nehru")
    assert sel.route("What is the profession of Arun Nehru").edit_id == "job"
    assert sel.route("In which city was Arun Nehru born").edit_id == "born"


def test_paraphrase_keys_extend_the_scope():
    sel = make(threshold=0.7)
    add(sel, "e1", "Eiffel Tower is located in", "Eiffel Tower", paraphrases=["Which city has the Eiffel Tower"])
    assert len(sel.keys_for("a", ["a", " b ", ""]).texts) == 2  # duplicates and blanks dropped
    route = sel.route("which city has the Eiffel Tower ?")
    assert route is not None and route.key_text == "Which city has the Eiffel Tower"


def test_remove_and_replace_all():
    sel = make()
    add(sel, "a", "The capital city of France is", "France")
    add(sel, "b", "The currency of Japan is", "Japan")
    assert len(sel) == 2 and "a" in sel
    assert sel.remove("a") is True and sel.remove("a") is False
    assert sel.route("The capital city of France is") is None
    assert sel.route("The currency of Japan is").edit_id == "b"
    rec = sel.keys_for("The capital city of France is", [], "France")
    rec.edit_id = "c"
    sel.replace_all([rec])
    assert sel.edit_ids() == ["c"]
    assert sel.route("The currency of Japan is") is None
    assert sel.route("The capital city of France is").edit_id == "c"


def test_add_rejects_records_without_id_or_of_the_wrong_width():
    sel = make()
    with pytest.raises(ValueError):
        sel.add(sel.keys_for("x is", [], None))
    with pytest.raises(ValueError):
        sel.add(KeyRecord("z", np.ones((1, 3), dtype=np.float32), ["x"]))
    with pytest.raises(ValueError):
        KeyRecord("z", np.ones((2, 64), dtype=np.float32), ["only one text"])


def test_empty_selector_routes_nothing_and_route_many_matches_route():
    sel = make()
    assert sel.route("anything") is None and sel.route_many([]) == []
    add(sel, "fr", "The capital city of France is", "France")
    queries = ["The capital city of France is", "Penguins live in", "what is the capital city of France"]
    many = sel.route_many(queries)
    assert [r.edit_id if r else None for r in many] == [
        (r.edit_id if r else None) for r in (sel.route(q) for q in queries)
    ]


def test_centroid_prefilter_agrees_with_the_exact_scan():
    subjects = [f"Person{i} Family{i}" for i in range(60)]
    exact = make(threshold=0.3, unnamed_threshold=0.5)
    approx = make(threshold=0.3, unnamed_threshold=0.5, exact_limit=10, prefilter=8)
    for i, s in enumerate(subjects):
        for sel in (exact, approx):
            add(sel, f"e{i}", f"{s} works as a", s, paraphrases=[f"The job of {s} is"])
    for i, s in enumerate(subjects[:20]):
        for q in (f"{s} works as a", f"what job does {s} have", f"works as a Person{i}"):
            a, b = exact.route(q), approx.route(q)
            assert (a.edit_id if a else None) == (b.edit_id if b else None)
    # the same for subjectless edits, which are always scanned
    exact, approx = make(subjectless_threshold=0.5), make(subjectless_threshold=0.5, exact_limit=10, prefilter=8)
    for i, s in enumerate(subjects):
        for sel in (exact, approx):
            add(sel, f"e{i}", f"{s} works as a", None, paraphrases=[f"The job of {s} is"])
    hits = 0
    for s in subjects[:20]:
        a, b = exact.route(f"what job does {s} have"), approx.route(f"what job does {s} have")
        assert (a.edit_id if a else None) == (b.edit_id if b else None)
        hits += a is not None
    assert hits >= 10


def test_a_mixed_memory_routes_alike_with_and_without_the_prefilter():
    """Edits with and without a subject in one memory; the narrowed scan of the subjectless
    edits must not lose a named edit, and every route names the key it matched."""
    people = [f"Person{i} Family{i}" for i in range(40)]
    exact = make(threshold=0.3, subjectless_threshold=0.5)
    approx = make(threshold=0.3, subjectless_threshold=0.5, exact_limit=10, prefilter=4)
    for sel in (exact, approx):
        for i, s in enumerate(people):
            if i % 2:
                add(sel, f"s{i}", f"{s} works as a", s, paraphrases=[f"The job of {s} is"])
            else:
                add(sel, f"n{i}", f"{s} lives in", None, paraphrases=[f"The home town of {s} is"])
        sel.remove("s3")  # a gap in the memory: rows of later edits move
    for i, s in enumerate(people[:20]):
        for q in (f"what job does {s} have", f"where does {s} live", f"{s} lives in"):
            a, b = exact.route(q), approx.route(q)
            assert (a.edit_id if a else None) == (b.edit_id if b else None), q
            if a is not None:
                assert a.key_text == b.key_text and f"Person{a.edit_id[1:]} " in a.key_text
    assert exact.route("what job does Person3 Family3 have") is None
    routed = exact.route("what job does Person5 Family5 have")
    assert routed is not None and routed.edit_id == "s5" and routed.subject_match
    assert exact.route("Person4 Family4 lives in").edit_id == "n4"


def test_lookup_is_thread_safe_while_the_memory_changes():
    sel = make(threshold=0.4)
    add(sel, "fixed", "The capital city of France is", "France")
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(100):
                add(sel, f"w{i}", f"Subject{i} plays the", f"Subject{i}")
                if i % 2:
                    sel.remove(f"w{i - 1}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(200):
                route = sel.route("The capital city of France is")
                assert route is not None and route.edit_id == "fixed"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_subject_matching_ignores_case_accents_and_punctuation_but_needs_whole_words():
    assert subject_in("Nicolas de Malézieu", "what's the language of nicolas de malezieu?")
    assert subject_in("BBC One", "BBC One's owner is")
    assert not subject_in("BBC One", "BBC Radio, by")
    assert not subject_in("Ford", "Fordham University is in")
    assert not subject_in("!!", "!! anything")
    assert subject_in("Houston toad", "What's the threatened status of Houston toads?")
    assert subject_in("Fredrik Semb Berge", "What's the name of Fredrik Semb Berges' team?")
    assert not subject_in("Houston toad", "Houston toadstool")


def test_an_inflected_mention_of_the_subject_is_found_by_the_index():
    sel = make(threshold=0.2)
    add(sel, "toad", "What is the conservation status of the Houston toad?", "Houston toad")
    route = sel.route("What is the conservation status of Houston toads?")
    assert route is not None and route.edit_id == "toad" and route.subject_match


@pytest.mark.e2e
def test_minilm_with_default_rule_routes_a_paraphrase_and_not_a_look_alike():
    from app.selector.router import build_selector

    sel = build_selector(None, "minilm")
    assert sel.encoder.dim == 384
    v = sel.encoder.encode(["hello world", "hello world"])
    assert v.dtype == np.float32 and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    for edit_id, prompt, subject in [
        ("bbc", "BBC One, by", "BBC One"),
        ("pm", "The prime minister of the United Kingdom is", "United Kingdom"),
        ("nehru", "The profession of Arun Nehru is", "Arun Nehru"),
    ]:
        rec = sel.keys_for(prompt, [], subject)
        rec.edit_id = edit_id
        sel.add(rec)
    assert sel.route("Arun Nehru is known for").edit_id == "nehru"
    assert sel.route("Who is the prime minister of the United Kingdom?").edit_id == "pm"
    assert sel.route("BBC Radio, by") is None
    assert sel.route("George Washington's profession is a") is None


def test_add_many_routes_like_adding_one_by_one_and_validates_first():
    one, many = make(), make()
    facts = [("fr", "The capital city of France is", "France"), ("de", "The capital city of Germany is", "Germany"),
             ("it", "The capital city of Italy is", "Italy")]
    records = []
    for edit_id, prompt, subject in facts:
        add(one, edit_id, prompt, subject)
        record = many.keys_for(prompt, [], subject)
        record.edit_id = edit_id
        records.append(record)
    many.add_many(records)
    assert sorted(many.edit_ids()) == sorted(one.edit_ids()) == ["de", "fr", "it"]
    queries = [p for _, p, _ in facts] + ["Penguins live in"]
    assert [r.edit_id if r else None for r in many.route_many(queries)] == ["fr", "de", "it", None]
    bad = many.keys_for("x is", [], None)  # no edit id: nothing of the batch is added
    with pytest.raises(ValueError):
        many.add_many([KeyRecord("es", records[0].vectors, records[0].texts, "Spain"), bad])
    assert "es" not in many and len(many) == 3


# -- relation scope --------------------------------------------------------------------------------
class EveryPairHead:
    """A stand-in scope head for the bag-of-words encoder: relation keys and masked query
    compared by cosine (a fixed rule, so the tests need no trained weights)."""

    use_target = False

    def scores(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (u @ v + 1.0) / 2.0


def test_mask_subject_keeps_the_rest_of_the_text():
    from app.selector.scope import edit_relation_texts, mask_subject

    assert mask_subject("Who is the UK Prime-Minister?", "UK prime minister") == "Who is the X?"
    assert mask_subject("The UK prime minister's party is", "UK prime minister") == "The X's party is"
    assert mask_subject("Houston toads live in", "Houston toad") == "Xs live in"
    assert mask_subject("Zoë Saldaña was born in", "Zoe Saldana") == "X was born in"
    assert mask_subject("Nothing here", "Paris") == "Nothing here"
    assert edit_relation_texts(["Toko Yasuda, the"], "Toko Yasuda", "piano") == ["X, the piano"]


def test_relation_text_starts_at_the_sentence_that_names_the_subject():
    from app.selector.scope import edit_relation_texts, query_relation_text

    # Context before the question says nothing about the relation asked.
    assert query_relation_text("The game got good reviews. CBeebies is owned by", "CBeebies") == "X is owned by"
    assert query_relation_text('"If only mum could see." Dacia is from', "Dacia") == "X is from"
    assert query_relation_text("Reception\nThe U.K. prime minister is", "U.K. prime minister") == "The X is"
    # A sentence end after the first mention, or none at all, keeps the whole text.
    assert query_relation_text("Who is the UK prime minister? Tell me.", "UK prime minister") == "Who is the X? Tell me."
    assert query_relation_text("In 2024 the UK prime minister was", "UK prime minister") == "In 2024 the X was"
    assert query_relation_text("Nothing here. Really.", "Paris") == "Nothing here. Really."
    assert edit_relation_texts(["Some context. Toko Yasuda, the"], "Toko Yasuda", "piano") == ["X, the piano"]


def test_keys_for_fills_relation_keys_only_with_a_subject_and_checks_scope():
    sel = make()
    rec = sel.keys_for("The capital city of France is", ["France's capital is"], "France", target="Paris")
    assert rec.scope == "fact" and rec.relation_vectors is not None
    assert rec.relation_vectors.shape == (2, sel.encoder.dim)
    assert sel.keys_for("the best pizza topping is").relation_vectors is None
    assert sel.keys_for("France is in", (), "France", scope="subject").scope == "subject"
    with pytest.raises(ValueError):
        sel.keys_for("France is in", (), "France", scope="everything")


def test_relation_check_costs_one_extra_encode_only_when_a_named_edit_passes():
    sel = make(threshold=0.1, scope_head=EveryPairHead(), scope_threshold=0.75)
    rng = np.random.default_rng(0)
    records = []
    for i in range(3000):  # a large memory: the check must not loop over it
        rec = KeyRecord(f"e{i}", l2_normalise(rng.standard_normal((2, 64)).astype(np.float32)), ["a", "b"],
                        f"entity {i}", relation_vectors=l2_normalise(rng.standard_normal((2, 64)).astype(np.float32)))
        records.append(rec)
    sel.add_many(records)
    add(sel, "born", "Marie Curie was born in", "Marie Curie")
    sel.encoder.inner.calls = 0
    assert sel.route("How do penguins keep warm in winter") is None
    assert sel.encoder.inner.calls == 1  # no named edit: no extra encode
    route = sel.route("Marie Curie was born in the city of")
    assert route is not None and route.edit_id == "born" and route.relation_score is not None
    assert sel.encoder.inner.calls == 3  # the query, then one batch of masked queries
    assert sel.route("Marie Curie died in the city of") is None  # another relation of the subject


def test_scope_subject_serves_every_relation_of_its_subject():
    sel = make(threshold=0.1, scope_head=EveryPairHead(), scope_threshold=0.75)
    rec = sel.keys_for("Marie Curie was born in", (), "Marie Curie", scope="subject")
    rec.edit_id = "curie"
    sel.add(rec)
    assert sel.route("Marie Curie was born in the city of").edit_id == "curie"
    route = sel.route("Marie Curie died in the city of")
    assert route is not None and route.edit_id == "curie" and route.relation_score is None


def test_a_record_without_relation_keys_gets_them_computed_once():
    sel = make(threshold=0.1, scope_head=EveryPairHead(), scope_threshold=0.75)
    rec = sel.keys_for("Marie Curie was born in", (), "Marie Curie")
    sel.add(KeyRecord("old", rec.vectors, rec.texts, rec.subject))  # stored before relation keys existed
    assert sel.route("Marie Curie was born in the city of").edit_id == "old"
    assert sel.route("Marie Curie died in the city of") is None
    calls = sel.encoder.inner.calls
    sel.route("Marie Curie was born in the city of")
    assert sel.encoder.inner.calls == calls + 2  # the cached relation keys are not encoded again


@pytest.mark.e2e
def test_minilm_relation_check_keeps_paraphrases_and_rejects_other_relations():
    from app.selector.router import build_selector

    sel = build_selector(None, "minilm")
    assert sel.scope_head is not None  # the shipped head loads offline
    for edit_id, prompt, subject, target, scope in [
        ("pm", "The UK prime minister is", "UK prime minister", "Keir Starmer", "fact"),
        ("toko", "Toko Yasuda, the", "Toko Yasuda", "piano", "fact"),
        ("wide", "Danielle Darrieux's mother tongue is", "Danielle Darrieux", "English", "subject"),
    ]:
        rec = sel.keys_for(prompt, [], subject, target=target, scope=scope)
        rec.edit_id = edit_id
        sel.add(rec)
    assert sel.route("Who is the UK prime minister?").edit_id == "pm"
    assert sel.route("The UK prime minister was born in") is None
    assert sel.route("Toko Yasuda is incredible at").edit_id == "toko"
    assert sel.route("Toko Yasuda was born in") is None
    assert sel.route("Danielle Darrieux was born in").edit_id == "wide"
    old = sel.keys_for("The UK prime minister is", [], "UK prime minister", target="Keir Starmer")
    sel.add(KeyRecord("pm", old.vectors, old.texts, old.subject))  # no relation keys: computed lazily
    assert sel.route("Who is the UK prime minister?").edit_id == "pm"
    assert sel.route("The UK prime minister was born in") is None


def test_memo_embeds_each_text_once_inside_and_never_keeps_it_outside():
    inner = BagOfWords()
    sel = make()
    sel.encoder.inner = inner
    q = "The capital city of France is"
    with sel.memo():
        first = sel.encoder.encode([q, "Paris", q])
        again = sel.encoder.encode([q])
        assert inner.calls == 1  # "q" twice and "Paris" in one call; the second call reuses q
        np.testing.assert_allclose(first[0], again[0])
        np.testing.assert_allclose(first[0], first[2])
        seen = []
        t = threading.Thread(target=lambda: seen.append(sel.encoder.encode([q])))
        t.start(); t.join()
        assert inner.calls == 2  # another thread is not served from this thread's memo
        assert sel.encoder.encode([]).shape == (0, inner.dim)
    sel.encoder.encode([q])
    sel.encoder.encode([q])
    assert inner.calls == 4  # outside the block every call embeds again
    np.testing.assert_allclose(sel.encoder.encode([q])[0], first[0], rtol=1e-6)
