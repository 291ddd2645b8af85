"""The answer path: route each query through the selector, then generate (or score) with the
routed edit's delta for that request only."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from app.lm.engine import LM, AnswerEnd, Mode
from app.selector.scope import from_subject_sentence
from app.services.deltas import DeltaCache

log = logging.getLogger(__name__)


@dataclass
class Answer:
    answer: str
    edit_id: str | None
    similarity: float | None
    model: str
    latency_ms: float


@dataclass
class ScoreResult:
    logprob: float
    token_accuracy: float
    all_correct: bool
    edit_id: str | None
    similarity: float | None


@dataclass
class Routed:
    edit_id: str | None
    similarity: float | None
    subject: str | None = None  # the routed edit's subject


def head_text(query: str, route: Routed) -> str:
    """What the routed edit's adapter writes its target after: the query from the sentence that
    names the edit's subject (context before it is left to the base model's continuation)."""
    return from_subject_sentence(query, route.subject) if route.subject else query


class AnswerService:
    def __init__(self, lm: LM, selector, deltas: DeltaCache, engine=None, *, chat_end: AnswerEnd = "sentence"):
        self.lm = lm
        self.selector = selector
        self.deltas = deltas
        self.engine = engine  # an EngineService (FACTPATCH_ENGINE=vllm), or None: the local model generates
        self.chat_end = chat_end  # how an edited chat answer ends (LM.generate_edited's ``end``)

    def route(self, queries: Sequence[str]) -> list[Routed]:
        routes = self.selector.route_many(list(queries))
        return [Routed(r.edit_id, float(r.similarity), r.subject) if r is not None else Routed(None, None)
                for r in routes]

    def _groups(self, queries: Sequence[str]):
        """Indices grouped by the delta that serves them (None: the base model)."""
        routes = self.route(queries)
        groups: dict[str | None, list[int]] = defaultdict(list)
        for i, r in enumerate(routes):
            delta = self.deltas.get(r.edit_id) if r.edit_id else None
            if delta is None:
                routes[i] = Routed(None, None)
            groups[routes[i].edit_id].append(i)
        return routes, groups

    def _serving(self, edit_id: str | None):
        """The delta to apply for a query routed to ``edit_id``: none when it is a global edit that
        already applies to every query."""
        delta = self.deltas.get_cached(edit_id) if edit_id else None
        if delta is not None and delta.meta.get("routed") == "false" and f"edit:{edit_id}" in self.lm.global_keys():
            return None
        return delta

    def answer(
        self,
        queries: Sequence[str],
        *,
        max_new_tokens: int,
        mode: Mode | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Answer]:
        t0 = time.perf_counter()
        mode = mode or self.lm.default_mode()
        end: AnswerEnd = self.chat_end if mode == "chat" else "budget"
        routes, groups = self._groups(queries)
        texts: list[str] = [""] * len(queries)
        sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
        remote = self.engine is not None and not do_sample and self.engine.usable()[0]
        edited, row_deltas, targets = [], [], []
        for edit_id, idx in groups.items():
            delta = self._serving(edit_id)
            target = (delta.meta.get("target") or "").strip() if delta is not None else ""
            if remote:
                gens = self._remote([queries[i] for i in idx], target, edit_id if delta is not None else None,
                                    max_new_tokens, mode, end, [head_text(queries[i], routes[i]) for i in idx])
                if gens is not None:
                    for i, g in zip(idx, gens):
                        texts[i] = g.text.strip()
                    continue
            if delta is None or not target:  # the base model, or a delta with no target to write first
                gens = self.lm.generate([queries[i] for i in idx], max_new_tokens=max_new_tokens, mode=mode,
                                        deltas=[delta] if delta is not None else None, **sampling)
                for i, g in zip(idx, gens):
                    texts[i] = g.text.strip()
                continue
            edited += idx
            row_deltas += [delta] * len(idx)
            targets += [target] * len(idx)
        if edited:
            # One batch for the answers of every edit: each edit's adapter writes its own rows'
            # target, the base model the rest of every row.
            gens = self.lm.generate_edited_rows(
                [queries[i] for i in edited], targets, row_deltas, max_new_tokens=max_new_tokens, mode=mode,
                end=end, heads_from=[head_text(queries[i], routes[i]) for i in edited], **sampling)
            for i, g in zip(edited, gens):
                texts[i] = g.text.strip()
        ms = (time.perf_counter() - t0) * 1000
        return [Answer(t, r.edit_id, r.similarity, self.lm.name, ms) for t, r in zip(texts, routes)]

    def _remote(self, prompts, target, edit_id, max_new_tokens, mode, end=None, heads_from=None):
        """The engine's answers, or None when it cannot give them (the local model answers).
        ``end``: how the edited answer ends, as the local engine's ``generate_edited`` takes it."""
        from app.lm.engines import EngineUnavailable

        try:
            return self.engine.generate_edited(prompts, target, edit_id=edit_id, max_new_tokens=max_new_tokens,
                                               mode=mode, end=end, heads_from=heads_from)
        except (EngineUnavailable, ImportError) as exc:
            log.warning("the generation engine failed (%s); the local model answers", exc)
            self.engine.last_error = str(exc)[:300]
            return None

    def score(self, prompts: Sequence[str], targets: Sequence[str], *, mode: Mode | None = None,
              modes: Sequence[Mode] | None = None) -> list[ScoreResult]:
        """Teacher-forced scores through the served path: each prompt routed, then scored with the
        delta that serves it. ``modes``: one form per prompt, else ``mode`` for all."""
        routes, groups = self._groups(prompts)
        out: list[ScoreResult | None] = [None] * len(prompts)
        for edit_id, idx in groups.items():
            delta = self._serving(edit_id)
            # A routed edit writes its target after the sentence that names its subject (``answer``).
            scores = self.lm.score(
                [head_text(prompts[i], routes[i]) if delta is not None else prompts[i] for i in idx],
                [targets[i] for i in idx], mode=mode,
                modes=[modes[i] for i in idx] if modes is not None else None,
                deltas=[delta] if delta is not None else None,
            )
            for i, s in zip(idx, scores):
                out[i] = ScoreResult(s.logprob, s.accuracy, s.all_correct, routes[i].edit_id, routes[i].similarity)
        return out  # type: ignore[return-value]
