"""The selector: decide, per query, which active edit (if any) serves it.

Every edit owns a few *keys*: the embeddings of its prompt and paraphrases. A query is
embedded with the same encoder; an edit's score is its best key's cosine similarity. The
query is routed to the best-scoring edit that passes the rule, else to none (the base model).

The rule has three thresholds, because similarity alone cannot tell "BBC One, by" (edited)
from "BBC Radio, by" (unrelated, same relation, half the subject):

* ``threshold`` applies to an edit whose subject occurs in the query as whole words
  (case, accents and punctuation ignored; a plural or genitive ``s`` on the last word allowed);
* ``unnamed_threshold`` applies to an edit with a subject that the query does not name; above
  1 (the default) it is never met, so such an edit serves only queries that name its subject;
* ``subjectless_threshold`` applies to an edit created without a subject: similarity alone.

With ``unnamed_threshold == threshold`` the rule is similarity alone for every edit.

Relation scope: an edit with a subject and ``scope == "fact"`` (the default) serves a query that
names its subject only when the query also asks for the edited relation. The subject is masked
("X") in the edit's texts (its ``relation_vectors``, embedded by ``keys_for`` with the target
appended: "The X is Keir Starmer") and in the query ("Who is the X?"), and a small trained
classifier (``app/selector/scope.py``, ``app/data/scope_head.safetensors``) scores the pair;
below ``scope_threshold`` the edit is skipped. It costs one extra encode of the masked query,
made only when a named fact-scoped edit passes the similarity rule (one batch for every
distinct subject named). An edit with ``scope == "subject"`` serves every query naming its
subject (the rule above). A record without ``relation_vectors`` (stored before they existed)
gets them computed once from its texts and subject, without the target, in the same batch.
With an encoder the head was not trained for (its name or width differ) the check is off.

The keys live in one float32 matrix (the in-process "mirror" of the shared memory), replaced
copy-on-write under a lock, so a lookup reads a consistent snapshot without locking. A
lookup is one matrix-vector product over the candidate keys: the edits named by subject
(found with a word n-gram index, not a scan), the subjectless edits, and, when
``unnamed_threshold`` can be met, every edit. A scan of more than ``exact_limit`` keys is
narrowed first to the ``prefilter`` edits nearest by key centroid.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from app.selector.encoders import Encoder, MemoEncoder, build_encoder, l2_normalise
from app.selector.scope import ScopeHead, default_head, edit_relation_texts, query_relation_text

if TYPE_CHECKING:
    from app.lm.engine import LM

# Measured on CounterFact train and zsRE 500-999 (200 edits in memory; docs/pnp-notes.md):
# MiniLM beat the base model's pooled hidden states (raw or centred, any layer) under every rule;
# with the subject named, 0.35 keeps ~99% of rephrases and rejects ~99.5% of locality prompts;
# similarity alone peaks at 0.65, and 0.70 trades 5 points of rephrase for fewer false routes.
DEFAULT_ENCODER = "minilm"
DEFAULT_THRESHOLD = 0.35
DEFAULT_SUBJECTLESS_THRESHOLD = 0.70
DEFAULT_UNNAMED_THRESHOLD = 1.01
DEFAULT_EXACT_LIMIT = 8192
DEFAULT_PREFILTER = 64
# Relation check: P(same relation) the best relation key of a named, fact-scoped edit needs
# (docs/scope-notes.md: held-out CounterFact train routing, 200 edits per memory).
DEFAULT_SCOPE_THRESHOLD = 0.5

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise_words(text: str) -> str:
    """Lower-case words separated by single spaces; accents and punctuation dropped."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _NON_WORD.sub(" ", stripped.casefold()).strip()


def word_forms(phrase: str) -> list[str]:
    """A normalised phrase and its forms with the last word's plural or genitive ``s`` / ``es``
    dropped ("houston toads" -> "houston toad"), so an inflected mention still names the subject."""
    forms = [phrase]
    head, _, last = phrase.rpartition(" ")
    for suffix in ("es", "s"):
        if last.endswith(suffix) and len(last) - len(suffix) >= 3:
            forms.append(f"{head} {last[: -len(suffix)]}".strip())
    return forms


def subject_in(subject: str, query: str) -> bool:
    """Does ``subject`` occur in ``query`` as a run of whole words (normalised, the last word
    possibly inflected with ``s`` / ``es``)?"""
    s = normalise_words(subject)
    if not s:
        return False
    words = normalise_words(query).split()
    n = len(s.split())
    return any(s in word_forms(" ".join(words[i : i + n])) for i in range(len(words) - n + 1))


def subject_index(subjects: Sequence[str | None]) -> tuple[dict[str, tuple[int, ...]], int]:
    """(normalised subject -> positions of the items with it, the longest subject in words), for
    :func:`named_in`; items without a subject are left out."""
    index: dict[str, list[int]] = {}
    for i, subject in enumerate(subjects):
        if subject:
            index.setdefault(normalise_words(subject), []).append(i)
    return {k: tuple(v) for k, v in index.items()}, max((len(k.split()) for k in index), default=0)


def named_in(query: str, index: dict[str, tuple[int, ...]], max_words: int) -> set[int]:
    """Positions of the items of a :func:`subject_index` whose subject occurs in ``query`` as whole
    words (the last word possibly inflected): a lookup per word n-gram of the query, not a scan."""
    if not index:
        return set()
    words = normalise_words(query).split()
    found: set[int] = set()
    for start in range(len(words)):
        for stop in range(start + 1, min(len(words), start + max_words) + 1):
            for form in word_forms(" ".join(words[start:stop])):
                found.update(index.get(form, ()))
    return found


SCOPES = ("fact", "subject")


@dataclass
class KeyRecord:
    """The keys of one edit: unit vectors [n, d] and the texts they were embedded from.

    ``scope`` says which queries naming the subject the edit may serve: ``fact`` (the default)
    only those that ask for the edited relation, ``subject`` every one (a renamed entity).
    ``relation_vectors`` ([m, d] or None) are the edit's relation keys (its texts with the
    subject masked) that the relation check compares a query against."""

    edit_id: str
    vectors: np.ndarray
    texts: list[str]
    subject: str | None = None
    scope: str = "fact"
    relation_vectors: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or self.vectors.shape[0] == 0:
            raise ValueError("a key record needs at least one vector, shaped [n, d]")
        if len(self.texts) != self.vectors.shape[0]:
            raise ValueError("a key record needs one text per vector")
        if self.subject is not None and not normalise_words(self.subject):
            self.subject = None
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        if self.relation_vectors is not None:
            self.relation_vectors = np.ascontiguousarray(self.relation_vectors, dtype=np.float32)
            if self.relation_vectors.ndim != 2 or self.relation_vectors.shape[1] != self.vectors.shape[1]:
                raise ValueError("relation vectors must be shaped [m, d] like the keys")


@dataclass(frozen=True)
class Route:
    """Where a query goes: the edit, its best key's similarity and text, and whether the
    edit's subject was named in the query."""

    edit_id: str
    similarity: float
    key_text: str | None = None
    subject_match: bool = False
    relation_score: float | None = None  # the relation check's score, when it was made
    subject: str | None = None  # the edit's subject


@dataclass(frozen=True)
class _Snapshot:
    matrix: np.ndarray  # [K, d] all keys, each edit's keys contiguous
    key_edit: np.ndarray  # [K] edit index of each key
    key_texts: tuple[str, ...]
    edit_ids: tuple[str, ...]
    edit_start: np.ndarray  # [E] first key row of each edit
    edit_len: np.ndarray  # [E] number of keys of each edit
    centroids: np.ndarray  # [E, d] normalised mean key per edit
    subjects: dict[str, tuple[int, ...]] = field(default_factory=dict)  # normalised subject -> edit indices
    max_subject_words: int = 0
    subjectless: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # edit indices
    subjectless_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # their keys
    subjectless_centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    is_subjectless: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # [E]
    records: tuple[KeyRecord, ...] = ()  # [E] (subject, scope and relation keys per edit)

    @classmethod
    def build(cls, records: Sequence[KeyRecord], dim: int) -> "_Snapshot":
        if not records:
            empty = np.zeros((0, dim), dtype=np.float32)
            none = np.zeros(0, dtype=np.int64)
            return cls(empty, none, (), (), none, none, empty, subjectless_centroids=empty)
        matrix = np.ascontiguousarray(np.concatenate([r.vectors for r in records]), dtype=np.float32)
        edit_len = np.array([len(r.vectors) for r in records], dtype=np.int64)
        edit_start = np.concatenate([[0], np.cumsum(edit_len)[:-1]]).astype(np.int64)
        key_edit = np.repeat(np.arange(len(records), dtype=np.int64), edit_len)
        centroids = l2_normalise(np.stack([r.vectors.mean(0) for r in records]))
        subjects, max_words = subject_index([r.subject for r in records])
        is_subjectless = np.array([not r.subject for r in records], dtype=bool)
        subjectless = np.flatnonzero(is_subjectless).astype(np.int64)
        return cls(
            matrix, key_edit, tuple(t for r in records for t in r.texts), tuple(r.edit_id for r in records),
            edit_start, edit_len, centroids, subjects, max_words,
            subjectless, np.flatnonzero(is_subjectless[key_edit]).astype(np.int64),
            np.ascontiguousarray(centroids[subjectless]), is_subjectless, tuple(records),
        )

    def rows_of(self, edits: np.ndarray) -> np.ndarray:
        """The key rows of the given edit indices, in that order."""
        if edits.size == 0:
            return np.zeros(0, dtype=np.int64)
        lens = self.edit_len[edits]
        offsets = np.repeat(np.cumsum(lens) - lens, lens)
        return np.repeat(self.edit_start[edits], lens) + (np.arange(int(lens.sum())) - offsets)

    def named_edits(self, query: str) -> set[int]:
        """Edits whose subject occurs in ``query`` as whole words: a lookup per word n-gram."""
        return named_in(query, self.subjects, self.max_subject_words)


class Selector:
    """Routes a query to at most one active edit; see the module docstring for the rule."""

    def __init__(
        self,
        encoder: Encoder,
        threshold: float | None = None,
        *,
        subjectless_threshold: float | None = None,
        unnamed_threshold: float | None = None,
        exact_limit: int = DEFAULT_EXACT_LIMIT,
        prefilter: int = DEFAULT_PREFILTER,
        scope_head: ScopeHead | None | str = "default",
        scope_threshold: float | None = None,
    ):
        self.encoder = encoder if isinstance(encoder, MemoEncoder) else MemoEncoder(encoder)
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        self.subjectless_threshold = (
            DEFAULT_SUBJECTLESS_THRESHOLD if subjectless_threshold is None else float(subjectless_threshold)
        )
        self.unnamed_threshold = DEFAULT_UNNAMED_THRESHOLD if unnamed_threshold is None else float(unnamed_threshold)
        self.exact_limit = exact_limit
        self.prefilter = prefilter
        # "default": the shipped head when it fits the encoder (else None: no relation check)
        self.scope_head = default_head(encoder.name, encoder.dim) if scope_head == "default" else scope_head
        self.scope_threshold = DEFAULT_SCOPE_THRESHOLD if scope_threshold is None else float(scope_threshold)
        self._lazy_relation: dict[int, tuple[KeyRecord, np.ndarray]] = {}  # id(record) -> (record, keys)
        self._lock = threading.Lock()
        self._records: dict[str, KeyRecord] = {}
        self._snap = _Snapshot.build([], encoder.dim)

    def memo(self):
        """Within this block the calling thread embeds each distinct text once (``MemoEncoder``)."""
        return self.encoder.memo()

    # -- keys ----------------------------------------------------------------------------------
    def keys_for(
        self,
        prompt: str,
        paraphrases: Iterable[str] = (),
        subject: str | None = None,
        *,
        target: str | None = None,
        scope: str = "fact",
    ) -> KeyRecord:
        """Embed an edit's prompt and paraphrases (duplicates dropped) into a record without an id.

        With a subject, the record also gets its relation keys: the texts with the subject
        masked and ``target`` appended ("X, the piano"), embedded in the same encoder call."""
        texts: list[str] = []
        for text in [prompt, *paraphrases]:
            text = text.strip()
            if text and text not in texts:
                texts.append(text)
        if not texts:
            raise ValueError("an edit needs a non-empty prompt to key on")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        if subject is None or not normalise_words(subject):
            return KeyRecord("", self.encoder.encode(texts), texts, subject, scope)
        use_target = self.scope_head is None or self.scope_head.use_target
        relation = edit_relation_texts(texts, subject, target if use_target else None)
        vectors = self.encoder.encode(texts + relation)
        return KeyRecord("", vectors[: len(texts)], texts, subject, scope, vectors[len(texts) :])

    # -- memory --------------------------------------------------------------------------------
    def add(self, record: KeyRecord) -> None:
        """Add (or replace) one edit's keys."""
        self.add_many([record])

    def add_many(self, records: Iterable[KeyRecord]) -> None:
        """Add (or replace) many edits' keys with one new snapshot (a bulk import: ``add`` in a
        loop would rebuild the snapshot once per edit)."""
        batch = self._checked(records)
        with self._lock:
            merged = dict(self._records)
            merged.update((r.edit_id, r) for r in batch)
            self._publish(merged)

    def _checked(self, records: Iterable[KeyRecord]) -> list[KeyRecord]:
        """The records, each with an edit id and vectors of the encoder's width (else ValueError)."""
        batch = list(records)
        for record in batch:
            if not record.edit_id:
                raise ValueError("a key record needs an edit_id before it is added")
            self._check_dim(record)
        return batch

    def remove(self, edit_id: str) -> bool:
        """Drop one edit's keys; False when it had none."""
        with self._lock:
            if edit_id not in self._records:
                return False
            records = dict(self._records)
            del records[edit_id]
            self._publish(records)
            return True

    def replace_all(self, records: Iterable[KeyRecord]) -> None:
        """Swap the whole memory at once (a rebuild from the database or the shared store)."""
        new = {r.edit_id: r for r in self._checked(records)}
        with self._lock:
            self._publish(new)

    def edit_ids(self) -> list[str]:
        return list(self._snap.edit_ids)

    def __len__(self) -> int:
        return len(self._snap.edit_ids)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._records

    def _publish(self, records: dict[str, KeyRecord]) -> None:
        self._records = records
        live = {id(r) for r in records.values()}
        self._lazy_relation = {k: v for k, v in self._lazy_relation.items() if k in live}
        self._snap = _Snapshot.build(list(records.values()), self.encoder.dim)

    def _check_dim(self, record: KeyRecord) -> None:
        if record.vectors.shape[1] != self.encoder.dim:
            raise ValueError(f"key width {record.vectors.shape[1]} != encoder width {self.encoder.dim}")

    # -- lookup --------------------------------------------------------------------------------
    @property
    def rule(self) -> str:
        """``subject`` (edits with a subject need it named) or ``similarity`` (they do not)."""
        return "subject" if self.unnamed_threshold > self.threshold else "similarity"

    def route(self, query: str) -> Route | None:
        return self.route_vector(self.encoder.encode([query])[0], query)

    def route_many(self, queries: Sequence[str]) -> list[Route | None]:
        if not queries:
            return []
        vectors = self.encoder.encode(list(queries))
        return [self.route_vector(v, q) for v, q in zip(vectors, queries)]

    def route_vector(self, vector: np.ndarray, query: str) -> Route | None:
        """The routing decision for a query already embedded (``vector``, unit length)."""
        snap = self._snap
        if not snap.edit_ids:
            return None
        named = snap.named_edits(query)
        named_edits = np.fromiter(sorted(named), dtype=np.int64, count=len(named))
        rows = self._candidate_rows(snap, vector, named_edits)
        if rows.size == 0:
            return None
        sims = snap.matrix @ vector if rows.size == len(snap.matrix) else snap.matrix[rows] @ vector
        edits = snap.key_edit[rows]
        passes = sims >= self._thresholds(snap, edits, named_edits)
        if not passes.any():
            return None
        scores: dict[int, float] = {}
        if self.scope_head is not None and named:
            scores = self._relation_scores(snap, query, {int(e) for e in edits[passes] if int(e) in named})
            for edit, score in scores.items():
                if score < self.scope_threshold:
                    passes &= edits != edit
            if not passes.any():
                return None
        best = int(np.argmax(np.where(passes, sims, -np.inf)))
        edit = int(edits[best])
        return Route(snap.edit_ids[edit], float(sims[best]), snap.key_texts[int(rows[best])], edit in named,
                     scores.get(edit), snap.records[edit].subject)

    def relation_score(self, query: str, record: KeyRecord) -> float | None:
        """The relation check's score of ``query`` against one record (None: no check applies)."""
        if self.scope_head is None or not record.subject or record.scope != "fact":
            return None
        snap = _Snapshot.build([record], self.encoder.dim)
        return self._relation_scores(snap, query, {0}).get(0)

    def _relation_scores(self, snap: _Snapshot, query: str, candidates: set[int]) -> dict[int, float]:
        """P(same relation) per named, fact-scoped candidate edit: one encoder call for the query
        masked with each distinct subject (and the relation keys of records stored without)."""
        head = self.scope_head
        assert head is not None
        todo = [e for e in sorted(candidates) if snap.records[e].scope == "fact" and snap.records[e].subject]
        if not todo:
            return {}
        masked: dict[str, int] = {}  # masked query -> row in the batch
        texts: list[str] = []
        missing: dict[int, tuple[int, int]] = {}  # edit -> rows of its lazily computed relation keys
        edit_query: dict[int, int] = {}
        lazy: dict[int, np.ndarray] = {}
        for e in todo:
            rec = snap.records[e]
            q = query_relation_text(query, rec.subject)
            if q not in masked:
                masked[q] = len(texts)
                texts.append(q)
            edit_query[e] = masked[q]
            cached = self._lazy_relation.get(id(rec))
            if rec.relation_vectors is None and cached is not None:
                lazy[e] = cached[1]
            elif rec.relation_vectors is None:
                rel = edit_relation_texts(rec.texts, rec.subject)
                missing[e] = (len(texts), len(texts) + len(rel))
                texts.extend(rel)
        vectors = self.encoder.encode(texts)
        out: dict[int, float] = {}
        for e in todo:
            rec = snap.records[e]
            keys = rec.relation_vectors if rec.relation_vectors is not None else lazy.get(e)
            if keys is None:
                lo, hi = missing[e]
                keys = vectors[lo:hi]
                self._lazy_relation[id(rec)] = (rec, keys)
            out[e] = float(head.scores(keys, vectors[edit_query[e]]).max())
        return out

    def _thresholds(self, snap: _Snapshot, edits: np.ndarray, named_edits: np.ndarray) -> np.ndarray:
        """Per candidate key, the similarity its edit needs under the rule."""
        thr = np.where(snap.is_subjectless[edits], np.float32(self.subjectless_threshold),
                       np.float32(self.unnamed_threshold))
        if named_edits.size:
            thr[np.isin(edits, named_edits)] = self.threshold
        return thr

    def _candidate_rows(self, snap: _Snapshot, vector: np.ndarray, named_edits: np.ndarray) -> np.ndarray:
        """Key rows worth scoring: the named edits' keys, the subjectless edits' keys and, when
        ``unnamed_threshold`` can be met, every key. A scan of more than ``exact_limit`` keys
        is narrowed to the ``prefilter`` edits nearest by centroid. No step loops over edits
        in Python: the cost stays a matrix-vector product as the memory grows."""
        if self.unnamed_threshold <= 1.0:  # every edit may pass: scan them all
            if len(snap.matrix) <= self.exact_limit:
                return np.arange(len(snap.matrix))
            return snap.rows_of(np.union1d(named_edits, self._nearest(snap.centroids, vector)))
        if snap.subjectless.size == 0:
            return snap.rows_of(named_edits)
        if len(snap.subjectless_rows) <= self.exact_limit:
            # Named edits have a subject, so they and the subjectless ones never overlap.
            return np.concatenate([snap.rows_of(named_edits), snap.subjectless_rows])
        top = snap.subjectless[self._nearest(snap.subjectless_centroids, vector)]
        return snap.rows_of(np.union1d(named_edits, top))

    def _nearest(self, centroids: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """Positions of the ``prefilter`` rows of ``centroids`` nearest to ``vector`` (unordered)."""
        near = centroids @ vector
        k = min(self.prefilter, len(near))
        return np.argpartition(-near, k - 1)[:k]


def build_selector(
    lm: "LM | None" = None,
    encoder_name: str = DEFAULT_ENCODER,
    threshold: float | None = None,
    *,
    subjectless_threshold: float | None = None,
    unnamed_threshold: float | None = None,
    scope_threshold: float | None = None,
) -> Selector:
    """The selector with the measured defaults (encoder, thresholds), any of them overridable."""
    return Selector(
        build_encoder(encoder_name, lm), threshold,
        subjectless_threshold=subjectless_threshold, unnamed_threshold=unnamed_threshold,
        scope_threshold=scope_threshold,
    )
