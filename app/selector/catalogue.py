"""A catalogue of known relations, for the selector's relation contrast.

The relation check (``app/selector/scope.py``) scores a query against one edit's texts: "does
this ask the edited relation?". Near misses score high there ("X works as" against an edit of
"X works for"). The catalogue lets the selector also ask the opposite: "does the query read
more like another *known* relation than like the edit's?". Its entries are ParaRel templates
(``app/data/pararel_patterns.jsonl``, the prompts ending before ``[Y]``) and question forms
written here (:data:`RELATION_QUESTIONS`), each with its relation's synonym group, the subject
masked as ``X`` as the relation check masks it. The harness (``app/eval/pararel.py``) names the
relations of its test cases with the same tables.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from app.selector.scope import PLACEHOLDER

PATTERNS_FILE = Path(__file__).resolve().parents[1] / "data" / "pararel_patterns.jsonl"
_WORD = re.compile(r"[a-z0-9]+")

# Relations that share templates, or mean the same thing to a user, count as one relation: a
# question of one of them is not a question about "another relation" of a subject whose other
# member was edited (the scope head is trained with the same groups, scripts/train_scope.py).
SYNONYM_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"P176", "P178"}),  # manufacturer / developer
    frozenset({"P131", "P17", "P276", "P30"}),  # located in (admin. unit / country / location / continent)
    frozenset({"P364", "P407"}),  # original language / language of work
    frozenset({"P495", "P740"}),  # country of origin / formation location
    frozenset({"P1303", "P136"}),  # "[X] plays": instrument / genre
    frozenset({"P103", "P1412"}),  # native language / languages spoken
)

# Question forms per relation (written here; the scope head trains on them too): they name the relation
# of a question-style edit prompt (zsRE's "What is [X]'s birthplace?") that no ParaRel template matches.
RELATION_QUESTIONS: dict[str, list[str]] = {
    "P101": ["What field does [X] work in?", "What is [X]'s field of work?", "What area does [X] specialize in?"],
    "P103": ["What is the native language of [X]?", "What is [X]'s mother tongue?"],
    "P106": ["What is [X]'s profession?", "What does [X] do for a living?", "What is the occupation of [X]?"],
    "P108": ["Who does [X] work for?", "Who is [X]'s employer?"],
    "P127": ["Who owns [X]?", "Who is the owner of [X]?"],
    "P1303": ["What instrument does [X] play?", "Which instrument is [X] known for playing?"],
    "P131": ["Where is [X] located?", "In which region is [X]?"],
    "P17": ["In which country is [X]?", "Which country is [X] in?"],
    "P30": ["Which continent is [X] on?", "On what continent is [X]?"],
    "P136": ["What genre of music does [X] play?", "What is [X]'s musical genre?"],
    "P1376": ["What is [X] the capital of?", "Which country has [X] as its capital?"],
    "P138": ["Who is [X] named after?", "What is [X] named for?"],
    "P140": ["What religion does [X] follow?", "What is the religion of [X]?"],
    "P1412": ["What language does [X] speak?", "Which languages does [X] communicate in?"],
    "P159": ["Where is [X] headquartered?", "Where are the headquarters of [X]?"],
    "P176": ["Who makes [X]?", "Which company produces [X]?", "Who manufactures [X]?"],
    "P178": ["Who developed [X]?", "Which company created [X]?"],
    "P19": ["Where was [X] born?", "What is [X]'s birthplace?", "What is the place of birth of [X]?"],
    "P190": ["What is the twin city of [X]?", "Which city is twinned with [X]?"],
    "P20": ["Where did [X] die?", "What is the place of death of [X]?"],
    "P264": ["What record label is [X] signed to?", "Which label represents [X]?"],
    "P27": ["What is [X]'s citizenship?", "Which country is [X] a citizen of?", "What is the nationality of [X]?"],
    "P279": ["What is [X] a subclass of?", "What kind of thing is [X]?"],
    "P36": ["What is the capital of [X]?", "Which city is the capital of [X]?"],
    "P361": ["What is [X] part of?", "What larger whole is [X] a part of?"],
    "P364": ["What is the original language of [X]?", "What language was [X] made in?"],
    "P407": ["What language is [X] written in?"],
    "P37": ["What is the official language of [X]?", "What language is spoken in [X]?"],
    "P39": ["What position does [X] hold?", "What office does [X] hold?"],
    "P413": ["What position does [X] play?", "Which position does [X] play in?"],
    "P449": ["Which network aired [X]?", "Where was [X] originally broadcast?"],
    "P463": ["What organization is [X] a member of?", "Which group does [X] belong to?"],
    "P47": ["Which countries border [X]?", "What does [X] share a border with?"],
    "P495": ["What is the country of origin of [X]?", "Where does [X] come from?"],
    "P740": ["Where was [X] founded?", "Where was [X] formed?"],
    "P530": ["Which countries does [X] have diplomatic relations with?"],
    "P937": ["Where did [X] work?", "Where does [X] work?"],
    "P1001": ["Where is [X] a legal term?"],
}


def group_of(relation: str) -> str:
    """The relation's synonym group ("P131+P17+P276+P30"), or the relation itself."""
    for group in SYNONYM_GROUPS:
        if relation in group:
            return "+".join(sorted(group))
    return relation


def cut_template(pattern: str) -> str | None:
    """The pattern up to a final ``[Y]`` (trailing punctuation aside); None when [Y] is not last."""
    p = pattern.strip().rstrip(" .")
    if not p.endswith("[Y]") or "[X]" not in p:
        return None
    return p[: -len("[Y]")].rstrip()


def readable(prompts: Sequence[str]) -> list[str]:
    """Prompts that read as a sentence start ("[X] was born in"), not "[X] owner" or "[X], which"."""
    good = [p for p in prompts if p.startswith("[X] ") and len(_WORD.findall(p[3:].lower())) >= 2]
    return good or list(prompts)


@lru_cache(maxsize=1)
def template_prompts() -> dict[str, tuple[str, ...]]:
    """ParaRel's prompts per relation: the patterns ending in ``[Y]``, cut before it."""
    out: dict[str, list[str]] = {}
    for line in PATTERNS_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            cut = cut_template(r["pattern"])
            if cut and cut not in out.setdefault(r["relation"], []):
                out[r["relation"]].append(cut)
    return {k: tuple(v) for k, v in out.items()}


@dataclass
class RelationCatalogue:
    """Masked relation texts ("X was born in") with their synonym group, embedded on first use."""

    texts: list[str]
    groups: list[str]
    _vectors: np.ndarray | None = field(default=None, repr=False)
    _encoder: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.groups):
            raise ValueError("texts and groups differ in length")
        names = sorted(set(self.groups))
        self.group_names = names
        self.group_index = np.array([names.index(g) for g in self.groups], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def vectors(self, encoder) -> np.ndarray:
        """[n, d] unit rows of the texts under ``encoder`` (computed once per encoder name)."""
        with self._lock:
            if self._vectors is None or self._encoder != encoder.name:
                self._vectors = np.asarray(encoder.encode(list(self.texts)), dtype=np.float32)
                self._encoder = encoder.name
            return self._vectors

    @classmethod
    def from_relations(cls, prompts: dict[str, Sequence[str]]) -> "RelationCatalogue":
        """Entries from {relation id: prompts with ``[X]``}, one per distinct masked text (a text
        that several groups share, "[X] is located in", is ambiguous and left out)."""
        seen: dict[str, set[str]] = {}
        for rid, ps in prompts.items():
            for p in ps:
                text = p.replace("[X]", PLACEHOLDER).strip()
                seen.setdefault(text, set()).add(group_of(rid))
        items = sorted((t, next(iter(g))) for t, g in seen.items() if len(g) == 1)
        return cls([t for t, _ in items], [g for _, g in items])


def default_prompts() -> dict[str, list[str]]:
    """The readable ParaRel prompts of every relation and the question forms."""
    out: dict[str, list[str]] = {rid: readable(ps) for rid, ps in template_prompts().items()}
    for rid, qs in RELATION_QUESTIONS.items():
        out.setdefault(rid, []).extend(qs)
    return out


@lru_cache(maxsize=1)
def default_catalogue() -> RelationCatalogue:
    return RelationCatalogue.from_relations(default_prompts())
