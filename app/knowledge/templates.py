"""Relation templates shipped with the package: LAMA true templates, their false-relation
negatives (for CKA) and ParaRel paraphrases (for calibration), plus a deterministic split of
each relation's paraphrases into train / validation / test.

A template holds ``[X]`` (subject) and ``[Y]`` (object). The data files are MIT-licensed copies
(see ``app/data/README.md``); LAMA writes a space before the final full stop (``[Y] .``), which
is removed on load because a causal LM never saw that spacing in ordinary text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

SUBJECT = "[X]"
OBJECT = "[Y]"


class KnowledgeError(ValueError):
    """Bad input to detection or calibration; ``code`` is stable for API clients."""

    code = "invalid_fact"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


@dataclass(frozen=True)
class RelationTemplates:
    """Everything known about one relation's surface forms."""

    relation: str
    label: str
    template: str  # the LAMA template: numerator of CKA
    negatives: tuple[str, ...]  # false-relation templates: denominator of CKA
    paraphrases: tuple[str, ...]  # ParaRel patterns of the same relation (may include ``template``)

    def true_templates(self) -> tuple[str, ...]:
        """The LAMA template followed by the distinct paraphrases, in file order."""
        return _dedup((self.template, *self.paraphrases))


@dataclass(frozen=True)
class TemplateSplit:
    """Disjoint template sets of one relation: train for fitting, val for early stopping, test for reporting."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def normalize_template(template: str) -> str:
    """Collapse whitespace and drop the space LAMA writes before final punctuation."""
    text = re.sub(r"\s+", " ", template).strip()
    return re.sub(r"\s+([.,;:!?])", r"\1", text)


def validate_template(template: str, *, what: str = "template") -> str:
    """Return the normalised template or raise ``KnowledgeError`` if it lacks a slot."""
    if not isinstance(template, str) or not template.strip():
        raise KnowledgeError(f"{what} is empty", "invalid_template")
    for slot in (SUBJECT, OBJECT):
        count = template.count(slot)
        if count != 1:
            raise KnowledgeError(
                f"{what} {template!r} must contain {slot} exactly once (found {count})", "invalid_template"
            )
    return normalize_template(template)


def subject_first(template: str) -> bool:
    """True when the object follows the subject, so the object is predictable from the text before it."""
    return template.index(SUBJECT) < template.index(OBJECT)


def _read_jsonl(name: str) -> list[dict]:
    text = resources.files("app.data").joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _dedup(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


@lru_cache(maxsize=1)
def load_relations() -> dict[str, RelationTemplates]:
    """All relations with built-in templates, keyed by LAMA id (``P36``...)."""
    paraphrases: dict[str, list[str]] = {}
    for row in _read_jsonl("pararel_patterns.jsonl"):
        paraphrases.setdefault(row["relation"], []).append(normalize_template(row["pattern"]))
    relations = {}
    for row in _read_jsonl("lama_relations.jsonl"):
        rid = row["relation"]
        relations[rid] = RelationTemplates(
            relation=rid,
            label=row.get("label", rid),
            template=normalize_template(row["template"]),
            negatives=_dedup(normalize_template(t) for t in row.get("wrong", [])),
            paraphrases=_dedup(paraphrases.get(rid, [])),
        )
    return relations


def find_relation(relation: str | None, relations: dict[str, RelationTemplates] | None = None) -> RelationTemplates | None:
    """The relation with this id, ignoring case and surrounding spaces (``p176`` is ``P176``)."""
    relations = load_relations() if relations is None else relations
    if not isinstance(relation, str) or not relation.strip():
        return None
    key = relation.strip()
    if key in relations:
        return relations[key]
    folded = {k.casefold(): v for k, v in relations.items()}
    return folded.get(key.casefold())


def get_relation(relation: str, relations: dict[str, RelationTemplates] | None = None) -> RelationTemplates:
    relations = load_relations() if relations is None else relations
    rel = find_relation(relation, relations)
    if rel is None:
        raise KnowledgeError(
            f"unknown relation {relation!r}; known: {', '.join(sorted(relations))}", "unknown_relation"
        )
    return rel


def _stable_key(relation: str, template: str) -> str:
    return hashlib.sha1(f"{relation}\x00{template}".encode()).hexdigest()


def split_templates(
    rel: RelationTemplates, *, test_fraction: float = 0.25, val_fraction: float = 0.125, min_templates: int = 3
) -> TemplateSplit | None:
    """Split the relation's subject-first true templates into disjoint train / val / test sets.

    Only templates where ``[X]`` precedes ``[Y]`` are used: they let the object be scored and
    generated as the continuation of a prefix that names the subject. The order is a hash of
    (relation, template), so the split is the same on every run and does not depend on file
    order. Returns ``None`` when fewer than ``min_templates`` such templates exist (no unseen
    template would be left for testing).
    """
    pool = [t for t in rel.true_templates() if subject_first(t)]
    if len(pool) < max(3, min_templates):
        return None
    pool.sort(key=lambda t: _stable_key(rel.relation, t))
    n = len(pool)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    n_val = min(n_val, n - n_test - 1)
    test, val, train = pool[:n_test], pool[n_test : n_test + n_val], pool[n_test + n_val :]
    return TemplateSplit(train=tuple(train), val=tuple(val), test=tuple(test))
