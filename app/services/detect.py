"""Detect facts the model holds wrongly: each fact's contrastive assessment (and every other
score), per-fact errors, and the sentence form (a blank and candidate fillers, ranked)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from app.errors import Unprocessable
from app.knowledge import Fact, KnowledgeError
from app.knowledge.sentences import sentence_facts
from app.knowledge.statement import DEFAULT_SCORE, MAX_FACTS, Assessment, assess_statements
from app.lm.engine import LM


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


def _as_dict(r: Assessment | KnowledgeError) -> dict[str, Any]:
    if isinstance(r, KnowledgeError):
        return {"error": {"code": r.code, "message": r.message}}
    return _finite(r.to_dict())


class DetectService:
    def __init__(self, lm: LM):
        self.lm = lm

    def _assess(self, facts: Sequence[Fact], score: str, threshold: float | None) -> list[Assessment | KnowledgeError]:
        try:
            return assess_statements(self.lm, facts, score=score, threshold=threshold, max_facts=MAX_FACTS)
        except KnowledgeError as exc:
            raise Unprocessable(exc.message, code=exc.code) from None

    def detect(self, facts: list[Fact], threshold: float | None = None, score: str = DEFAULT_SCORE) -> dict[str, Any]:
        """``{"results": [...]}``; a fact that fails its checks gets ``error`` in its place. When
        no fact passes, the request is refused (422) with every fact's error in ``details``."""
        results = self._assess(facts, score, threshold)
        errors = [(i, r) for i, r in enumerate(results) if isinstance(r, KnowledgeError)]
        if len(errors) == len(results):
            codes = {r.code for _, r in errors}
            code = codes.pop() if len(codes) == 1 else "invalid_facts"
            message = "; ".join(f"fact {i}: {r.message}" for i, r in errors[:10])
            if len(errors) > 10:
                message += f"; and {len(errors) - 10} more"
            raise Unprocessable(message, code=code,
                                details=[{"index": i, "code": r.code, "message": r.message} for i, r in errors])
        return {"results": [_as_dict(r) for r in results]}

    def rank(self, sentence: str, candidates: list[str], relation: str | None = None,
             threshold: float | None = None, score: str = DEFAULT_SCORE) -> dict[str, Any]:
        """The candidates of a sentence with a blank, assessed and ranked best first."""
        try:
            match, facts = sentence_facts(sentence, candidates, relation)
        except KnowledgeError as exc:
            raise Unprocessable(exc.message, code=exc.code) from None
        out = self.detect(facts, threshold, score)
        values = [r.get("score") for r in out["results"]]
        order = sorted(range(len(values)), key=lambda i: (values[i] is None, -(values[i] or 0.0), i))
        out["ranking"] = order
        out["match"] = {"relation": match.relation, "template": match.template, "blank": match.blank}
        return out
