"""Knowledge assessment for causal models: whole filled statements over several paraphrased
templates, the fillers' own frequency removed, and the paper's false-relation contrast.

For one template ``t`` and a fact ``(s, o)``, ``L_t(s, o)`` is the log-probability the base model
(completion form) gives the filled sentence after a document boundary: every token, so the slot
and the words after it are scored in context, whichever slot comes first. With ``n`` a neutral
filler ("something"), what the pair adds beyond the subject alone is

    pmi_t(s, o) = L_t(s, o) - L_t(s, n) - lambda * (L_t(n, o) - L_t(n, n))

(``lambda`` = 1: the full pointwise mutual information, symmetric in the two fillers;
``lambda`` < 1 keeps part of the object's own frequency). The default score adds this, averaged
over the relation's first ``paraphrases`` true templates (LAMA, then ParaRel), to the object's
per-token log-probability in context, and subtracts the same under the false-relation templates:

    contrast(s, r, o) = log P(o | s, r) + beta * mean_t pmi_t(s, o) - w * mean_{r'} log P(o | s, r')

``w`` = 1 with ``beta`` = 0 is the paper's CKA in log space. The weights were chosen on the tuning
half of ``factpatch detect``; on this model every ``w`` > 0 lowered both AUROC and top-1, so the
default is ``w`` = 0 (docs/detection.md). From the same forward passes come the paper's CKA (ratio
of probabilities) and the raw probability P(o | s, r), so a response carries every score.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import numpy as np
import torch

from app.knowledge.facts import Fact, FactTemplates, resolve
from app.knowledge.templates import OBJECT, SUBJECT, KnowledgeError, normalize_template

ScoreName = Literal["contrast", "pmi", "cka_paper", "p_object"]
SCORE_NAMES: tuple[str, ...] = ("contrast", "pmi", "cka_paper", "p_object")

NEUTRAL = "something"
DEFAULT_SCORE: ScoreName = "contrast"
DEFAULT_PARAPHRASES = 4
DEFAULT_NEGATIVE_WEIGHT = 0.0  # weight of the false relations in `contrast`: any weight > 0 lowered it (tuning half)
DEFAULT_PMI_WEIGHT = 0.05
DEFAULT_OBJECT_NULL = 0.5
DEFAULT_ALPHA = 1e-9  # CKA smoothing, as in app.knowledge.cka
# Verdict thresholds per score (score >= threshold: "true"): best balanced accuracy on the tuning
# half of `factpatch detect` (results/detect), except the paper's CKA, which keeps the paper's 1.
DEFAULT_THRESHOLDS: dict[str, float] = {"contrast": -7.83, "pmi": 4.93, "cka_paper": 1.0, "p_object": 3.1e-4}
MAX_FACTS = 1000


# -- filled sentences ------------------------------------------------------------------------


@dataclass(frozen=True)
class Filled:
    """A template with both slots filled, and the character span of each filler."""

    text: str
    subject_span: tuple[int, int]
    object_span: tuple[int, int]


def fill(template: str, subject: str, obj: str) -> Filled:
    """The sentence with ``[X]``/``[Y]`` filled; a filler that opens the sentence gets a capital
    only when it is the neutral word (names keep their spelling)."""
    t = normalize_template(template)
    values = {SUBJECT: subject.strip(), OBJECT: obj.strip()}
    out, spans, pos = "", {}, 0
    while True:
        nxt = [(t.find(k, pos), k) for k in values if t.find(k, pos) >= 0]
        if not nxt:
            out += t[pos:]
            break
        i, k = min(nxt)
        out += t[pos:i]
        v = values[k]
        if not out.strip() and v == NEUTRAL:
            v = v[:1].upper() + v[1:]
        spans[k] = (len(out), len(out) + len(v))
        out += v
        pos = i + len(k)
    return Filled(out, spans[SUBJECT], spans[OBJECT])


@dataclass(frozen=True)
class TokenScores:
    """Per-token log-probabilities of one sentence and each token's character span."""

    logprobs: tuple[float, ...]
    offsets: tuple[tuple[int, int], ...]

    def total(self) -> float:
        return float(sum(self.logprobs))

    def span(self, start: int, end: int) -> tuple[float, int, int]:
        """(sum of log-probs, number of tokens, index of the first token) of the tokens that
        overlap ``[start, end)`` (a token holding the space before a word belongs to it)."""
        idx = [i for i, (a, b) in enumerate(self.offsets) if b > start and a < end]
        if not idx:
            return 0.0, 0, len(self.offsets)
        return float(sum(self.logprobs[i] for i in idx)), len(idx), idx[0]


def boundary_ids(lm) -> list[int]:
    """Token(s) that start a document: what the tokenizer adds itself, else its end-of-text or BOS."""
    tok = lm.tokenizer
    probe = tok("a", add_special_tokens=True).input_ids
    bare = tok("a", add_special_tokens=False).input_ids
    if len(probe) > len(bare) and probe[-len(bare):] == bare:
        return []  # the tokenizer writes its own start token(s)
    for name in ("<|endoftext|>",):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None and tid >= 0:
            return [tid]
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return [int(start)]


def score_texts(
    lm, texts: Sequence[str], *, deltas: Iterable | None = None, batch_size: int = 32
) -> list[TokenScores]:
    """Teacher-forced log-probability of every token of each text after a document boundary.

    Identical texts are scored once; texts are sorted by length and right-padded per batch. The
    engine's lock is taken per batch, so a long assessment does not stall answers.
    """
    tok = lm.tokenizer
    start = boundary_ids(lm)
    unique = list(dict.fromkeys(texts))
    encoded = {}
    for t in unique:
        enc = tok(t, add_special_tokens=not start, return_offsets_mapping=True)
        ids, offs = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
        encoded[t] = (start + ids, [(0, 0)] * len(start) + offs)
    order = sorted(unique, key=lambda t: len(encoded[t][0]))
    out: dict[str, TokenScores] = {}
    lock = getattr(lm, "_lock", None) or nullcontext()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with lm.active(deltas), torch.inference_mode():
        for b in range(0, len(order), batch_size):
            chunk = order[b : b + batch_size]
            seqs = [encoded[t][0] for t in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            attn = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                attn[i, : len(s)] = 1
            with lock:
                logits = lm.model(input_ids=ids.to(lm.device), attention_mask=attn.to(lm.device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tgt = ids[:, 1:].to(logp.device)
            lp = logp.gather(-1, tgt[..., None]).squeeze(-1).cpu()
            for i, t in enumerate(chunk):
                n = len(seqs[i])
                # the first token has no score (it is the boundary, or the tokenizer's start token)
                vals = (0.0, *[float(x) for x in lp[i, : n - 1]])
                out[t] = TokenScores(tuple(vals), tuple(encoded[t][1]))
    return [out[t] for t in texts]


# -- assessment ------------------------------------------------------------------------------


@dataclass
class StatementScores:
    """Everything measured for one fact, from which every score is derived."""

    pmi_true: list[float]  # pmi_t(s, o) per true template
    pmi_negative: list[float]  # per false-relation template
    obj_logprob: float  # log P(o | s, r) under the first true template (sum over tokens)
    obj_tokens: int
    obj_logprob_negative: list[tuple[float, int]]  # same under each false-relation template
    parts: list[tuple[float, float, float, float]] = field(default_factory=list)  # L(s,o), L(s,n), L(n,o), L(n,n) per template


@dataclass
class Assessment:
    subject: str
    relation: str | None
    object: str
    score: float  # the chosen score's value
    score_name: str
    verdict: Literal["true", "false"]
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def cka(self) -> float:
        return self.scores["cka_paper"]

    @property
    def p_object(self) -> float:
        return self.scores["p_object"]

    def to_dict(self) -> dict:
        return {
            "subject": self.subject, "relation": self.relation, "object": self.object, "score": self.score,
            "score_name": self.score_name, "verdict": self.verdict, "scores": dict(self.scores),
            "cka": self.scores["cka_paper"], "p_object": self.scores["p_object"],
            "p_object_negative": self.scores["p_object_negative"],
        }


def true_templates(ft: FactTemplates, paraphrases: int = DEFAULT_PARAPHRASES) -> tuple[str, ...]:
    """The fact's template first, then distinct paraphrases up to ``paraphrases`` in all."""
    out = list(dict.fromkeys((ft.template, *ft.paraphrases)))
    return tuple(out[: max(1, paraphrases)])


def plan(fact: Fact, ft: FactTemplates, paraphrases: int) -> tuple[tuple[str, ...], tuple[str, ...], list[Filled]]:
    """(true templates, negative templates, the filled sentences to score, 4 per template)."""
    trues, negs = true_templates(ft, paraphrases), tuple(ft.negatives)
    sents = []
    for t in (*trues, *negs):
        sents += [fill(t, fact.subject, fact.object), fill(t, fact.subject, NEUTRAL),
                  fill(t, NEUTRAL, fact.object), fill(t, NEUTRAL, NEUTRAL)]
    return trues, negs, sents


def measure(
    lm, facts: Sequence[Fact], resolved: Sequence[FactTemplates], *, paraphrases: int = DEFAULT_PARAPHRASES,
    deltas: Iterable | None = None, batch_size: int = 32,
) -> list[StatementScores]:
    """One batched pass over every filled sentence of every fact (shared sentences scored once)."""
    plans = [plan(f, ft, paraphrases) for f, ft in zip(facts, resolved)]
    texts = [s.text for _, _, sents in plans for s in sents]
    scored = dict(zip(texts, score_texts(lm, texts, deltas=deltas, batch_size=batch_size)))
    out = []
    for trues, negs, sents in plans:
        pmis, objs, parts = [], [], []
        for k in range(len(trues) + len(negs)):
            so, sn, no, nn = sents[4 * k : 4 * k + 4]
            part = tuple(scored[x.text].total() for x in (so, sn, no, nn))
            parts.append(part)
            pmis.append(part[0] - part[1] - part[2] + part[3])
            lp, n, _ = scored[so.text].span(*so.object_span)
            objs.append((lp, n))
        out.append(StatementScores(
            pmi_true=pmis[: len(trues)], pmi_negative=pmis[len(trues) :], obj_logprob=objs[0][0],
            obj_tokens=objs[0][1], obj_logprob_negative=objs[len(trues) :], parts=parts,
        ))
    return out


def _prob(lp: float, n: int) -> float:
    return math.exp(lp / max(1, n))  # per-token geometric mean, as the paper's implementation


def all_scores(m: StatementScores, *, negative_weight: float = DEFAULT_NEGATIVE_WEIGHT,
               pmi_weight: float = DEFAULT_PMI_WEIGHT, object_null: float = DEFAULT_OBJECT_NULL,
               alpha: float = DEFAULT_ALPHA) -> dict[str, float]:
    """Every score of one measured fact (see the module docstring)."""
    pmi = float(np.mean([so - sn - object_null * (no - nn) for so, sn, no, nn in m.parts[: len(m.pmi_true)]]))
    pmi_full = float(np.mean(m.pmi_true))
    neg_full = float(np.mean(m.pmi_negative)) if m.pmi_negative else float("nan")
    lp = m.obj_logprob / max(1, m.obj_tokens)
    lpn = float(np.mean([a / max(1, b) for a, b in m.obj_logprob_negative])) if m.obj_logprob_negative else 0.0
    p = math.exp(lp)
    pn = float(np.mean([_prob(a, b) for a, b in m.obj_logprob_negative])) if m.obj_logprob_negative else float("nan")
    return {
        "contrast": lp + pmi_weight * pmi - negative_weight * lpn,
        "pmi": pmi,
        "pmi_symmetric": pmi_full,
        "pmi_symmetric_negative": neg_full,
        "cka_paper": (p + alpha) / (pn + alpha) if m.obj_logprob_negative else float("nan"),
        "p_object": p,
        "p_object_negative": pn,
    }


def validate_one(fact: Fact, templates=None, *, need_negatives: bool = True) -> FactTemplates:
    return resolve(fact, templates, need_negatives=need_negatives)


def assess_statements(
    lm,
    facts: Sequence[Fact],
    *,
    score: str = DEFAULT_SCORE,
    threshold: float | None = None,
    paraphrases: int = DEFAULT_PARAPHRASES,
    negative_weight: float = DEFAULT_NEGATIVE_WEIGHT,
    templates=None,
    deltas: Iterable | None = None,
    batch_size: int = 32,
    max_facts: int | None = MAX_FACTS,
) -> list[Assessment | KnowledgeError]:
    """Assess each fact; a fact that fails validation yields its ``KnowledgeError`` in its place
    (the others are still scored). Raises ``KnowledgeError`` only for the request as a whole
    (no facts, too many, unknown score name)."""
    if score not in SCORE_NAMES:
        raise KnowledgeError(f"unknown score {score!r}; one of {', '.join(SCORE_NAMES)}", "unknown_score")
    if not facts:
        raise KnowledgeError("no facts given", "no_facts")
    if max_facts is not None and len(facts) > max_facts:
        raise KnowledgeError(f"at most {max_facts} facts per request (got {len(facts)})", "too_many_facts")
    thr = DEFAULT_THRESHOLDS[score] if threshold is None else float(threshold)
    resolved: list[FactTemplates | KnowledgeError] = []
    for f in facts:
        try:
            resolved.append(validate_one(f, templates, need_negatives=(score != "pmi")))
        except KnowledgeError as exc:
            resolved.append(exc)
    ok = [i for i, r in enumerate(resolved) if not isinstance(r, KnowledgeError)]
    measured = measure(lm, [facts[i] for i in ok], [resolved[i] for i in ok], paraphrases=paraphrases,
                       deltas=deltas, batch_size=batch_size) if ok else []
    out: list[Assessment | KnowledgeError] = list(resolved)  # type: ignore[arg-type]
    for i, m in zip(ok, measured):
        f, ft = facts[i], resolved[i]
        sc = all_scores(m, negative_weight=negative_weight)
        value = sc[score]
        rel = ft.relation.relation if ft.relation is not None else f.relation
        out[i] = Assessment(subject=f.subject, relation=rel, object=f.object, score=value, score_name=score,
                            verdict="true" if value >= thr else "false", scores=sc)
    return out
