"""The answer path: route each query through the selector, then generate (or score) with the
routed edit's delta for that request only."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from app.lm.engine import LM, Mode
from app.services.deltas import DeltaCache


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


class AnswerService:
    def __init__(self, lm: LM, selector, deltas: DeltaCache):
        self.lm = lm
        self.selector = selector
        self.deltas = deltas

    def route(self, queries: Sequence[str]) -> list[Routed]:
        routes = self.selector.route_many(list(queries))
        return [Routed(r.edit_id, float(r.similarity)) if r is not None else Routed(None, None) for r in routes]

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
        routes, groups = self._groups(queries)
        texts: list[str] = [""] * len(queries)
        for edit_id, idx in groups.items():
            delta = self._serving(edit_id)
            # An edit's adapter writes its target; the base model writes the rest of the answer.
            target = (delta.meta.get("target") or "") if delta is not None else ""
            gens = self.lm.generate_edited(
                [queries[i] for i in idx], target, max_new_tokens=max_new_tokens, mode=mode,
                deltas=[delta] if delta is not None else None,
                do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed,
            )
            for i, g in zip(idx, gens):
                texts[i] = g.text.strip()
        ms = (time.perf_counter() - t0) * 1000
        return [Answer(t, r.edit_id, r.similarity, self.lm.name, ms) for t, r in zip(texts, routes)]

    def score(self, prompts: Sequence[str], targets: Sequence[str], *, mode: Mode | None = None) -> list[ScoreResult]:
        routes, groups = self._groups(prompts)
        out: list[ScoreResult | None] = [None] * len(prompts)
        for edit_id, idx in groups.items():
            delta = self._serving(edit_id)
            scores = self.lm.score(
                [prompts[i] for i in idx], [targets[i] for i in idx], mode=mode,
                deltas=[delta] if delta is not None else None,
            )
            for i, s in zip(idx, scores):
                out[i] = ScoreResult(s.logprob, s.accuracy, s.all_correct, routes[i].edit_id, routes[i].similarity)
        return out  # type: ignore[return-value]
