"""The model engine on tiny random models of two architectures: generation, scoring, hidden
states, and deltas that apply per call and per thread only."""

from __future__ import annotations

import threading

import pytest
import torch

from app.delta import Delta, DeltaError
from app.lm.arch import linear_dims


def lora_for(lm, scale: float = 50.0, seed: int = 1) -> Delta:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for b in lm.arch.blocks[1:3]:
        i, o = linear_dims(lm.arch.module(b.mlp_out))
        tensors[f"{b.mlp_out}::A"] = torch.randn(4, i, generator=g)
        tensors[f"{b.mlp_out}::B"] = torch.randn(o, 4, generator=g)
    return Delta("lora", tensors, {"scale": str(scale)})


@pytest.fixture(params=["llama", "gpt2"])
def lm(request, tiny_llama, tiny_gpt2):
    return tiny_llama if request.param == "llama" else tiny_gpt2


def test_architecture_found_from_structure(lm):
    assert lm.arch.num_layers == 4
    for b in lm.arch.blocks:
        assert b.mlp_out.startswith(b.mlp) and b.mlp.startswith(b.path)


def test_greedy_generation_is_reproducible(lm):
    a = lm.generate(["hello there"], max_new_tokens=5, mode="completion")
    b = lm.generate(["hello there"], max_new_tokens=5, mode="completion")
    assert a[0].token_ids == b[0].token_ids and len(a[0].token_ids) == 5


def test_score_matches_manual_log_probs(lm):
    [s] = lm.score(["hello"], ["world"], mode="completion")
    ids = lm.prompt_ids("hello", "completion") + lm.target_ids("hello", "world", "completion")
    n = len(lm.target_ids("hello", "world", "completion"))
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
    manual = sum(logp[len(ids) - n - 1 + k, ids[len(ids) - n + k]].item() for k in range(n))
    assert s.logprob == pytest.approx(manual, abs=1e-4)


def test_batched_score_equals_single(lm):
    prompts, targets = ["a b c", "hello", "x"], ["d", "big world", "y z"]
    batch = lm.score(prompts, targets, mode="completion")
    for p, t, s in zip(prompts, targets, batch):
        assert lm.score([p], [t], mode="completion")[0].logprob == pytest.approx(s.logprob, abs=1e-4)


def test_delta_changes_output_only_while_active(lm):
    d = lora_for(lm)
    base = lm.score(["hello"], ["world"], mode="completion")[0].logprob
    edited = lm.score(["hello"], ["world"], mode="completion", deltas=[d])[0].logprob
    again = lm.score(["hello"], ["world"], mode="completion")[0].logprob
    assert edited != pytest.approx(base) and again == pytest.approx(base)


def test_delta_roundtrips_through_safetensors(lm):
    d = lora_for(lm)
    d2 = Delta.from_bytes(d.to_bytes())
    assert d2.kind == "lora" and d2.scale == d.scale and d2.modules() == d.modules()
    a = lm.score(["hello"], ["world"], mode="completion", deltas=[d])[0].logprob
    b = lm.score(["hello"], ["world"], mode="completion", deltas=[d2])[0].logprob
    assert a == pytest.approx(b)


def test_malformed_delta_bytes_rejected():
    with pytest.raises(DeltaError):
        Delta.from_bytes(b"\x00" * 20)
    with pytest.raises(DeltaError):
        Delta("lora", {"m::A": torch.zeros(1, 1)})  # no B


def test_deltas_of_concurrent_threads_never_mix(lm):
    d = lora_for(lm)
    base = lm.generate(["hello"], max_new_tokens=4, mode="completion")[0].token_ids
    edited = lm.generate(["hello"], max_new_tokens=4, mode="completion", deltas=[d])[0].token_ids
    assert base != edited
    errors: list[str] = []

    def worker(i: int):
        for _ in range(5):
            use = i % 2 == 0
            with lm.active([d] if use else None):
                out = lm.generate(["hello"], max_new_tokens=4, mode="completion")[0].token_ids
            if out != (edited if use else base):
                errors.append(f"thread {i} delta={use} got {out}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_global_delta_applies_to_every_call_until_removed(lm):
    d = lora_for(lm, seed=3)
    base = lm.score(["hello"], ["world"], mode="completion")[0].logprob
    lm.set_global("cal", d)
    try:
        assert lm.score(["hello"], ["world"], mode="completion")[0].logprob != pytest.approx(base)
    finally:
        lm.set_global("cal", None)
    assert lm.score(["hello"], ["world"], mode="completion")[0].logprob == pytest.approx(base)


def test_hidden_states_shape_and_layer_check(lm):
    h = lm.hidden_states(["one", "two words"], layer=-1)
    assert h.shape == (2, lm.arch.hidden_size)
    with pytest.raises(ValueError):
        lm.hidden_states(["x"], layer=99)


def test_score_rows_may_mix_forms_in_one_batch(real_lm):
    prompts = ["The capital of France is", "The capital of France is", "Water boils at"]
    targets = ["Paris", "Paris", "100 degrees"]
    modes = ["completion", "chat", "completion"]
    mixed = real_lm.score(prompts, targets, modes=modes)
    for p, t, m, s in zip(prompts, targets, modes, mixed):
        [alone] = real_lm.score([p], [t], mode=m)
        assert s.logprob == pytest.approx(alone.logprob, abs=1e-3)
        assert s.correct == alone.correct
    assert mixed[0].logprob != pytest.approx(mixed[1].logprob, abs=1e-3)  # the forms really differ
    with pytest.raises(ValueError):
        real_lm.score(prompts, targets, modes=["completion"])


def test_length_batches_keep_every_row_once_and_short_rows_apart_from_long_ones():
    from app.lm.engine import _length_batches

    lengths = [40, 6, 7, 38, 5, 90, 12]
    batches = _length_batches(lengths, batch_size=32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    where = {i: k for k, b in enumerate(batches) for i in b}
    assert where[1] == where[2] == where[4] and where[0] == where[3]  # 5-7 together, 38-40 together
    assert where[1] != where[0] and where[5] != where[0]  # short rows never padded to 40 or 90
    assert all(len(b) <= 2 for b in _length_batches([5] * 5, batch_size=2))
