"""Subject-locality queries: other relations' questions about an edited subject, from ParaRel.

A fact edit should change one relation of its subject and nothing else about it. The locality
prompt of the datasets names another subject, so a method that answers every question about the
edited subject with the target passes it. These queries ask the edited subject about *other*
relations that fit its type ("[X] was born in" for a person whose native language was edited).

How a case's queries are chosen (deterministic: seeded by the run's seed and the case id):

1. The case's relation. A ``relation`` given by the record wins (CounterFact's ``relation_id``).
   Otherwise the prompt with the subject masked as ``[X]`` is compared with every ParaRel
   template cut before its final ``[Y]``, then with the question forms of
   :data:`RELATION_QUESTIONS`: an exact match (case and punctuation aside) names the relation;
   else the relation whose templates, question forms and LAMA label share most content words
   with the masked prompt (this is how zsRE questions, which are not ParaRel sentences, get one);
   with no shared content word at all the relation stays unknown.
   A case whose relation stays unknown gets no query (there is no "other" relation to ask).
2. The subject's type from :data:`RELATION_TYPE` (person, place, organisation, work, product,
   concept).
3. ``k`` other relations of that type, excluding the case's relation, every relation edited for
   this subject in the run, and their synonyms (:data:`SYNONYM_GROUPS`: manufacturer and
   developer, the located-in relations, ...; the issue's "synonyms count as the same relation"),
   each with one of its templates that ends in ``[Y]``; the query is the template up to ``[Y]``
   with the subject in place of ``[X]`` ("Danielle Darrieux was born in").

:func:`locality_conflicts` finds the dataset's locality prompts that ask a fact another edit of
the run changes on purpose (CounterFact's "The twin city of Sofia is" beside an edit of that very
prompt): they are not locality tests, and the harness leaves them out of locality.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

PATTERNS_FILE = Path(__file__).resolve().parents[1] / "data" / "pararel_patterns.jsonl"
LAMA_FILE = Path(__file__).resolve().parents[1] / "data" / "lama_relations.jsonl"

# Primary subject type of each ParaRel relation (Wikidata domain of the property).
RELATION_TYPE: dict[str, str] = {
    # a person
    "P101": "person", "P103": "person", "P106": "person", "P108": "person", "P1303": "person",
    "P136": "person", "P140": "person", "P1412": "person", "P19": "person", "P20": "person",
    "P27": "person", "P39": "person", "P413": "person", "P937": "person", "P264": "person",
    "P463": "person",
    # a place (city, country, region)
    "P131": "place", "P17": "place", "P30": "place", "P36": "place", "P1376": "place", "P190": "place",
    "P47": "place", "P530": "place", "P37": "place", "P276": "place",
    # an organisation (company, club, band)
    "P159": "organisation", "P740": "organisation", "P127": "organisation",
    # a creative work (film, TV show, book)
    "P449": "work", "P364": "work", "P407": "work", "P495": "work",
    # a product (software, device, car)
    "P176": "product", "P178": "product",
    # an abstract concept or term
    "P279": "concept", "P361": "concept", "P1001": "concept", "P138": "concept",
}
# Relations shared by a type beyond its primary ones (e.g. organisations have members and owners).
EXTRA_TYPE_RELATIONS: dict[str, tuple[str, ...]] = {
    "organisation": ("P17", "P138", "P463", "P361"),
    "work": ("P136", "P138"),
    "product": ("P127", "P495", "P138"),
    "place": ("P138", "P361"),
    "concept": ("P495",),
}
DEFAULT_RELATIONS: tuple[str, ...] = ("P276", "P17", "P361", "P138")
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

_STOP = {"the", "a", "an", "of", "is", "was", "in", "to", "and", "by", "for", "on", "at", "as", "with", "which",
         "who", "what", "that", "x", "y", "did", "does", "do", "it", "its", "has", "have", "had", "be", "been",
         "are", "were", "from", "this", "name", "where", "when", "whom", "whose", "how"}
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Relation:
    id: str
    label: str
    patterns: tuple[str, ...]  # every ParaRel pattern of the relation
    prompts: tuple[str, ...]  # patterns ending in [Y], cut before it: "[X] was born in"


def _cut(pattern: str) -> str | None:
    """The pattern up to a final ``[Y]`` (trailing punctuation aside); None when [Y] is not last."""
    p = pattern.strip().rstrip(" .")
    if not p.endswith("[Y]") or "[X]" not in p:
        return None
    return p[: -len("[Y]")].rstrip()


@lru_cache(maxsize=1)
def relations() -> dict[str, Relation]:
    patterns: dict[str, list[str]] = {}
    for line in PATTERNS_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            patterns.setdefault(r["relation"], []).append(r["pattern"])
    labels: dict[str, str] = {}
    if LAMA_FILE.exists():
        for line in LAMA_FILE.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                labels[r["relation"]] = r.get("label", "")
    out = {}
    for rid, pats in patterns.items():
        prompts = tuple(dict.fromkeys(c for c in (_cut(p) for p in pats) if c))
        out[rid] = Relation(rid, labels.get(rid, ""), tuple(pats), prompts)
    return out


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower().replace("[x]", " xsubj ")))


def _content(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and w != "xsubj"}


def mask_subject(prompt: str, subject: str | None) -> str:
    if subject and subject.strip():
        masked = re.sub(re.escape(subject.strip()), "[X]", prompt, flags=re.IGNORECASE)
        if masked != prompt:
            return masked
    return prompt


def _prefix(pattern: str) -> str | None:
    """The pattern before ``[Y]`` when ``[X]`` comes first: what a dataset prompt made from it reads."""
    i, j = pattern.find("[X]"), pattern.find("[Y]")
    return pattern[:j] if 0 <= i < j else None


def find_relations(prompt: str, subject: str | None) -> tuple[str, ...]:
    """The ParaRel relation(s) of an edit prompt.

    Exact match of the subject-masked prompt with a template cut before ``[Y]`` (several
    relations share short prefixes such as "[X] is a"; all of them are returned) or with a
    question form (:data:`RELATION_QUESTIONS`), else the one relation sharing most content words
    with the prompt (templates, question forms and label), accepted when it covers at least half
    of the prompt's content words and either names one in its label or shares two. Empty when
    nothing fits.
    """
    masked = mask_subject(prompt, subject)
    key = _norm(masked)
    rels = relations()
    exact = sorted({rid for rid, rel in rels.items() for p in rel.patterns
                    if (cut := _prefix(p)) is not None and _norm(cut) == key})
    exact = exact or sorted({rid for rid in rels for q in RELATION_QUESTIONS.get(rid, ()) if _norm(q) == key})
    if exact:
        return tuple(exact)
    words = _content(masked)
    if not words:
        return ()
    best, best_score = None, 0.0
    for rid in sorted(rels):
        rel = rels[rid]
        shared = words & _content(" ".join([*rel.patterns, *RELATION_QUESTIONS.get(rid, ())]) + " " + rel.label)
        in_label = words & _content(rel.label)
        if len(shared) / len(words) < 0.5 or not (in_label or len(shared) >= 2):
            continue
        score = len(shared) / len(words) + 0.5 * len(in_label)
        if score > best_score:
            best, best_score = rid, score
    return (best,) if best else ()


def find_relation(prompt: str, subject: str | None) -> str | None:
    found = find_relations(prompt, subject)
    return found[0] if len(found) == 1 else None


def subject_type(relations_: Sequence[str]) -> str | None:
    """The type most of the candidate relations' subjects have (first in order on a tie)."""
    kinds = [RELATION_TYPE[r] for r in relations_ if r in RELATION_TYPE]
    return max(kinds, key=kinds.count) if kinds else None


def group_of(relation: str) -> str:
    """The relation's synonym group ("P131+P17+P276+P30"), or the relation itself."""
    for group in SYNONYM_GROUPS:
        if relation in group:
            return "+".join(sorted(group))
    return relation


def same_relation(a: Iterable[str], b: Iterable[str]) -> bool:
    """Whether two sets of candidate relations share one (synonyms count as the same)."""
    return bool({group_of(r) for r in a} & {group_of(r) for r in b})


def candidate_relations(case_relations: Sequence[str]) -> tuple[str | None, list[str]]:
    """(subject type, relations of that type other than the case's own and their synonyms) that
    have a prompt."""
    rels = relations()
    kind = subject_type(case_relations)
    if kind is None:
        pool = list(DEFAULT_RELATIONS)
    else:
        pool = [r for r, t in RELATION_TYPE.items() if t == kind] + list(EXTRA_TYPE_RELATIONS.get(kind, ()))
    own = {group_of(r) for r in case_relations}
    seen: list[str] = []
    for r in pool:
        if group_of(r) not in own and r not in seen and r in rels and rels[r].prompts:
            seen.append(r)
    return kind, sorted(seen, key=lambda r: (int(r[1:]) if r[1:].isdigit() else 0, r))


def _readable(prompts: Sequence[str]) -> list[str]:
    """Prompts that read as a sentence start ("[X] was born in"), not "[X] owner" or "[X], which"."""
    good = [p for p in prompts if p.startswith("[X] ") and len(_WORD.findall(p[3:].lower())) >= 2]
    return good or list(prompts)


@dataclass(frozen=True)
class SubjectQuery:
    relation: str
    prompt: str


def subject_queries(case_id: str, subject: str | None, case_relations: Sequence[str] = (), *, k: int = 2,
                    seed: int = 0, exclude: Iterable[str] = ()) -> list[SubjectQuery]:
    """``k`` questions about ``subject`` of other relations fitting its type (seeded per case).

    None when the case's relation is unknown: a question is about "another relation" only when
    the edited one is known (asking "X is located in" of an edit "X, in" -> "Brazil" would test
    the edit's own fact)."""
    if not subject or not subject.strip() or k <= 0 or not case_relations:
        return []
    _, pool = candidate_relations(tuple(case_relations))
    skip = {group_of(r) for r in exclude}
    pool = [r for r in pool if group_of(r) not in skip]
    rng = random.Random(f"{seed}:{case_id}")
    rels = relations()
    out: list[SubjectQuery] = []
    for r in rng.sample(pool, len(pool)):
        prompt = rng.choice(_readable(rels[r].prompts)).replace("[X]", subject.strip())
        if all(q.prompt != prompt for q in out):  # "located in" is a template of several relations
            out.append(SubjectQuery(r, prompt))
        if len(out) == k:
            break
    return out


def plan_subject_queries(cases: Sequence, *, k: int = 2, seed: int = 0
                         ) -> tuple[list[list[SubjectQuery]], list[tuple[str, ...]]]:
    """Queries for every case (``EditCase``-like: case_id, prompt, subject, relation) and each case's relation(s).

    Relations edited for the same subject anywhere in the run are excluded, so a query never asks
    about a fact that another edit of the run changes on purpose.
    """
    rel_of = [((c.relation,) if getattr(c, "relation", None) else find_relations(c.prompt, c.subject)) for c in cases]
    edited: dict[str, set[str]] = {}
    for c, r in zip(cases, rel_of):
        if c.subject:
            edited.setdefault(c.subject.strip().lower(), set()).update(r)
    queries = [subject_queries(c.case_id, c.subject, r, k=k, seed=seed,
                               exclude=edited.get((c.subject or "").strip().lower(), ()))
               for c, r in zip(cases, rel_of)]
    return queries, rel_of


def locality_conflicts(cases: Sequence, relations_of: Sequence[tuple[str, ...]]) -> list[int | None]:
    """Per case, the index of another case of the run whose fact its locality prompt asks, or None.

    A locality prompt asks another edit's fact when it names that edit's subject (the selector's
    naming rule: whole words, case and accents aside) and either asks the same relation
    (:func:`same_relation` of :func:`find_relations` of both, synonyms included) or reads the
    same once the subject is masked. Such a prompt *should* reach that edit."""
    from app.selector.router import named_in, subject_index

    index, max_words = subject_index([c.subject for c in cases])
    out: list[int | None] = [None] * len(cases)
    for i, c in enumerate(cases):
        if not c.locality_prompt:
            continue
        for j in sorted(named_in(c.locality_prompt, index, max_words) - {i}):
            other = cases[j]
            asked = find_relations(c.locality_prompt, other.subject)
            same_text = _norm(mask_subject(c.locality_prompt, other.subject)) == _norm(
                mask_subject(other.prompt, other.subject))
            if same_text or (asked and relations_of[j] and same_relation(asked, relations_of[j])):
                out[i] = j
                break
    return out
