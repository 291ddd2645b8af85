"""Facts (subject, relation, object), how they are rendered into text, loaded from files and
corrupted into false facts of the same type.

A fact names either a built-in relation (LAMA id, templates from the package) or carries its
own template with ``[X]``/``[Y]`` and, for CKA, its own negative templates.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from app.knowledge.templates import (
    OBJECT,
    SUBJECT,
    KnowledgeError,
    RelationTemplates,
    get_relation,
    load_relations,
    normalize_template,
    validate_template,
)

MAX_FIELD_CHARS = 300


@dataclass(frozen=True)
class Fact:
    """One triple. ``template``/``negatives`` override the relation's built-in templates."""

    subject: str
    object: str
    relation: str | None = None
    template: str | None = None
    negatives: tuple[str, ...] = ()


@dataclass(frozen=True)
class FactTemplates:
    """The templates one fact is scored with, after validation."""

    template: str
    negatives: tuple[str, ...]
    paraphrases: tuple[str, ...] = field(default=())
    relation: RelationTemplates | None = None


# One set of field names for facts in files and in requests; each name also accepts its aliases
# (T-REx writes ``sub_label`` / ``obj_label``). ``uuid`` (T-REx) is accepted and ignored.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "subject": ("subject", "sub_label"),
    "object": ("object", "obj_label"),
    "relation": ("relation", "predicate_id"),
    "template": ("template",),
    "negatives": ("negatives", "negative_templates"),
}
IGNORED_FIELDS = ("uuid",)


def fact_from_dict(row: dict[str, Any]) -> Fact:
    """A fact from a record with the field names of ``FIELD_ALIASES`` (any alias of each)."""

    def pick(name: str):
        for alias in FIELD_ALIASES[name]:
            if row.get(alias) not in (None, "", [], ()):
                return row[alias]
        return None

    subject, obj = pick("subject"), pick("object")
    negatives = pick("negatives") or ()
    if isinstance(negatives, str):
        negatives = (negatives,)
    relation, template = pick("relation"), pick("template")
    return Fact(
        subject=subject if isinstance(subject, str) else "",
        object=obj if isinstance(obj, str) else "",
        relation=relation if isinstance(relation, str) else None,
        template=template if isinstance(template, str) else None,
        negatives=tuple(n for n in negatives if isinstance(n, str)),
    )


def resolve(fact: Fact, relations: dict[str, RelationTemplates] | None = None, *, need_negatives: bool = True) -> FactTemplates:
    """Validate one fact and return the templates it is scored with.

    Raises ``KnowledgeError`` with a stable code: ``empty_subject``, ``empty_object``,
    ``field_too_long``, ``unknown_relation`` (also beside an explicit template: a relation id
    given is checked), ``invalid_template``, ``missing_template``, ``missing_negatives`` (an
    explicit template needs its own negatives; the relation's are never substituted for a
    template they were not written for), ``negative_is_template`` (a negative template equal to
    the true one, after normalisation, or to another true template of the relation).
    Relation ids are matched without regard to case.
    """
    for name, value in (("subject", fact.subject), ("object", fact.object)):
        if not isinstance(value, str) or not value.strip():
            raise KnowledgeError(f"fact {name} is empty", f"empty_{name}")
        if len(value) > MAX_FIELD_CHARS:
            raise KnowledgeError(f"fact {name} is longer than {MAX_FIELD_CHARS} characters", "field_too_long")
    relations = load_relations() if relations is None else relations
    rel = get_relation(fact.relation, relations) if fact.relation else None
    if fact.template:
        template = validate_template(fact.template)
    elif rel is not None:
        template = rel.template
    else:
        raise KnowledgeError("a fact needs a known relation id or a template with [X] and [Y]", "missing_template")
    if fact.negatives:
        negatives = tuple(validate_template(t, what="negative template") for t in fact.negatives)
    elif not fact.template and rel is not None:
        negatives = rel.negatives
    else:
        negatives = ()
    if need_negatives and not negatives:
        raise KnowledgeError(
            "an explicit template needs its own negative templates (false relations): give `negatives`"
            + (f"; relation {rel.relation}'s negatives belong to its own template" if rel is not None else ""),
            "missing_negatives",
        )
    trues = {template.casefold()}
    if rel is not None and not fact.template:
        trues |= {t.casefold() for t in rel.true_templates()}
    for t in negatives:
        if t.casefold() in trues:
            raise KnowledgeError(f"negative template {t!r} is a true template of the fact", "negative_is_template")
    paraphrases = rel.paraphrases if rel is not None and not fact.template else ()
    return FactTemplates(template=template, negatives=negatives, paraphrases=paraphrases, relation=rel)


def render(template: str, subject: str, obj: str) -> str:
    """The full sentence."""
    return normalize_template(template.replace(SUBJECT, subject.strip()).replace(OBJECT, obj.strip()))


def prefix(template: str, subject: str) -> str:
    """The text before the object, subject filled in, without trailing space ('' if ``[Y]`` comes first)."""
    head = template.split(OBJECT, 1)[0]
    return head.replace(SUBJECT, subject.strip()).rstrip()


def suffix(template: str, subject: str) -> str:
    """The text after the object, subject filled in (may be '' or only punctuation)."""
    tail = template.split(OBJECT, 1)[1]
    return tail.replace(SUBJECT, subject.strip()).rstrip()


def load_facts(path: str | Path, *, relation: str | None = None, n: int | None = None, seed: int = 0) -> list[Fact]:
    """Read JSON lines (or a JSON array) of facts; keep ``relation`` only; sample ``n`` with ``seed``.

    The sample is a seeded random one, not the first ``n`` lines: T-REx files are sorted by
    relation, so the head of the file would be one or two relations only.
    """
    facts = [fact_from_dict(row) for row in _read_rows(Path(path))]
    if relation:
        facts = [f for f in facts if f.relation == relation]
    if n is not None and n < len(facts):
        facts = random.Random(seed).sample(facts, n)
    return facts


def _read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(stripped)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(r, dict) for r in rows):
        raise KnowledgeError(f"{path}: every record must be a JSON object", "invalid_file")
    return rows


def object_pool(facts: Iterable[Fact]) -> dict[str, list[str]]:
    """Distinct objects per relation, in first-seen order (the candidates for corruption)."""
    pool: dict[str, dict[str, None]] = {}
    for f in facts:
        pool.setdefault(f.relation or "", {})[f.object] = None
    return {k: list(v) for k, v in pool.items()}


def corrupt(facts: list[Fact], pool: dict[str, list[str]], *, seed: int = 0, known: Iterable[Fact] = ()) -> list[Fact]:
    """The same facts with the object replaced by another object of the same relation.

    The replacement is never the fact's own object nor any object ``known`` lists as true for
    that (subject, relation). Facts whose relation has no other candidate are dropped, so the
    result may be shorter; pair by position only with the facts returned by ``corrupt_pairs``.
    """
    return [bad for _, bad in corrupt_pairs(facts, pool, seed=seed, known=known)]


def corrupt_pairs(
    facts: list[Fact], pool: dict[str, list[str]], *, seed: int = 0, known: Iterable[Fact] = ()
) -> list[tuple[Fact, Fact]]:
    """(true fact, corrupted fact) pairs; see ``corrupt``."""
    rng = random.Random(seed)
    true_objects: dict[tuple[str, str | None], set[str]] = {}
    for f in [*facts, *known]:
        true_objects.setdefault((f.subject, f.relation), set()).add(f.object)
    pairs = []
    for f in facts:
        banned = true_objects[(f.subject, f.relation)]
        candidates = [o for o in pool.get(f.relation or "", []) if o not in banned]
        if not candidates:
            continue
        pairs.append((f, replace(f, object=rng.choice(candidates))))
    return pairs
