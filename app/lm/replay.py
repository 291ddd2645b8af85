"""Forwards that reuse the lower blocks of an earlier forward of the same batch, per thread.

A method that runs the same batch through the model several times with changes only at block
``first`` and above (an editor applying its update at a few upper MLPs, then checking it) need
not run blocks ``0 .. first-1`` again: what they returned the first time is what they would
return now. ``BlockReplay`` wraps the forward of each lower block once; in a thread inside
``Prefix.use()`` a wrapped block records its output (the first time) or returns the recorded one
(afterwards). Other threads, and this thread outside ``use()``, run the blocks as they are.

The caller guarantees what makes this exact: the same input ids and mask each time, and the same
deltas active below ``first`` (the global deltas change only between requests).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch


def _detached(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out


class Prefix:
    """The recorded outputs of the blocks below ``first`` for one batch."""

    def __init__(self, replay: "BlockReplay", first: int):
        self.replay, self.first = replay, first
        self.outputs: dict[int, Any] | None = None

    @contextmanager
    def use(self) -> Iterator[None]:
        """Within the block, a forward records the lower blocks' outputs (the first time) or replays them."""
        if self.first <= 0:
            yield
            return
        self.replay.ensure(self.first)
        local = self.replay.local
        recording = self.outputs is None
        outputs: dict[int, Any] = {} if recording else self.outputs  # type: ignore[assignment]
        previous = getattr(local, "state", None)
        local.state = (self.first, recording, outputs)
        try:
            yield
        finally:
            local.state = previous
        if recording and len(outputs) == self.first:
            self.outputs = outputs


class BlockReplay:
    def __init__(self, arch):
        self.arch = arch
        self.local = threading.local()
        self._wrapped: set[int] = set()
        self._lock = threading.Lock()

    def prefix(self, first: int) -> Prefix:
        return Prefix(self, first)

    def ensure(self, upto: int) -> None:
        if all(i in self._wrapped for i in range(upto)):
            return
        with self._lock:
            for i in range(upto):
                if i not in self._wrapped:
                    self._wrap(i)
                    self._wrapped.add(i)

    def _wrap(self, index: int) -> None:
        block = self.arch.module(self.arch.blocks[index].path)
        original = block.forward
        local = self.local

        def forward(*args, **kwargs):
            state = getattr(local, "state", None)
            if state is None or index >= state[0]:
                return original(*args, **kwargs)
            _, recording, outputs = state
            if not recording:
                return outputs[index]
            out = original(*args, **kwargs)
            outputs[index] = _detached(out)
            return out

        block.forward = forward
