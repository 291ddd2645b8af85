"""Contrastive Knowledge Assessment (Dong et al., 2022) for a causal LM, batched.

    CKA(s, r, o) = (P(o | s, r) + alpha) / (E_{r'} [P(o | s, r')] + alpha)

``P(o | s, r)`` is the probability the base model (completion form, no chat template) gives
the object's tokens as the continuation of the template's text before ``[Y]`` with the subject
filled in ("prefix" scoring). ``r'`` ranges over the relation's false-relation templates. A
template whose ``[Y]`` is not last is cut at ``[Y]`` (the words after the object cannot condition
a left-to-right model's prediction of it); a template that starts with ``[Y]`` is scored after a
start-of-text token, i.e. the object's prior. "sentence" scoring (object plus the rest of the
sentence) is available for comparison; docs/calinet-notes.md has the measurement that chose the
defaults below.

Also here: the rank-based assessment the paper contrasts CKA with (is the object's first token
among the top-k next tokens?), AUROC and ROC curves, and the threshold search used on a dev split.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import torch

from app.knowledge.facts import Fact, prefix, resolve, suffix
from app.knowledge.templates import KnowledgeError, RelationTemplates

Scoring = Literal["prefix", "sentence"]

DEFAULT_ALPHA = 1e-9
DEFAULT_SCORING: Scoring = "prefix"
DEFAULT_LENGTH_NORM = True
DEFAULT_THRESHOLD = 1.0
DEFAULT_TOP_K = 10
MAX_FACTS = 1000


@dataclass(frozen=True)
class ContinuationScore:
    """Teacher-forced score of one object after one prompt."""

    logprob: float  # sum over the object's tokens
    n_tokens: int
    suffix_logprob: float  # the rest of the sentence after the object (0 when not scored)
    first_rank: int  # rank of the object's first token in the next-token distribution (0 = argmax)
    candidate_rank: int  # same, among the candidate first tokens given (0 when none given)
    greedy: bool  # every object token is the argmax: greedy decoding writes the object

    def prob(self, *, scoring: Scoring = DEFAULT_SCORING, length_norm: bool = DEFAULT_LENGTH_NORM) -> float:
        lp = self.logprob + (self.suffix_logprob if scoring == "sentence" else 0.0)
        if length_norm:
            lp /= max(1, self.n_tokens)
        return math.exp(lp)


@dataclass(frozen=True)
class ScoreItem:
    """One (template, subject, object) to score; ``candidates`` are first-token ids to rank against."""

    template: str
    subject: str
    object: str
    candidates: tuple[int, ...] = ()


@dataclass
class Assessment:
    subject: str
    relation: str | None
    object: str
    cka: float
    p_object: float  # P(o | s, r) under the true template
    p_object_negative: float  # mean P(o | s, r') over the negative templates
    verdict: Literal["true", "false"]
    rank: int  # rank of the object's first token after the true template's prefix (0 = top-1)
    candidate_rank: int  # same among the candidate objects' first tokens (0 when none given)
    greedy: bool  # greedy decoding after the true template's prefix writes the object

    def to_dict(self) -> dict:
        return {
            "subject": self.subject, "relation": self.relation, "object": self.object, "cka": self.cka,
            "p_object": self.p_object, "p_object_negative": self.p_object_negative, "verdict": self.verdict,
        }


# -- math ------------------------------------------------------------------------------------


def cka_value(p_true: float, p_negatives: Sequence[float], alpha: float = DEFAULT_ALPHA) -> float:
    """CKA from probabilities; the mean over negatives is the expectation over false relations."""
    if not p_negatives:
        raise ValueError("CKA needs at least one negative template probability")
    return (p_true + alpha) / (float(np.mean(p_negatives)) + alpha)


def verdict(cka: float, threshold: float = DEFAULT_THRESHOLD) -> Literal["true", "false"]:
    return "true" if cka >= threshold else "false"


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney U)."""
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=float)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def roc_curve(positive: Sequence[float], negative: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) as the threshold sweeps from +inf down."""
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    tpr = [0.0] + [float((pos >= t).mean()) for t in thresholds]
    fpr = [0.0] + [float((neg >= t).mean()) for t in thresholds]
    return np.array(fpr), np.array(tpr)


def best_threshold(positive: Sequence[float], negative: Sequence[float]) -> float:
    """The threshold (score >= t means "true") maximising balanced accuracy (Youden's J).

    Use it on a dev split only; report on another.
    """
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    candidates = np.unique(np.concatenate([pos, neg]))
    best, best_j = float(candidates[0]), -1.0
    for t in candidates:
        j = (pos >= t).mean() - (neg >= t).mean()
        if j > best_j:
            best, best_j = float(t), float(j)
    return best


# -- batched scoring ---------------------------------------------------------------------------


def _start_ids(lm) -> list[int]:
    tok = lm.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return [int(start)]


def encode_item(lm, item: ScoreItem) -> tuple[list[int], list[int], list[int]]:
    """Token ids of (prompt, object, rest of the sentence) in completion form."""
    head = prefix(item.template, item.subject)
    tail = suffix(item.template, item.subject)
    prompt = lm.prompt_ids(head, "completion") if head else []
    if not prompt:
        prompt = _start_ids(lm)
    obj_text = lm.target_text(head, item.object, "completion") if head else item.object.strip()
    obj = lm.tokenizer(obj_text, add_special_tokens=False).input_ids
    rest: list[int] = []
    if tail:
        joint = lm.tokenizer(obj_text + tail, add_special_tokens=False).input_ids
        if joint[: len(obj)] == obj:
            rest = joint[len(obj) :]
        else:
            rest = lm.tokenizer(tail, add_special_tokens=False).input_ids
    return prompt, obj, rest


def score_items(
    lm,
    items: Sequence[ScoreItem],
    *,
    deltas: Iterable | None = None,
    with_suffix: bool = False,
    batch_size: int = 64,
) -> list[ContinuationScore]:
    """Score many (template, subject, object) items, one forward per batch.

    Identical items are scored once. Sequences are sorted by length so a batch holds similar
    lengths, left-padded with explicit position ids, and only the last positions' logits are
    computed (``logits_to_keep``), which skips most of the vocabulary projection. The engine's
    lock is held per batch, not for the whole list, so a long assessment does not stall answers.
    """
    encoded: dict[ScoreItem, tuple[list[int], list[int], list[int]]] = {}
    for it in items:
        if it not in encoded:
            encoded[it] = encode_item(lm, it)
    keys = sorted(encoded, key=lambda k: sum(len(p) for p in encoded[k][:2]) + (len(encoded[k][2]) if with_suffix else 0))
    results: dict[ScoreItem, ContinuationScore] = {}
    lock = getattr(lm, "_lock", None) or nullcontext()  # the engine's: taken per batch, so answers interleave
    with lm.active(deltas), torch.inference_mode():
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            with lock:
                scores = _score_batch(lm, [encoded[k] for k in chunk], [k.candidates for k in chunk], with_suffix)
            results.update(zip(chunk, scores))
    return [results[it] for it in items]


def pack_left(lm, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (so padding never shifts positions).

    Left padding puts every sequence's end at the same column, so the logits of the last
    ``k`` positions (``logits_to_keep=k``) cover every row's object tokens.
    """
    width = max(len(s) for s in seqs)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        attn[i, width - len(s) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids.to(lm.device), attn.to(lm.device), pos.to(lm.device)


def _score_batch(lm, batch, candidates, with_suffix: bool) -> list[ContinuationScore]:
    seqs = [p + o + (r if with_suffix else []) for p, o, r in batch]
    tails = [len(o) + (len(r) if with_suffix else 0) for _, o, r in batch]
    keep = max(tails) + 1
    ids, attn, pos = pack_left(lm, seqs)
    logits = lm.model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    out = []
    for i, ((p, o, r), t) in enumerate(zip(batch, tails)):
        tgt = torch.tensor(o + (r if with_suffix else []), device=logits.device)
        rows = torch.arange(keep - t - 1, keep - 1, device=logits.device)
        lp = logp[i, rows].gather(-1, tgt[:, None]).squeeze(-1)
        n_obj = len(o)
        first = logits[i, keep - t - 1]
        rank = int((first > first[o[0]]).sum()) if o else 0
        cand = candidates[i]
        cand_rank = int((first[list(cand)] > first[o[0]]).sum()) if cand and o else 0
        greedy = bool(o) and bool(logits[i, rows[:n_obj]].argmax(-1).eq(tgt[:n_obj]).all())
        out.append(
            ContinuationScore(
                logprob=float(lp[:n_obj].sum()),
                n_tokens=n_obj,
                suffix_logprob=float(lp[n_obj:].sum()),
                first_rank=rank,
                candidate_rank=cand_rank,
                greedy=greedy,
            )
        )
    return out


# -- assessment ------------------------------------------------------------------------------


def first_token_id(lm, template: str, subject: str, obj: str) -> int:
    """The id of the object's first token as written after the template's prefix."""
    return encode_item(lm, ScoreItem(template, subject, obj))[1][0]


def validate_facts(
    facts: Sequence[Fact], templates: dict[str, RelationTemplates] | None = None, *, max_facts: int | None = MAX_FACTS
) -> list:
    """Resolve every fact's templates or raise ``KnowledgeError`` naming the first bad fact."""
    if not facts:
        raise KnowledgeError("no facts given", "no_facts")
    if max_facts is not None and len(facts) > max_facts:
        raise KnowledgeError(f"at most {max_facts} facts per request (got {len(facts)})", "too_many_facts")
    resolved = []
    for i, f in enumerate(facts):
        try:
            resolved.append(resolve(f, templates))
        except KnowledgeError as exc:
            raise KnowledgeError(f"fact {i}: {exc.message}", exc.code) from None
    return resolved


@dataclass
class FactScores:
    """Raw scores of one fact: under its true template and under each negative template."""

    main: ContinuationScore
    negatives: list[ContinuationScore]


def score_facts(
    lm,
    facts: Sequence[Fact],
    resolved: Sequence,
    *,
    candidates: dict[str, tuple[int, ...]] | None = None,
    deltas: Iterable | None = None,
    with_suffix: bool = False,
    batch_size: int = 64,
) -> list[FactScores]:
    """One batched pass over the true and negative templates of all facts."""
    cands = candidates or {}
    items: list[ScoreItem] = []
    for f, ft in zip(facts, resolved):
        items.append(ScoreItem(ft.template, f.subject, f.object, cands.get(f.relation or "", ())))
        items.extend(ScoreItem(t, f.subject, f.object) for t in ft.negatives)
    scores = score_items(lm, items, deltas=deltas, with_suffix=with_suffix, batch_size=batch_size)
    out, k = [], 0
    for ft in resolved:
        out.append(FactScores(scores[k], scores[k + 1 : k + 1 + len(ft.negatives)]))
        k += 1 + len(ft.negatives)
    return out


def judge(
    fact: Fact,
    scores: FactScores,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    scoring: Scoring = DEFAULT_SCORING,
    length_norm: bool = DEFAULT_LENGTH_NORM,
) -> Assessment:
    """CKA and verdict of one fact from its raw scores."""
    p = scores.main.prob(scoring=scoring, length_norm=length_norm)
    pn = [s.prob(scoring=scoring, length_norm=length_norm) for s in scores.negatives]
    value = cka_value(p, pn, alpha)
    return Assessment(
        subject=fact.subject, relation=fact.relation, object=fact.object, cka=value, p_object=p,
        p_object_negative=float(np.mean(pn)), verdict=verdict(value, threshold), rank=scores.main.first_rank,
        candidate_rank=scores.main.candidate_rank, greedy=scores.main.greedy,
    )


def assess(
    lm,
    facts: Sequence[Fact],
    threshold: float | None = None,
    *,
    templates: dict[str, RelationTemplates] | None = None,
    alpha: float = DEFAULT_ALPHA,
    scoring: Scoring = DEFAULT_SCORING,
    length_norm: bool = DEFAULT_LENGTH_NORM,
    candidates: dict[str, tuple[int, ...]] | None = None,
    deltas: Iterable | None = None,
    batch_size: int = 64,
    max_facts: int | None = MAX_FACTS,
) -> list[Assessment]:
    """Judge each fact true or false by CKA (one batched pass over all templates of all facts).

    ``templates`` maps relation ids to their templates (default: the package's). Raises
    ``KnowledgeError`` (a ``ValueError`` with a stable ``code``) on an empty or oversized list
    or on any invalid fact, before any model work. ``deltas`` are applied on top of the
    engine's global ones (active calibrations).
    """
    resolved = validate_facts(facts, templates, max_facts=max_facts)
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    scores = score_facts(
        lm, facts, resolved, candidates=candidates, deltas=deltas, with_suffix=(scoring == "sentence"),
        batch_size=batch_size,
    )
    return [
        judge(f, s, threshold=threshold, alpha=alpha, scoring=scoring, length_norm=length_norm)
        for f, s in zip(facts, scores)
    ]
