"""Facts written as a sentence with a blank and candidate fillers ("_ is developed by IBM").

A sentence is matched against the true templates (LAMA and ParaRel) of the given relation, or of
every relation when none is given; the match tells which slot the blank fills and what the other
filler is, so each candidate becomes a fact of that relation. Also here: a development set of
such sentences built from T-REx facts (one true and three false fillers of the same relation).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

from app.knowledge.facts import Fact
from app.knowledge.templates import (
    OBJECT,
    SUBJECT,
    KnowledgeError,
    RelationTemplates,
    get_relation,
    load_relations,
    normalize_template,
)

BLANK_RE = re.compile(r"(?<!\w)_+(?!\w)")
MAX_CANDIDATES = 20
MAX_SENTENCE_CHARS = 500


@dataclass(frozen=True)
class SentenceMatch:
    relation: str
    template: str
    blank: Literal["subject", "object"]
    other: str  # the filler of the other slot, as written


def _template_regex(template: str) -> re.Pattern:
    t = normalize_template(template).rstrip(".,;: ")
    parts = re.split(r"(\[X\]|\[Y\])", t)
    rx = ""
    for p in parts:
        if p == SUBJECT:
            rx += "(?P<x>.+?)"
        elif p == OBJECT:
            rx += "(?P<y>.+?)"
        else:
            rx += re.escape(p)
    return re.compile(rf"^{rx}[.,;: ]*$", re.IGNORECASE)


@lru_cache(maxsize=4096)
def _compiled(template: str) -> re.Pattern:
    return _template_regex(template)


def match_sentence(sentence: str, relation: str | None = None,
                   relations: dict[str, RelationTemplates] | None = None) -> SentenceMatch | None:
    """The first (relation, template) whose text matches the sentence with the blank in one slot."""
    relations = load_relations() if relations is None else relations
    text = normalize_template(sentence)
    pool = [get_relation(relation, relations)] if relation else [relations[k] for k in sorted(relations)]
    for rel in pool:
        for t in rel.true_templates():
            m = _compiled(t).match(text)
            if not m:
                continue
            x, y = m.group("x").strip(), m.group("y").strip()
            if BLANK_RE.fullmatch(x) and not BLANK_RE.search(y):
                return SentenceMatch(rel.relation, t, "subject", y)
            if BLANK_RE.fullmatch(y) and not BLANK_RE.search(x):
                return SentenceMatch(rel.relation, t, "object", x)
    return None


def sentence_facts(sentence: str, candidates: Sequence[str], relation: str | None = None,
                   relations: dict[str, RelationTemplates] | None = None) -> tuple[SentenceMatch, list[Fact]]:
    """The facts a sentence with a blank and its candidates stand for, or ``KnowledgeError``."""
    if not isinstance(sentence, str) or not sentence.strip():
        raise KnowledgeError("sentence is empty", "invalid_sentence")
    if len(sentence) > MAX_SENTENCE_CHARS:
        raise KnowledgeError(f"sentence is longer than {MAX_SENTENCE_CHARS} characters", "invalid_sentence")
    blanks = BLANK_RE.findall(sentence)
    if len(blanks) != 1:
        raise KnowledgeError(f"sentence must contain exactly one blank '_' (found {len(blanks)})", "invalid_sentence")
    cands = [c.strip() for c in candidates]
    if len(cands) < 2 or len(cands) > MAX_CANDIDATES:
        raise KnowledgeError(f"give 2 to {MAX_CANDIDATES} candidates (got {len(cands)})", "invalid_candidates")
    if any(not c for c in cands):
        raise KnowledgeError("a candidate is empty", "invalid_candidates")
    if len(set(c.lower() for c in cands)) != len(cands):
        raise KnowledgeError("candidates must be distinct", "invalid_candidates")
    m = match_sentence(sentence, relation, relations)
    if m is None:
        where = f"relation {get_relation(relation, relations).relation}" if relation else "any relation"
        raise KnowledgeError(
            f"the sentence matches no template of {where}; write it in the words of one of the relation's "
            "LAMA or ParaRel templates, or send facts with an explicit template and negatives",
            "sentence_not_matched")
    if m.blank == "subject":
        facts = [Fact(subject=c, object=m.other, relation=m.relation) for c in cands]
    else:
        facts = [Fact(subject=m.other, object=c, relation=m.relation) for c in cands]
    return m, facts


# -- development set -------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateSentence:
    sentence: str
    relation: str
    blank: Literal["subject", "object"]
    candidates: tuple[str, ...]
    answer: int  # index of the true filler
    split: Literal["tune", "heldout"]


def fact_split(f: Fact, heldout_fraction: float = 0.5) -> Literal["tune", "heldout"]:
    """A fixed split by (relation, subject): the same on every run, whatever the sample."""
    h = int(hashlib.sha1(f"{f.relation}\x00{f.subject}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < heldout_fraction else "tune"


def build_sentences(facts: Sequence[Fact], *, n: int, subject_fraction: float = 2 / 3, n_false: int = 3,
                    seed: int = 0, relations: dict[str, RelationTemplates] | None = None) -> list[CandidateSentence]:
    """``n`` sentences from true facts: a ParaRel template of the relation with the blank in the
    subject slot (a ``subject_fraction`` of them) or the object slot, the fact's filler and
    ``n_false`` fillers of the same slot from other facts of the relation that are not known true."""
    relations = load_relations() if relations is None else relations
    usable = [f for f in facts if f.relation in relations and f.subject.strip() and f.object.strip()]
    known = {(f.subject, f.relation, f.object) for f in usable}
    subjects: dict[str, list[str]] = {}
    objects: dict[str, list[str]] = {}
    for f in usable:
        subjects.setdefault(f.relation, []).append(f.subject)
        objects.setdefault(f.relation, []).append(f.object)
    subjects = {k: list(dict.fromkeys(v)) for k, v in subjects.items()}
    objects = {k: list(dict.fromkeys(v)) for k, v in objects.items()}
    rng = random.Random(seed)
    order = list(usable)
    rng.shuffle(order)
    out: list[CandidateSentence] = []
    for f in order:
        if len(out) >= n:
            break
        blank = "subject" if rng.random() < subject_fraction else "object"
        pool = subjects[f.relation] if blank == "subject" else objects[f.relation]
        own = f.subject if blank == "subject" else f.object
        fillers = [c for c in pool if c != own and (
            (c, f.relation, f.object) not in known if blank == "subject" else (f.subject, f.relation, c) not in known)]
        if len(fillers) < n_false:
            continue
        wrong = rng.sample(fillers, n_false)
        cands = [own, *wrong]
        rng.shuffle(cands)
        template = rng.choice(relations[f.relation].true_templates())
        text = template.replace(SUBJECT, "_" if blank == "subject" else f.subject)
        text = text.replace(OBJECT, "_" if blank == "object" else f.object)
        out.append(CandidateSentence(normalize_template(text), f.relation, blank, tuple(cands), cands.index(own),
                                     fact_split(f)))
    return out
