"""Repair (Tanno, Pradier, Nori, Li: "Repairing Neural Networks by Leaving the Right Past
Behind", NeurIPS 2022): find the training data that caused a set of failures F, and erase them.

The training data the service can get wrong are the data it trains in itself:

* each fact of a calibration (CaliNet slots ``K``, ``V`` trained on all the calibration's facts at
  once). Its datum z is the fact on its training templates. Causes are scored by the linear
  influence ``r(z) = -∇log p(F|θ̂)ᵀ H⁻¹ ∇log p(z|θ̂)`` with ``H = |D| F̂`` (F̂ the diagonal
  empirical Fisher of the slots over the calibration's training rows, damped): the estimated
  change of log p(F) if z were left out. The EWC form instead fits θ* to F under the Fisher
  penalty and scores ``log p(z|θ̂) - log p(z|θ*)``.
* each edit (an adapter of its own). Leaving it out is exact and cheap: answer F's questions
  that the edit serves with and without it; ``r(e) = log p(F|without e) - log p(F|with e)``.

Both scores are changes of log p(F) in nats, so one ranking holds both kinds.

Treatments of the top-k causes C: Newton update removal ``θ̂ - γ H⁻¹ ∇log p(C|θ̂)`` (γ = 1 is
the Newton step; unset, γ is chosen on the query half of F), EWC deletion (maximise
``-log p(C|θ)`` under the Fisher penalty) or fine-tuning on the corrected data. The new slots are
returned as a *repair delta* to apply on top of the calibration's own delta, which is never
rewritten: with the keys unchanged it is ``(K, V' - V)``; otherwise ``([K; K'], [-V; V'])``.
Edits among C are switched off.

Identification uses the query half of F only; the held-out half measures whether the cure
generalises to phrasings it never saw.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from app.delta import Delta
from app.knowledge.cka import ScoreItem, encode_item, pack_left
from app.knowledge.facts import Fact, prefix, resolve
from app.knowledge.templates import subject_first
from app.methods.base import FitResult, Method, ProgressFn, register
from app.methods.calinet.method import fact_splits, generic_kl, generic_sentences, start_rows
from app.methods.repair.config import STEP_GRID, RepairConfig

log = logging.getLogger(__name__)

_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
MAX_QUESTIONS_PER_FAILURE = 8


# -- inputs and outputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """A question the served model gets wrong: a fact (its relation's or its own templates) or a
    prompt whose continuation should be ``target``."""

    fact: Fact | None = None
    prompt: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class Question:
    prompt: tuple[int, ...]
    target: tuple[int, ...]
    failure: int
    text: str  # the prompt as text: what the selector routes
    half: str  # "query" | "heldout"


@dataclass
class ScopedCalibration:
    id: str
    delta: Delta
    facts: list[Fact]


@dataclass
class ScopedEdit:
    id: str
    delta: Delta


@dataclass
class Cause:
    kind: str  # "calibration_fact" | "edit"
    id: str  # the calibration's or the edit's id
    score: float
    fact: int | None = None  # index of the fact in its calibration
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "id": self.id, "score": self.score}
        if self.fact is not None:
            out["fact"] = self.fact
        out.update(self.detail)
        return out


@dataclass
class RepairOutcome:
    causes: list[Cause]  # every datum in scope, best first
    treated: list[Cause]
    deltas: dict[str, Delta]  # calibration id -> repair delta on top of it
    reverted_edits: list[str]
    report: dict[str, Any]
    baselines: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # per calibration: per-fact loss


class RepairError(ValueError):
    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message, self.code = message, code


def _lock(lm):
    return getattr(lm, "_lock", None) or nullcontext()


# -- questions ---------------------------------------------------------------------------------


def build_questions(lm, failures: Sequence[Failure], seed: int = 0) -> list[Question]:
    """Each failure as (prompt, target) token ids, split into a query and a held-out half.

    A fact failure is asked with up to 8 of its subject-first templates, and its templates are
    dealt alternately to the two halves (so the held-out half asks the same facts in phrasings
    identification never saw); failures asked in one form alternate between the halves.
    """
    rng = random.Random(seed)
    out: list[Question] = []
    single = 0
    for i, f in enumerate(failures):
        rows: list[tuple[tuple[int, ...], tuple[int, ...], str]] = []
        if f.fact is not None:
            ft = resolve(f.fact, need_negatives=False)
            templates = [t for t in dict.fromkeys((ft.template, *ft.paraphrases)) if subject_first(t)] or [ft.template]
            templates = templates[:MAX_QUESTIONS_PER_FAILURE]
            for t in templates:
                p, o, _ = encode_item(lm, ScoreItem(t, f.fact.subject, f.fact.object))
                if o:
                    rows.append((tuple(p), tuple(o), prefix(t, f.fact.subject)))
        else:
            p = lm.prompt_ids(f.prompt, "completion")
            o = lm.target_ids(f.prompt, f.target, "completion")
            if o:
                rows.append((tuple(p), tuple(o), f.prompt))
        if len(rows) == 1:
            half = "query" if single % 2 == 0 else "heldout"
            single += 1
            out.append(Question(rows[0][0], rows[0][1], i, rows[0][2], half))
            continue
        rng.shuffle(rows)
        for j, (p, o, text) in enumerate(rows):
            out.append(Question(p, o, i, text, "query" if j % 2 == 0 else "heldout"))
    return out


# -- scoring -----------------------------------------------------------------------------------


Row = tuple[Sequence[int], Sequence[int]]


def score_rows(lm, rows: Sequence[Row], deltas: Sequence[Delta], batch_size: int = 32) -> list[tuple[float, bool]]:
    """(log p(target | prompt), target is the greedy continuation) per row with exactly ``deltas``
    active (the engine's global deltas are not added)."""
    out: list[tuple[float, bool]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        keep = max(len(t) for _, t in chunk) + 1
        ids, attn, pos = pack_left(lm, [list(p) + list(t) for p, t in chunk])
        with _lock(lm), lm.active(list(deltas), include_global=False), torch.inference_mode():
            logits = lm.model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep).logits.float()
        for i, (_, t) in enumerate(chunk):
            rows_logits = logits[i, keep - len(t) - 1 : keep - 1]
            tgt = torch.tensor(list(t), device=rows_logits.device)
            lp = torch.log_softmax(rows_logits, -1).gather(-1, tgt[:, None]).sum()
            out.append((float(lp), bool(rows_logits.argmax(-1).eq(tgt).all())))
    return out


def _row_logp(lm, rows: Sequence[Row], deltas: Sequence[Delta]) -> torch.Tensor:
    """Differentiable log p(target | prompt) per row (through any tensor of ``deltas`` that requires grad)."""
    keep = max(len(t) for _, t in rows) + 1
    ids, attn, pos = pack_left(lm, [list(p) + list(t) for p, t in rows])
    with lm.active(list(deltas), include_global=False):
        logits = lm.model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep).logits.float()
    out = []
    for i, (_, t) in enumerate(rows):
        r = logits[i, keep - len(t) - 1 : keep - 1]
        out.append(torch.log_softmax(r, -1).gather(-1, torch.tensor(list(t), device=r.device)[:, None]).sum())
    return torch.stack(out)


def perplexity_with(lm, texts: Sequence[str], deltas: Sequence[Delta], batch_size: int = 32) -> float:
    rows = start_rows(lm, texts)
    total, count = 0.0, 0
    for (lp, _), (_, ids) in zip(score_rows(lm, rows, deltas, batch_size), rows):
        total, count = total + lp, count + len(ids)
    return math.exp(-total / max(1, count))


# -- the slots as parameters -------------------------------------------------------------------


class Slots:
    """The trained tensors of one calibration delta (one MLP, ``K`` and ``V``) as a flat vector."""

    def __init__(self, delta: Delta, parameters: str):
        if delta.kind != "ffn_slots" or len(delta.modules()) != 1:
            raise RepairError("a calibration delta must be ffn_slots on one module", "unsupported_delta")
        self.delta = delta
        self.path = delta.modules()[0]
        self.K = delta.get(self.path, "K").detach().float()
        self.V = delta.get(self.path, "V").detach().float()
        self.act_name = delta.act
        self.act = _ACTS[delta.act]
        self.with_k = parameters == "KV"

    @property
    def size(self) -> int:
        return (self.K.numel() if self.with_k else 0) + self.V.numel()

    def vector(self) -> torch.Tensor:
        return torch.cat([self.K.flatten(), self.V.flatten()]) if self.with_k else self.V.flatten().clone()

    def split(self, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.with_k:
            n = self.K.numel()
            return vec[:n].view_as(self.K), vec[n:].view_as(self.V)
        return self.K, vec.view_as(self.V)

    def as_delta(self, vec: torch.Tensor) -> Delta:
        k, v = self.split(vec)
        return Delta("ffn_slots", {f"{self.path}::K": k, f"{self.path}::V": v}, dict(self.delta.meta))

    def repair_delta(self, vec: torch.Tensor) -> Delta:
        """What to add on top of the stored delta so that the slots behave as ``vec``."""
        k, v = self.split(vec.detach())
        meta = {"act": self.act_name, "method": "repair"}
        if torch.equal(k, self.K):
            return Delta("ffn_slots", {f"{self.path}::K": self.K.clone(), f"{self.path}::V": (v - self.V).contiguous()}, meta)
        return Delta("ffn_slots", {f"{self.path}::K": torch.cat([self.K, k]).contiguous(),
                                   f"{self.path}::V": torch.cat([-self.V, v]).contiguous()}, meta)


def row_gradients(lm, slots: Slots, rows: Sequence[Row], fixed: Sequence[Delta], batch_size: int):
    """Per batch: (log p of each row, ∇ of each row's log p w.r.t. the slots [B, P]).

    One forward and one backward per batch: the slots' output is added by a hook as a leaf
    ``d``, so ``∂/∂d`` of the summed log-probabilities gives each row its own output gradient
    ``g`` (rows never attend to each other); the per-row gradients of K and V follow in closed
    form from the MLP input ``x`` and ``g``."""
    module = lm.arch.module(slots.path)
    K, V = slots.K.to(lm.device), slots.V.to(lm.device)
    box: dict[str, torch.Tensor] = {}

    def hook(_m, inputs, output):
        x = inputs[0].detach().float()
        out = output[0] if isinstance(output, tuple) else output
        d = (slots.act(x @ K.T) @ V).detach().requires_grad_(True)
        box["x"], box["d"] = x, d
        new = out + d.to(out.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            with _lock(lm), torch.enable_grad():
                logp = _row_logp(lm, chunk, fixed)
                (g,) = torch.autograd.grad(logp.sum(), [box["d"]])
            x = box["x"]
            with torch.enable_grad():
                pre = (x @ K.T).requires_grad_(True)
                h = slots.act(pre)
                (dpre,) = torch.autograd.grad(h, [pre], g @ V.T)
            gv = torch.einsum("btc,btd->bcd", h.detach(), g).flatten(1)
            if slots.with_k:
                gk = torch.einsum("btc,btd->bcd", dpre, x).flatten(1)
                grads = torch.cat([gk, gv], 1)
            else:
                grads = gv
            yield start, logp.detach().cpu(), grads.cpu()
    finally:
        handle.remove()


# -- the repair --------------------------------------------------------------------------------


class Curvature:
    """H, the curvature of the summed log-likelihood of a calibration's data, and H⁻¹v.

    ``diagonal``: ``H = n_rows · diag(mean over rows of the squared row gradient)``.
    ``empirical``: ``H = Gᵀ G`` with G the per-fact gradients [n_facts, P] (the empirical Fisher of
    the data, a fact being one datum), exact; its rank is at most the number of facts, so
    ``(λI + GᵀG)⁻¹ v = (v - Gᵀ (λI + G Gᵀ)⁻¹ G v) / λ`` (Woodbury) costs an n_facts² solve.
    Both are damped by ``damping`` × the mean of their diagonal. ``fisher`` is the damped diagonal
    (per row) in either case: the EWC penalty reads it."""

    def __init__(self, kind: str, fact_grads: torch.Tensor, row_sumsq: torch.Tensor, n_rows: int, damping: float):
        self.kind = kind
        fisher = row_sumsq / n_rows
        self.fisher = fisher + damping * float(fisher.mean().clamp(min=1e-12))
        self.diag = n_rows * self.fisher
        if kind == "diagonal":
            return
        G = fact_grads.double()
        self.G = G
        self.lam = damping * max(float(G.pow(2).sum()) / G.shape[1], 1e-12)
        gram = G @ G.T
        gram.diagonal().add_(self.lam)
        self.chol = torch.linalg.cholesky(gram)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """H⁻¹ v for v of shape [P]."""
        if self.kind == "diagonal":
            return v / self.diag
        v = v.double()
        inner = torch.cholesky_solve((self.G @ v)[:, None], self.chol)[:, 0]
        return ((v - self.G.T @ inner) / self.lam).float()


@dataclass
class _CalState:
    cal: ScopedCalibration
    slots: Slots
    rows: list[Row]
    row_fact: list[int]
    fact_grads: torch.Tensor  # [n_facts, P]
    fact_logp: torch.Tensor  # [n_facts]
    n_rows: int
    query_grad: torch.Tensor  # [P]
    curvature: Curvature


def _groups(questions: Sequence[Question], idx: Sequence[int], route: Sequence[str | None]) -> dict[str | None, list[int]]:
    out: dict[str | None, list[int]] = {}
    for i in idx:
        out.setdefault(route[i], []).append(i)
    return out


def repair(
    lm,
    questions: Sequence[Question],
    calibrations: Sequence[ScopedCalibration],
    edits: Sequence[ScopedEdit],
    *,
    background: Sequence[Delta] = (),
    routes: Sequence[str | None] | None = None,
    edit_deltas: dict[str, Delta] | None = None,
    config: RepairConfig | None = None,
    progress: ProgressFn | None = None,
    step_grid: Sequence[float] = STEP_GRID,
) -> RepairOutcome:
    """Identify the causes of the failing ``questions`` among the calibrations' facts and the
    edits in scope, treat the top-k and measure before and after.

    ``background`` are the served deltas outside the scope (other calibrations, repairs);
    ``routes[i]`` is the edit that serves question i (None: no edit), with its delta in
    ``edit_deltas`` (edits in scope or not). Nothing here changes what is served.
    """
    config = config or RepairConfig()
    t0 = time.perf_counter()
    routes = list(routes) if routes is not None else [None] * len(questions)
    edit_deltas = dict(edit_deltas or {})
    for e in edits:
        edit_deltas.setdefault(e.id, e.delta)
    query = [i for i, q in enumerate(questions) if q.half == "query"]
    heldout = [i for i, q in enumerate(questions) if q.half == "heldout"]
    if not query:
        raise RepairError("no failure could be turned into a question", "no_failures")
    qrows = [(q.prompt, q.target) for q in questions]
    cal_deltas = {c.id: c.delta for c in calibrations}
    bs = config.batch_size

    def served(extra: Sequence[Delta] = (), *, edit: str | None = None, without: set[str] | None = None,
               replace: dict[str, Delta] | None = None) -> list[Delta]:
        ds = list(background)
        for cid, d in cal_deltas.items():
            ds.append((replace or {}).get(cid, d))
        ds.extend(extra)
        if edit is not None and edit not in (without or set()) and edit in edit_deltas:
            ds.append(edit_deltas[edit])
        return ds

    def score_questions(idx: Sequence[int], extra: Sequence[Delta] = (), *, without: set[str] | None = None,
                        replace: dict[str, Delta] | None = None) -> dict[int, tuple[float, bool]]:
        res: dict[int, tuple[float, bool]] = {}
        for edit, members in _groups(questions, idx, routes).items():
            scores = score_rows(lm, [qrows[i] for i in members], served(extra, edit=edit, without=without, replace=replace), bs)
            res.update(zip(members, scores))
        return res

    # progress: one unit per training batch of each calibration, plus the stages after
    splits = {c.id: fact_splits(c.facts) for c in calibrations}
    rows_by_cal: dict[str, tuple[list[Row], list[int]]] = {}
    from app.methods.calinet.method import build_examples

    for c in calibrations:
        templates = [list(s.train)[: config.max_templates_per_fact] for s in splits[c.id]]
        examples = build_examples(lm, c.facts, templates)
        rows_by_cal[c.id] = ([(e.prompt, e.target) for e in examples if e.target], [e.fact for e in examples if e.target])
    total = sum(math.ceil(len(r) / bs) for r, _ in rows_by_cal.values()) + 4
    done = [0]

    def tick(loss: float = float("nan"), n: int = 1) -> None:
        done[0] += n
        if progress is not None:
            progress(min(done[0], total), total, loss)

    before = score_questions(range(len(questions)))

    # -- identification: calibration facts ------------------------------------------------------
    states: list[_CalState] = []
    causes: list[Cause] = []
    baselines: dict[str, dict[str, list[float]]] = {}
    for c in calibrations:
        slots = Slots(c.delta, config.parameters)
        rows, row_fact = rows_by_cal[c.id]
        n_facts = len(c.facts)
        fixed = [d for d in served() if d is not c.delta]
        fact_grads = torch.zeros(n_facts, slots.size)
        sumsq = torch.zeros(slots.size)
        fact_logp = torch.zeros(n_facts)
        for start, logp, grads in row_gradients(lm, slots, rows, fixed, bs):
            owners = torch.tensor(row_fact[start : start + len(logp)])
            fact_grads.index_add_(0, owners, grads)
            fact_logp.index_add_(0, owners, logp)
            sumsq += grads.pow(2).sum(0)
            tick(float(-logp.mean()))
        n_rows = max(1, len(rows))
        curvature = Curvature(config.curvature, fact_grads, sumsq, n_rows, config.damping)
        qgrad = torch.zeros(slots.size)
        for edit, members in _groups(questions, query, routes).items():
            fixed_q = [d for d in served(edit=edit) if d is not c.delta]
            for _, _, grads in row_gradients(lm, slots, [qrows[i] for i in members], fixed_q, bs):
                qgrad += grads.sum(0)
        st = _CalState(c, slots, rows, row_fact, fact_grads, fact_logp, n_rows, qgrad, curvature)
        states.append(st)
        influence = -(fact_grads @ curvature.solve(qgrad))
        if config.identify == "influence":
            scores = influence
        else:
            scores = _ewc_identify(lm, st, questions, query, routes, served, config)
        counts = torch.bincount(torch.tensor(row_fact, dtype=torch.long), minlength=n_facts).clamp(min=1).float()
        baselines[c.id] = {"loss": (-fact_logp / counts).tolist(), "influence": influence.tolist()}
        for i in range(n_facts):
            causes.append(Cause("calibration_fact", c.id, float(scores[i]), fact=i,
                                detail={"subject": c.facts[i].subject, "object": c.facts[i].object,
                                        "relation": c.facts[i].relation}))

    # -- identification: edits (exact leave-one-out on the query questions they serve) -----------
    query_by_edit = _groups(questions, query, routes)
    for e in edits:
        members = query_by_edit.get(e.id, [])
        if not members:
            causes.append(Cause("edit", e.id, 0.0, detail={"questions": 0}))
            continue
        with_e = [before[i][0] for i in members]
        without = score_questions(members, without={e.id})
        causes.append(Cause("edit", e.id, float(sum(without[i][0] - w for i, w in zip(members, with_e))),
                            detail={"questions": len(members)}))
    causes.sort(key=lambda c: c.score, reverse=True)
    identify_s = time.perf_counter() - t0
    tick()

    # -- treatment -----------------------------------------------------------------------------
    t1 = time.perf_counter()
    treated = [c for c in causes[: config.top_k] if c.score > 0]
    reverted = [c.id for c in treated if c.kind == "edit"]
    gone = set(reverted)
    new_vectors: dict[str, torch.Tensor] = {}
    step_report: list[dict[str, Any]] = []
    chosen_step: float | None = None
    fit_texts = generic_sentences("fit")[: config.guard_sentences]
    if config.treatment != "revert":
        by_cal = {st.cal.id: [c.fact for c in treated if c.kind == "calibration_fact" and c.id == st.cal.id] for st in states}
        if config.treatment == "newton":
            directions = {}
            for st in states:
                facts = by_cal[st.cal.id]
                if facts:
                    g_c = st.fact_grads[facts].sum(0)
                    directions[st.cal.id] = (st, st.curvature.solve(g_c))
            if directions:
                grid = [config.step_size] if config.step_size is not None else list(step_grid)
                ppl0 = perplexity_with(lm, fit_texts, served())
                treated_set = {(c.id, c.fact) for c in treated if c.kind == "calibration_fact"}
                kept = [(st.cal.id, r) for st in states for r, f in zip(st.rows, st.row_fact)
                        if (st.cal.id, f) not in treated_set]
                kept = random.Random(config.seed).sample(kept, min(len(kept), config.guard_rows))
                kept_rows = [r for _, r in kept]
                kept0 = sum(ok for _, ok in score_rows(lm, kept_rows, served(), bs)) / max(1, len(kept_rows))
                best = None
                for gamma in grid:
                    vecs = {cid: st.slots.vector() - gamma * u for cid, (st, u) in directions.items()}
                    repl = {cid: directions[cid][0].slots.as_delta(v) for cid, v in vecs.items()}
                    after_q = score_questions(query, replace=repl, without=gone)
                    fixed_n = sum(1 for i in query if not before[i][1] and after_q[i][1])
                    lp = sum(after_q[i][0] for i in query)
                    after_h = score_questions(heldout, replace=repl, without=gone) if heldout else {}
                    heldout_fixed = sum(1 for i in heldout if not before[i][1] and after_h[i][1])  # reported, never chosen on
                    ppl = perplexity_with(lm, fit_texts, served(replace=repl))
                    kept1 = (sum(ok for _, ok in score_rows(lm, kept_rows, served(replace=repl), bs)) / len(kept_rows)
                             if kept_rows else 1.0)
                    ok = ppl <= ppl0 * (1 + config.max_ppl_increase) and kept1 >= (kept0 if kept_rows else 1.0) - config.max_kept_drop
                    step_report.append({"step_size": gamma, "query_fixed": fixed_n, "heldout_fixed": heldout_fixed,
                                        "query_logp": lp,
                                        "fit_perplexity_ratio": ppl / ppl0, "kept_train_accuracy": kept1,
                                        "within_limits": ok})
                    key = (ok, fixed_n if ok else -gamma, -gamma)
                    if best is None or key > best[0]:
                        best = (key, gamma, vecs)
                    if not ok and best[0][0]:
                        break  # the grid grows: a larger step only moves further from the guards
                chosen_step = best[1]
                new_vectors = best[2]
        else:
            for st in states:
                facts = by_cal[st.cal.id]
                if config.treatment == "ewc" and not facts:
                    continue
                new_vectors[st.cal.id] = _optimise_treatment(lm, st, facts, questions, query, routes, served, config)
    deltas = {cid: next(st for st in states if st.cal.id == cid).slots.repair_delta(v) for cid, v in new_vectors.items()}
    treat_s = time.perf_counter() - t1
    tick()

    # -- measurement: what the repair would change -----------------------------------------------
    t2 = time.perf_counter()
    extra = list(deltas.values())
    after = score_questions(range(len(questions)), extra, without=gone)

    def half_report(idx: Sequence[int]) -> dict[str, Any]:
        failing = [i for i in idx if not before[i][1]]
        fixed = [i for i in failing if after[i][1]]
        broken = [i for i in idx if before[i][1] and not after[i][1]]
        return {
            "questions": len(idx), "failing_before": len(failing), "fixed": len(fixed), "broken": len(broken),
            "fixed_share": (len(fixed) / len(failing)) if failing else None,
            "logp_before": sum(before[i][0] for i in idx), "logp_after": sum(after[i][0] for i in idx),
        }

    treated_facts = {(c.id, c.fact) for c in treated if c.kind == "calibration_fact"}
    keep_rows: list[Row] = []
    for c in calibrations:
        for i, (f, s) in enumerate(zip(c.facts, splits[c.id])):
            if (c.id, i) in treated_facts:
                continue
            templates = list(s.test) or list(s.train)[:1]
            for t in templates:
                p, o, _ = encode_item(lm, ScoreItem(t, f.subject, f.object))
                if o:
                    keep_rows.append((tuple(p), tuple(o)))
    kept_before = score_rows(lm, keep_rows, served(), bs) if keep_rows else []
    kept_after = score_rows(lm, keep_rows, served(extra), bs) if keep_rows else []
    eval_texts = generic_sentences("eval")
    ppl_b, ppl_a = perplexity_with(lm, eval_texts, served()), perplexity_with(lm, eval_texts, served(extra))
    tick()
    report = {
        "identify": config.identify,
        "treatment": config.treatment,
        "data_in_scope": {"calibration_facts": sum(len(c.facts) for c in calibrations), "edits": len(edits)},
        "treated": len(treated),
        "step_size": chosen_step,
        "step_search": step_report,
        "failures": {"query": half_report(query), "heldout": half_report(heldout)},
        "remaining_facts": {
            "questions": len(keep_rows),
            "accuracy_before": (sum(ok for _, ok in kept_before) / len(keep_rows)) if keep_rows else None,
            "accuracy_after": (sum(ok for _, ok in kept_after) / len(keep_rows)) if keep_rows else None,
        },
        "perplexity_generic": {"before": ppl_b, "after": ppl_a, "ratio": ppl_a / ppl_b},
        "seconds": {"identify": round(identify_s, 2), "treat": round(treat_s, 2),
                    "measure": round(time.perf_counter() - t2, 2)},
    }
    return RepairOutcome(causes, treated, deltas, reverted, report, baselines)


def _fisher_penalty(st: _CalState, vec: torch.Tensor, theta0: torch.Tensor, l2: float) -> torch.Tensor:
    diff = vec - theta0
    return 0.5 * st.n_rows * (st.curvature.fisher.to(vec.device) * diff.pow(2)).sum() + 0.5 * l2 * diff.pow(2).sum()


def _optimise(lm, st: _CalState, objective, config: RepairConfig, *, penalty: bool) -> torch.Tensor:
    """Adam on the slots' vector: minimise ``objective(delta)`` (+ the Fisher penalty)."""
    theta0 = st.slots.vector().to(lm.device)
    vec = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([vec], lr=config.lr)
    for step in range(config.steps):
        with _lock(lm), torch.enable_grad():
            loss = objective(st.slots.as_delta(vec), step)
            if penalty:
                loss = loss + _fisher_penalty(st, vec, theta0, config.l2)
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=[vec])
        opt.step()
    return vec.detach().cpu()


def _ewc_identify(lm, st: _CalState, questions, query, routes, served, config: RepairConfig) -> torch.Tensor:
    """θ* = argmax log p(F_query|θ) - |D|/2 (θ-θ̂)ᵀF̂(θ-θ̂) - λ/2‖θ-θ̂‖²; r(z) = log p(z|θ̂) - log p(z|θ*)."""
    groups = _groups(questions, query, routes)
    qrows = {e: [(questions[i].prompt, questions[i].target) for i in m] for e, m in groups.items()}
    # Every step runs the same rows with only the slots changed: the blocks below theirs run once.
    first = lm.arch.block_of(st.slots.path)
    prefixes = {e: lm.prefix(first) for e in qrows}

    def objective(delta: Delta, _step: int) -> torch.Tensor:
        total = 0.0
        for e, rows in qrows.items():
            fixed = [d for d in served(edit=e) if d is not st.cal.delta]
            with prefixes[e].use():
                total = total - _row_logp(lm, rows, fixed + [delta]).sum()
        return total

    theta_star = _optimise(lm, st, objective, config, penalty=True)
    fixed = [d for d in served() if d is not st.cal.delta]
    new = score_rows(lm, st.rows, fixed + [st.slots.as_delta(theta_star)], config.batch_size)
    logp_star = torch.zeros(len(st.cal.facts))
    logp_star.index_add_(0, torch.tensor(st.row_fact), torch.tensor([lp for lp, _ in new]))
    return st.fact_logp - logp_star


def _optimise_treatment(lm, st: _CalState, facts: list[int], questions, query, routes, served, config) -> torch.Tensor:
    fixed = [d for d in served() if d is not st.cal.delta]
    rng = random.Random(config.seed)
    if config.treatment == "ewc":
        chosen = set(facts)
        crow = [r for r, f in zip(st.rows, st.row_fact) if f in chosen]

        def objective(delta: Delta, step: int) -> torch.Tensor:
            batch = crow if len(crow) <= config.batch_size else rng.sample(crow, config.batch_size)
            return _row_logp(lm, batch, fixed + [delta]).sum()

        return _optimise(lm, st, objective, config, penalty=True)
    # fine-tuning on the corrected data: the query failures with their right answers, and the
    # training rows of the facts not among the causes
    gone = set(facts)
    keep = [r for r, f in zip(st.rows, st.row_fact) if f not in gone]
    groups = _groups(questions, query, routes)
    qrows = [(e, (questions[i].prompt, questions[i].target)) for e, m in groups.items() for i in m]

    generic = [start + ids for start, ids in start_rows(lm, generic_sentences("fit")[: config.guard_sentences])]
    reference = served()

    def objective(delta: Delta, step: int) -> torch.Tensor:
        qb = qrows if len(qrows) <= config.batch_size else rng.sample(qrows, config.batch_size)
        loss = 0.0
        by_edit: dict[str | None, list[Row]] = {}
        for e, r in qb:
            by_edit.setdefault(e, []).append(r)
        for e, rows in by_edit.items():
            fx = [d for d in served(edit=e) if d is not st.cal.delta]
            loss = loss - _row_logp(lm, rows, fx + [delta]).sum()
        if keep:
            kb = keep if len(keep) <= config.batch_size else rng.sample(keep, config.batch_size)
            loss = loss - _row_logp(lm, kb, fixed + [delta]).sum() * (len(qb) / len(kb))
        loss = loss / max(1, len(qb))
        if config.kl_weight > 0 and generic:
            sample = rng.sample(generic, min(config.kl_sentences, len(generic)))
            loss = loss + config.kl_weight * generic_kl(lm, sample, fixed + [delta], reference, include_global=False)
        return loss

    return _optimise(lm, st, objective, config, penalty=False)


@register("repair")
class Repair(Method[RepairConfig]):
    """Repairs work on the deltas other methods produced; the service calls :func:`repair`."""

    config_class = RepairConfig
    accepts_edits = False

    def fit(self, lm, request, config: RepairConfig, progress: ProgressFn | None = None) -> FitResult:
        raise TypeError("repair is run by the repair service (POST /repairs), not fitted as an edit")


__all__ = [
    "Cause", "Failure", "Question", "Repair", "RepairConfig", "RepairError", "RepairOutcome", "ScopedCalibration",
    "ScopedEdit", "Slots", "build_questions", "perplexity_with", "repair", "row_gradients", "score_rows",
]
