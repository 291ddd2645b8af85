"""Apply Deltas with forward hooks, per thread, never touching base weights.

A hook is installed once on each module a delta has ever named; it reads the deltas active in
the *calling thread* and adds their contribution. So two threads (two requests) running the same
model never see each other's delta, and a module no delta is active on costs one dict lookup.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

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
            for delta in entries:
                out = out + _contribution(delta, path, x).to(out.dtype)
            if isinstance(output, tuple):
                return (out,) + tuple(output[1:])
            return out

        return hook

    # -- activation --------------------------------------------------------------------------
    @contextmanager
    def active(self, deltas: Iterable[Delta] | None) -> Iterator[None]:
        """Make ``deltas`` active in this thread for the duration of the block (nesting adds)."""
        deltas = [d for d in (deltas or []) if d is not None]
        previous = getattr(self._local, "active", None)
        if not deltas:
            yield
            return
        mapping: dict[str, list[Delta]] = {k: list(v) for k, v in (previous or {}).items()}
        for delta in deltas:
            for path in delta.modules():
                self._ensure_hook(path)
                mapping.setdefault(path, []).append(delta)
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
