"""Relation scope: does a query that names an edit's subject ask for the edited relation?

The subject is masked ("X") in the edit's texts and in the query, so what is left is the
relation ("X was born in", "Who is the X?"). The edit side also carries the edit's target
("The X is Keir Starmer"): the target's type says much about the relation ("X, the piano").
Both sides are embedded with the selector's encoder (MiniLM), and a small classifier trained
on ParaRel templates and CounterFact train (``scripts/train_scope.py``, SERAC-style scope
classifier) scores each (edit text u, query v) pair from ``[u, v, u*v, |u-v|]``; an edit's
score is its best relation key's. Inference is numpy only.

The trained head ships as ``app/data/scope_head.safetensors`` (no pickle, no network).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np

PLACEHOLDER = "X"
HEAD_PATH = Path(__file__).resolve().parent.parent / "data" / "scope_head.safetensors"

_WORD = re.compile(r"[0-9A-Za-z]+")


def _fold(text: str) -> str:
    """Accents dropped, one output character per input character (so spans stay valid)."""
    out = []
    for ch in text:
        base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        out.append(base if len(base) == 1 else ch)
    return "".join(out)


def mask_subject(text: str, subject: str | None, placeholder: str = PLACEHOLDER) -> str:
    """``text`` with every whole-word mention of ``subject`` replaced by ``placeholder``.

    Matching is the selector's (case, accents and punctuation ignored; the last word may carry
    a plural or genitive ``s`` / ``es``, which is kept: "the UK prime minister's" -> "the X's").
    A text that does not name the subject comes back unchanged."""
    if not subject:
        return text
    from app.selector.router import normalise_words

    sub = normalise_words(subject).split()
    if not sub:
        return text
    folded = _fold(text)
    spans = [(m.start(), m.end(), m.group().casefold()) for m in _WORD.finditer(folded)]
    n = len(sub)
    out, last, i = [], 0, 0
    while i + n <= len(spans):
        words = [w for _, _, w in spans[i : i + n]]
        end = spans[i + n - 1][1]
        ok = words[:-1] == sub[:-1]
        if ok and words[-1] != sub[-1]:
            ok = False
            for suffix in ("es", "s"):
                w = words[-1]
                if w.endswith(suffix) and w[: -len(suffix)] == sub[-1] and len(sub[-1]) >= 3:
                    ok, end = True, spans[i + n - 1][1] - len(suffix)
                    break
        if ok:
            out.append(text[last : spans[i][0]])
            out.append(placeholder)
            last = end
            i += n
        else:
            i += 1
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


# The end of a sentence or line: ".", "!" or "?" (closing quotes or brackets allowed) then space, or a newline.
_SENTENCE_END = re.compile(r"""[.!?]["'\u201d\u2019)\]]*\s+|\n+""")


def subject_sentence(masked: str, placeholder: str = PLACEHOLDER) -> str:
    """The part of a masked text from the start of the sentence that first names the subject.

    What a query asks about its subject is in that sentence; context written before it ("The
    game received good reviews. X is owned by") says nothing about the relation and only blurs
    the check. A text without the placeholder comes back whole."""
    first = re.search(rf"(?<![0-9A-Za-z]){re.escape(placeholder)}(?![0-9A-Za-z])", masked)
    if first is None:
        return masked
    start = 0
    for m in _SENTENCE_END.finditer(masked, 0, first.start()):
        start = m.end()
    return masked[start:]


def from_subject_sentence(text: str, subject: str | None) -> str:
    """``text`` from the start of the sentence that first names ``subject`` (unmasked): what a
    query says before that sentence ("The game received good reviews. Sega is owned by") is
    context, not the question. A text that does not name the subject comes back whole."""
    masked = mask_subject(text, subject)
    if masked == text:
        return text
    cut = subject_sentence(masked)
    # Masking changes nothing before the first mention, so the cut's offset holds in ``text``.
    return text[len(masked) - len(cut):]


def edit_relation_texts(texts: list[str], subject: str, target: str | None = None) -> list[str]:
    """The edit side of the relation check: each text with the subject masked (from the sentence
    that names it), the target appended when known ("Toko Yasuda, the" + "piano" -> "X, the piano")."""
    out = []
    for t in texts:
        m = subject_sentence(mask_subject(t, subject)).strip()
        if target and target.strip():
            m = f"{m} {target.strip()}"
        if m not in out:
            out.append(m)
    return out


def query_relation_text(query: str, subject: str) -> str:
    """The query side: the query with the candidate edit's subject masked, from the sentence
    that names it."""
    return subject_sentence(mask_subject(query, subject)).strip()


def pair_features(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[u, v, u*v, |u-v|] for edit rows ``u`` [m, d] and query rows ``v`` ([d] or [m, d])."""
    u = np.asarray(u, dtype=np.float32)
    v = np.broadcast_to(np.asarray(v, dtype=np.float32), u.shape)
    return np.concatenate([u, v, u * v, np.abs(u - v)], axis=-1)


class ScopeHead:
    """A tiny MLP (or logistic regression when it has no hidden layer) over pair features.

    Weights: ``w1`` [4d, h], ``b1`` [h], ``w2`` [h], ``b2`` [1] (MLP) or ``w2`` [4d], ``b2`` [1]."""

    def __init__(self, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
        self.w1 = tensors.get("w1")
        self.b1 = tensors.get("b1")
        self.w2 = np.asarray(tensors["w2"], dtype=np.float32).reshape(-1)
        self.b2 = float(np.asarray(tensors["b2"]).reshape(-1)[0])
        if self.w1 is not None:
            self.w1 = np.asarray(self.w1, dtype=np.float32)
            self.b1 = np.asarray(self.b1, dtype=np.float32)
        self.metadata = dict(metadata or {})
        self.encoder = self.metadata.get("encoder", "minilm")
        self.dim = int(self.metadata.get("dim", (self.w1.shape[0] if self.w1 is not None else self.w2.shape[0]) // 4))
        self.use_target = self.metadata.get("use_target", "1") == "1"
        self.threshold = float(self.metadata.get("threshold", 0.5))

    def logits(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        x = pair_features(u, v)
        if self.w1 is not None:
            x = np.maximum(x @ self.w1 + self.b1, 0.0)
        return x @ self.w2 + self.b2

    def scores(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """P(same relation) per row of ``u`` against query ``v``."""
        return 1.0 / (1.0 + np.exp(-self.logits(u, v)))

    @classmethod
    def load(cls, path: Path | str = HEAD_PATH) -> "ScopeHead":
        from safetensors import safe_open

        tensors = {}
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return cls(tensors, meta)

    def save(self, path: Path | str) -> None:
        from safetensors.numpy import save_file

        tensors = {"w2": self.w2.astype(np.float32), "b2": np.array([self.b2], dtype=np.float32)}
        if self.w1 is not None:
            tensors.update(w1=self.w1.astype(np.float32), b1=self.b1.astype(np.float32))
        save_file(tensors, str(path), metadata={k: str(v) for k, v in self.metadata.items()})


_lock = threading.Lock()


@lru_cache(maxsize=4)
def _candidate_vectors(candidates: tuple[str, ...]) -> np.ndarray:
    from app.selector.encoders import MiniLMEncoder

    return MiniLMEncoder().encode(list(candidates))


def same_relation_scores(texts: list[str], subject: str, target: str | None,
                         candidates: tuple[str, ...]) -> tuple[np.ndarray, float] | None:
    """The relation check's score of each masked candidate text ("X was born in") as a query of
    the edit made of ``texts`` about ``subject`` (its best relation key per candidate), and the
    head's threshold; None when no head is installed or the encoder is missing. The candidates'
    embeddings are computed once."""
    from app.selector.encoders import MiniLMEncoder

    head = default_head(MiniLMEncoder.name, MiniLMEncoder.dim)
    if head is None or not candidates or not subject.strip():
        return None
    try:
        keys = MiniLMEncoder().encode(edit_relation_texts(texts, subject, target if head.use_target else None))
        cand = _candidate_vectors(candidates)
    except RuntimeError:  # the encoder's package is not installed
        return None
    best = np.full(len(candidates), -np.inf, dtype=np.float32)
    for u in keys:
        best = np.maximum(best, head.scores(np.broadcast_to(u, cand.shape), cand))
    return best, float(head.threshold)


def same_relation_ranked(texts: list[str], subject: str, target: str | None,
                         candidates: tuple[str, ...]) -> list[int]:
    """The candidates the relation check accepts (``same_relation_scores`` at least the head's
    threshold), as indices, best first; none without a head or its encoder."""
    scored = same_relation_scores(texts, subject, target, candidates)
    if scored is None:
        return []
    best, threshold = scored
    return [int(i) for i in np.argsort(-best, kind="stable") if best[i] >= threshold]


@lru_cache(maxsize=1)
def _default_head() -> ScopeHead | None:
    return ScopeHead.load(HEAD_PATH) if HEAD_PATH.is_file() else None


def default_head(encoder_name: str, dim: int) -> ScopeHead | None:
    """The shipped head when it was trained for this encoder, else None (no relation check)."""
    with _lock:
        head = _default_head()
    if head is None or head.encoder != encoder_name or head.dim != dim:
        return None
    return head
