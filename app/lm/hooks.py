"""Apply Deltas with forward hooks, per thread, never touching base weights.

A hook is installed once on each module a delta has ever named; it reads the deltas active in
the *calling thread* and adds their contribution. So two threads (two requests) running the same
model never see each other's delta, and a module no delta is active on costs one dict lookup.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from app.delta import Delta

_ACTS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "identity": lambda x: x,
}


class DeltaHooks:
    def __init__(self, arch):
        self.arch = arch
        self._local = threading.local()
        self._installed: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._install_lock = threading.Lock()

    # -- installation ------------------------------------------------------------------------
    def _ensure_hook(self, path: str) -> None:
        if path in self._installed:
            return
        with self._install_lock:
            if path in self._installed:
                return
            module: nn.Module = self.arch.module(path)
            self._installed[path] = module.register_forward_hook(self._make_hook(path))

    def _make_hook(self, path: str):
        local = self._local

        def hook(module, inputs, output):
            active = getattr(local, "active", None)
            if not active:
                return None
            entries = active.get(path)
            if not entries:
                return None
            x = inputs[0]
            out = output[0] if isinstance(output, tuple) else output
            for delta, rows in entries:
                if rows is None:
                    out = out + _contribution(delta, path, x).to(out.dtype)
                else:  # this delta serves some rows of the batch only
                    out = out.index_add(0, rows, _contribution(delta, path, x.index_select(0, rows)).to(out.dtype))
            if isinstance(output, tuple):
                return (out,) + tuple(output[1:])
            return out

        return hook

    # -- activation --------------------------------------------------------------------------
    @contextmanager
    def active(self, deltas: Iterable[Delta] | None) -> Iterator[None]:
        """Make ``deltas`` active in this thread for the duration of the block (nesting adds)."""
        deltas = [d for d in (deltas or []) if d is not None]
        if not deltas:
            yield
            return
        with self._activated([(d, None) for d in deltas]):
            yield

    @contextmanager
    def active_rows(self, rows: Sequence[Delta | None], device=None) -> Iterator[None]:
        """Per row of a batch, a delta active on that row alone (None: none), in this thread, for
        the block: one batch answers queries that different edits serve."""
        by_delta: dict[int, tuple[Delta, list[int]]] = {}
        for i, delta in enumerate(rows):
            if delta is not None:
                by_delta.setdefault(id(delta), (delta, []))[1].append(i)
        if not by_delta:
            yield
            return
        entries = [(d, torch.tensor(idx, dtype=torch.long, device=device)) for d, idx in by_delta.values()]
        with self._activated(entries):
            yield

    @contextmanager
    def _activated(self, entries: list[tuple[Delta, torch.Tensor | None]]) -> Iterator[None]:
        previous = getattr(self._local, "active", None)
        mapping: dict[str, list[tuple[Delta, torch.Tensor | None]]] = {k: list(v) for k, v in (previous or {}).items()}
        for delta, rows in entries:
            for path in delta.modules():
                self._ensure_hook(path)
                mapping.setdefault(path, []).append((delta, rows))
        self._local.active = mapping
        try:
            yield
        finally:
            self._local.active = previous

    def remove_all(self) -> None:
        for handle in self._installed.values():
            handle.remove()
        self._installed.clear()


def _contribution(delta: Delta, path: str, x: torch.Tensor) -> torch.Tensor:
    if delta.kind == "lora":
        a, b = delta.get(path, "A"), delta.get(path, "B")
        return (x.to(a.dtype) @ a.T @ b.T) * delta.scale
    if delta.kind == "ffn_slots":
        k, v = delta.get(path, "K"), delta.get(path, "V")
        return _ACTS[delta.act](x.to(k.dtype) @ k.T) @ v
    if delta.kind == "dense":
        w = delta.get(path, "W")
        return x.to(w.dtype) @ w.T
    raise ValueError(delta.kind)
