"""Replaying the lower blocks of a batch (``LM.prefix``): a forward that reuses them gives the
logits a full forward gives, skips their computation, and other threads run every block."""

from __future__ import annotations

import threading

import pytest
import torch

from app.delta import Delta


@pytest.fixture(scope="module")
def lm():
    from app.lm.testing import tiny_lm

    return tiny_lm("llama", seed=3)


def _lora_on(lm, block: int) -> Delta:
    path = lm.arch.blocks[block].mlp_out
    d_in, d_out = lm.arch.module(path).in_features, lm.arch.module(path).out_features
    g = torch.Generator().manual_seed(block)
    return Delta("lora", {f"{path}::A": torch.randn(2, d_in, generator=g), f"{path}::B": torch.randn(d_out, 2, generator=g)},
                 {"scale": "1.0"})


def _logits(lm, ids, deltas=()):
    with torch.no_grad(), lm.active(list(deltas)):
        return lm.model(input_ids=ids).logits


def test_replayed_forward_equals_a_full_one_and_skips_the_lower_blocks(lm):
    first = lm.arch.num_layers - 1
    ids = torch.tensor([[5, 9, 13, 17, 21], [6, 10, 14, 18, 22]])
    upper = _lora_on(lm, first)
    calls = []
    handle = lm.arch.module(lm.arch.blocks[0].mlp).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        prefix = lm.prefix(first)
        with prefix.use():
            recorded = _logits(lm, ids)
        assert len(calls) == 1 and prefix.outputs is not None
        with prefix.use():
            replayed = _logits(lm, ids, [upper])
        assert len(calls) == 1  # the lower blocks did not run again
        full = _logits(lm, ids, [upper])
        assert len(calls) == 2
    finally:
        handle.remove()
    assert torch.allclose(recorded, _logits(lm, ids))
    assert torch.allclose(replayed, full, atol=1e-5)
    assert not torch.allclose(replayed, recorded, atol=1e-3)  # the upper delta did act


def test_other_threads_run_every_block_while_one_replays(lm):
    first = lm.arch.num_layers - 1
    mine = torch.tensor([[5, 9, 13, 17]])
    theirs = torch.tensor([[30, 31, 32, 33]])
    expected = _logits(lm, theirs)
    prefix = lm.prefix(first)
    with prefix.use():
        _logits(lm, mine)
    seen = {}
    with prefix.use():
        t = threading.Thread(target=lambda: seen.setdefault("logits", _logits(lm, theirs)))
        t.start()
        t.join()
        _logits(lm, mine)
    assert torch.allclose(seen["logits"], expected)
