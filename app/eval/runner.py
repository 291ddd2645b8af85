"""One evaluation run: the base model's numbers, then N edits, sequential or independent.

Sequential (the default) keeps every edit active and measures every edited case on the final
state, after all N edits, so forgetting shows; curves measure the cases edited so far every
``curve_every`` edits. Independent applies each edit alone, measures it and reverts it.

All inputs of the judgement are ones the edit never saw: the paraphrase (generalization), an
unrelated prompt (locality: does the greedy output stay what it was before any edit?) and a
held set of the dataset's own questions the base model answers right (performance
deterioration). Both datasets are scored in completion form by default: the target as the
continuation of the prompt (a zsRE question, a CounterFact sentence prefix) with nothing added;
``mode="chat"`` uses the service's chat form, ``mode="both"`` makes the edits once and measures
them in both forms (one row per form).

What a user sees, beyond the literature's numbers: questions of other relations about the edited
subject (subject locality, see :mod:`app.eval.pararel`), ROME's generation entropy and the share
of long answers repeating the target (on a seeded sample of ``fluency_n`` cases), and free-form
reliability (the chat answer, written until the model stops, names the target exactly once).
Re-edits of the same fact (same normalised subject and prompt) are scored against the latest
target; the superseded earlier edits are reported apart, not as failures.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, Field

from app.eval import metrics as M
from app.eval.backends import AnswerOutcome, Backend, BackendError, Mode, ScoreOutcome
from app.eval.datasets import Dataset, EditCase, load_dataset, select, supersede_plan
from app.eval.pararel import SubjectQuery, locality_conflicts, plan_subject_queries

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
BASE_METHOD = "none"  # no edits: only the base model's row


class EvalConfig(BaseModel):
    """Everything that defines a run; recorded verbatim in results.json."""

    dataset: Literal["zsre", "counterfact"] = Field(description="Dataset format of `file`.")
    file: Path = Field(description="Data file (JSON list, or JSON lines).")
    n: int = Field(default=200, gt=0, description="Number of cases to edit.")
    method: str = Field(default="pnp", description=f"Editing method; `{BASE_METHOD}` measures the base model only.")
    config: dict[str, Any] = Field(default_factory=dict, description="Method config sent with every edit.")
    sequential: bool = Field(default=True, description="Keep all edits active (else: each alone, then revert).")
    seed: int = Field(default=0, description="Seed of case sampling and bootstrap intervals.")
    shuffle: bool = Field(default=False, description="Edit a seeded sample instead of the first n records.")
    start: int = Field(default=0, ge=0, description="Skip this many usable records first (file order, before any shuffle).")
    curve_every: int | None = Field(
        default=None, ge=1, description="Measure the cases edited so far every k edits (unset: about 10 points)."
    )
    held: int = Field(default=50, ge=0, description="Largest held set (base-correct questions) for deterioration.")
    held_pool: int = Field(default=400, ge=0, description="Unedited records examined to build the held set.")
    held_min_accuracy: float = Field(
        default=1.0, gt=0, le=1.0,
        description="A held question counts as answered when this share of its truth's tokens is the argmax "
        "(1.0: all of them, i.e. greedy decoding writes the truth).",
    )
    mode: Literal["completion", "chat", "both"] = Field(
        default="completion", description="Prompt form for scoring and answers; `both`: edit once, measure in each form.")
    locality_tokens: int = Field(default=8, ge=1, description="Greedy tokens compared for locality exact match.")
    max_answer_tokens: int = Field(default=48, ge=1, description="Cap on greedy tokens generated per target.")
    n_boot: int = Field(default=2000, ge=100, description="Bootstrap resamples per interval.")
    latency_probe: int = Field(default=5, ge=0, description="Single-query answers timed before and after the edits.")
    subject_queries: int = Field(default=2, ge=0, description="Other-relation questions about each edited subject.")
    fluency_n: int = Field(
        default=200, ge=0,
        description="Seeded sample of cases for fluency, repeat rate and free-form reliability (0: all cases).")
    fluency_tokens: int = Field(default=100, ge=1, description="Greedy tokens of the long answers (fluency, repeats).")
    free_tokens: int = Field(default=64, ge=1, description="Token cap of the free-form (chat) answers.")
    base_from: Path | None = Field(
        default=None,
        description="results.json of a run on the same cases and settings (e.g. `--method none`) whose "
        "base-model measurements this run reuses instead of measuring them again; waited for (up to "
        "`base_wait` seconds) when the edits are done, so the two can run side by side.")
    base_wait: float = Field(default=4 * 3600.0, ge=0, description="Seconds to wait for `base_from` to appear.")
    base_reask: bool = Field(
        default=False,
        description="When `base_from` (already there at the start) asked other subject-locality questions than "
        "this run plans, ask this run's of the base model before the first edit instead of refusing the file.")

    def modes(self) -> list[Mode]:
        return ["completion", "chat"] if self.mode == "both" else [self.mode]  # type: ignore[list-item]

    def curve_step(self) -> int:
        return self.curve_every or max(1, self.n // 10)


@dataclass
class CaseResult:
    """Everything measured about one case; ``None`` where the record has no such input."""

    case_id: str
    prompt: str
    target: str
    edit_id: str | None = None
    success_after_edit: bool | None = None  # held (all target tokens argmax) right after its edit
    rel_tf: float | None = None
    rel_em: bool | None = None
    gen_tf: float | None = None
    gen_em: bool | None = None
    loc_tf: float | None = None
    loc_em: bool | None = None
    # case id of another edit of the run whose fact the locality prompt asks (sequential runs):
    # the prompt should reach that edit, so it is left out of locality and routing false positives
    loc_asks: str | None = None
    rel_answer: str | None = None
    gen_answer: str | None = None
    loc_before: str | None = None
    loc_after: str | None = None
    routed_prompt: str | None = None
    routed_paraphrase: str | None = None
    routed_locality: str | None = None
    edit_ms: float | None = None
    fit_ms: float | None = None
    edit_error: str | None = None  # the service refused or failed the edit (its error code)
    mode: str | None = None  # prompt form of every measurement in this record
    superseded_by: str | None = None  # case id of a later edit of the same fact (then not in the main rows)
    relation: str | None = None  # ParaRel relation(s) found for the case ("P19", "P106|P1303"), None: unknown
    subj_queries: list[str] | None = None  # subject locality: other relations' questions about the subject
    subj_before: list[str] | None = None
    subj_after: list[str] | None = None
    subj_routed: list[str | None] | None = None
    subj_loc: float | None = None  # share of subj_queries whose greedy answer is unchanged
    long_answers: list[str] | None = None  # fluency_tokens greedy answers to prompt and paraphrase
    ge: float | None = None  # ROME generation entropy of long_answers (x100, mean over them)
    repeats: list[bool] | None = None  # per long answer: names the target more than once
    free_answer: str | None = None  # chat answer to the prompt, up to free_tokens, until the model stops
    rel_free: bool | None = None  # free_answer names the target exactly once


@dataclass
class Reference:
    """Pre-edit state used for locality: each locality prompt's greedy output and its flags."""

    text: str
    correct: list[bool] | None
    accuracy: float | None = None  # the pre-edit model's own teacher-forced accuracy on ``text``


@dataclass
class EvalResult:
    config: dict[str, Any]
    dataset: dict[str, Any]
    model_id: str
    rows: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    fu: dict[str, Any] | None
    routing: dict[str, Any] | None
    timing: dict[str, Any]
    held: dict[str, Any]
    cases: list[dict[str, Any]]
    base_cases: list[dict[str, Any]]
    elapsed_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    superseded: dict[str, Any] = field(default_factory=dict)
    user_view: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Settings that must be equal for base-model measurements to be reused by another run.
BASE_ROW = "base (no edits)"  # the name of a run's unedited row (before its form, e.g. "(chat)")

BASE_KEYS = ("dataset", "n", "start", "shuffle", "seed", "held", "held_pool", "held_min_accuracy",
             "locality_tokens", "max_answer_tokens", "subject_queries", "fluency_n", "fluency_tokens", "free_tokens")


class BaseReuseError(RuntimeError):
    pass


def answer_budget(target: str, cap: int) -> int:
    """Greedy tokens enough to write the whole target (a token is at least one character)."""
    return max(4, min(cap, len(target.strip()) // 2 + 4))


class Runner:
    def __init__(self, backend: Backend, cfg: EvalConfig, progress: ProgressFn | None = None):
        self.b = backend
        self.cfg = cfg
        self.modes: list[Mode] = cfg.modes()
        self.mode: Mode = self.modes[0]
        self.subj: list[list[SubjectQuery]] = []
        self.fluency_idx: set[int] = set()
        self._report = progress or (lambda stage, done, total: None)
        self.batch_latencies: list[float] = []  # per query, amortised over a batch
        self.stage_s: dict[str, float] = {}  # wall seconds per stage of the run
        self._base_source: dict[str, Any] | None = None  # the --base-from run, once loaded
        # --base-reask: run indices whose subject questions were asked of the base model here, and the answers
        self._reasked: dict[str, tuple[list[int], list[dict[str, Any]]]] = {}
        self._stage_t0: dict[str, float] = {}

    def progress(self, stage: str, done: int, total: int) -> None:
        """Forward to the caller's progress callback and time the stage (first report to last)."""
        now = time.perf_counter()
        t0 = self._stage_t0.setdefault(stage, now)
        self.stage_s[stage] = round(now - t0, 3)
        self._report(stage, done, total)

    # -- backend helpers ---------------------------------------------------------------------------
    def _score(self, pairs: Sequence[tuple[str, str]]) -> list[ScoreOutcome]:
        return self.b.score(pairs, self.mode) if pairs else []

    def _generate(self, queries: Sequence[str], budgets: Sequence[int], mode: Mode | None = None) -> list[AnswerOutcome]:
        """Greedy answers, batched by budget (one max_new_tokens per request, so a query is always
        answered with its own budget, whatever else is measured beside it)."""
        order = sorted(range(len(queries)), key=lambda i: budgets[i])
        out: list[AnswerOutcome | None] = [None] * len(queries)
        batch = getattr(self.b, "batch", 32)
        chunks: list[list[int]] = []
        for i in order:
            if chunks and len(chunks[-1]) < batch and budgets[chunks[-1][0]] == budgets[i]:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        for idx in chunks:
            t0 = time.perf_counter()
            res = self.b.answer([queries[i] for i in idx], mode or self.mode, max(budgets[i] for i in idx))
            per_query = (time.perf_counter() - t0) * 1000.0 / len(idx)
            for i, r in zip(idx, res):
                out[i] = r
            self.batch_latencies.append(per_query)
        return out  # type: ignore[return-value]

    def probe_latency(self, queries: Sequence[str]) -> list[float]:
        """Client-side latency of single-query answers (one request each), in milliseconds."""
        times = []
        for q in queries[: self.cfg.latency_probe]:
            t0 = time.perf_counter()
            self.b.answer([q], self.mode, self.cfg.locality_tokens)
            times.append((time.perf_counter() - t0) * 1000.0)
        return times

    # -- measurement of a set of cases in the current state ----------------------------------------
    def measure_tf(self, cases: Sequence[EditCase], refs: dict[str, Reference]) -> dict[str, list]:
        """Teacher-forced scores of prompt, paraphrase and locality reference for ``cases``."""
        pairs: list[tuple[str, str]] = []
        slots: list[tuple[str, int]] = []
        for i, c in enumerate(cases):
            pairs.append((c.prompt, c.target)), slots.append(("rel", i))
            if c.paraphrase:
                pairs.append((c.paraphrase, c.target)), slots.append(("gen", i))
            ref = refs.get(c.case_id)
            if c.locality_prompt and ref is not None and ref.text.strip():
                pairs.append((c.locality_prompt, ref.text)), slots.append(("loc", i))
        res = self._score(pairs)
        out: dict[str, list] = {k: [None] * len(cases) for k in ("rel", "gen", "loc", "rel_s", "gen_s", "loc_s")}
        for (kind, i), r in zip(slots, res):
            out[kind + "_s"][i] = r
            if kind == "loc":
                ref = refs[cases[i].case_id]
                out[kind][i] = M.locality_token_agreement(ref.correct, r.correct, r.token_accuracy, ref.accuracy)
            else:
                out[kind][i] = r.token_accuracy
        return out

    def measure_greedy(self, cases: Sequence[EditCase]) -> dict[str, list[AnswerOutcome | None]]:
        queries: list[str] = []
        budgets: list[int] = []
        slots: list[tuple[str, int]] = []
        for i, c in enumerate(cases):
            b = answer_budget(c.target, self.cfg.max_answer_tokens)
            queries.append(c.prompt), budgets.append(b), slots.append(("rel", i))
            if c.paraphrase:
                queries.append(c.paraphrase), budgets.append(b), slots.append(("gen", i))
            if c.locality_prompt:
                queries.append(c.locality_prompt), budgets.append(self.cfg.locality_tokens), slots.append(("loc", i))
        res = self._generate(queries, budgets) if queries else []
        out: dict[str, list[AnswerOutcome | None]] = {k: [None] * len(cases) for k in ("rel", "gen", "loc")}
        for (kind, i), r in zip(slots, res):
            out[kind][i] = r
        return out

    def references(self, cases: Sequence[EditCase], loc_answers: Sequence[AnswerOutcome | None]) -> dict[str, Reference]:
        """Pre-edit greedy outputs of the locality prompts, with their own teacher-forced flags."""
        refs = {c.case_id: Reference(a.answer, None) for c, a in zip(cases, loc_answers) if a is not None}
        todo = [c for c in cases if c.case_id in refs and refs[c.case_id].text.strip()]
        for c, s in zip(todo, self._score([(c.locality_prompt, refs[c.case_id].text) for c in todo])):
            refs[c.case_id].correct, refs[c.case_id].accuracy = s.correct, s.token_accuracy
        return refs

    def fill(self, results: list[CaseResult], cases: Sequence[EditCase], tf: dict[str, list],
             greedy: dict[str, list], refs: dict[str, Reference]) -> None:
        for r, c, i in zip(results, cases, range(len(cases))):
            r.rel_tf, r.gen_tf, r.loc_tf = tf["rel"][i], tf["gen"][i], tf["loc"][i]
            rel, gen, loc = greedy["rel"][i], greedy["gen"][i], greedy["loc"][i]
            r.rel_answer = rel.answer if rel else None
            r.rel_em = M.greedy_exact_match(rel.answer, c.target) if rel else None
            r.gen_answer = gen.answer if gen else None
            r.gen_em = M.greedy_exact_match(gen.answer, c.target) if gen else None
            ref = refs.get(c.case_id)
            r.loc_after = loc.answer if loc else None
            r.loc_before = ref.text if ref else None
            r.loc_em = M.generation_agrees(ref.text, loc.answer) if (loc and ref) else None
            r.routed_prompt = rel.edit_id if rel else (tf["rel_s"][i].edit_id if tf["rel_s"][i] else None)
            r.routed_paraphrase = gen.edit_id if gen else None
            r.routed_locality = loc.edit_id if loc else None

    # -- held set (performance deterioration) ------------------------------------------------------
    def build_held(self, rest: Sequence[EditCase], edited: Sequence[EditCase]) -> tuple[list[EditCase], dict[str, Any]]:
        """Unedited questions whose original truth the base model already produces exactly."""
        edited_prompts = {c.prompt for c in edited}
        pool = [c for c in rest if c.truth and c.prompt not in edited_prompts][: self.cfg.held_pool]
        if not pool or self.cfg.held == 0:
            return [], {"pool": len(pool), "base_pool_accuracy": None, "size": 0}
        scores = self._score([(c.prompt, c.truth or "") for c in pool])
        right = [c for c, s in zip(pool, scores) if self._answered(s)]
        held = right[: self.cfg.held]
        return held, {"pool": len(pool), "base_pool_accuracy": len(right) / len(pool), "size": len(held)}

    def held_accuracy(self, held: Sequence[EditCase]) -> tuple[float | None, list[ScoreOutcome]]:
        if not held:
            return None, []
        scores = self._score([(c.prompt, c.truth or "") for c in held])
        return sum(self._answered(s) for s in scores) / len(scores), scores

    def _answered(self, s: ScoreOutcome) -> bool:
        if self.cfg.held_min_accuracy >= 1.0:
            return s.all_correct
        return s.token_accuracy >= self.cfg.held_min_accuracy - 1e-9

    # -- what a user sees: subject locality, long answers, free-form answers -----------------------
    def measure_user(self, cases: Sequence[EditCase], indices: Sequence[int]) -> list[dict[str, Any]]:
        """Subject-locality answers of ``cases`` (run indices ``indices``) and, for the fluency sample,
        long answers to prompt and paraphrase, in the current form; one batched pass."""
        queries: list[str] = []
        budgets: list[int] = []
        slots: list[tuple[int, str]] = []
        for j, (c, i) in enumerate(zip(cases, indices)):
            for q in self.subj[i] if i < len(self.subj) else []:
                queries.append(q.prompt), budgets.append(self.cfg.locality_tokens), slots.append((j, "subj"))
            if i in self.fluency_idx:
                for text in (c.prompt, c.paraphrase):
                    if text:
                        queries.append(text), budgets.append(self.cfg.fluency_tokens), slots.append((j, "long"))
        res = self._generate(queries, budgets) if queries else []
        out: list[dict[str, Any]] = [{"subj": [], "long": []} for _ in cases]
        for (j, kind), r in zip(slots, res):
            out[j][kind].append(r)
        return out

    def measure_free(self, cases: Sequence[EditCase], indices: Sequence[int]) -> list[AnswerOutcome | None]:
        """Chat answers to the prompts of the fluency sample, up to free_tokens (the model may stop first)."""
        todo = [j for j, i in enumerate(indices) if i in self.fluency_idx]
        res = self._generate([cases[j].prompt for j in todo], [self.cfg.free_tokens] * len(todo), mode="chat") \
            if todo else []
        out: list[AnswerOutcome | None] = [None] * len(cases)
        for j, r in zip(todo, res):
            out[j] = r
        return out

    def fill_user(self, results: Sequence[CaseResult], cases: Sequence[EditCase], user: Sequence[dict[str, Any]],
                  before: Sequence[CaseResult] | None, indices: Sequence[int] | None = None) -> None:
        """Per-case user-view numbers; ``before``: the same cases' pre-edit records (None: this is it)."""
        for j, (r, c, u) in enumerate(zip(results, cases, user)):
            if u["subj"]:
                if indices is not None:
                    r.subj_queries = [q.prompt for q in self.subj[indices[j]]]
                r.subj_after = [a.answer for a in u["subj"]]
                r.subj_routed = [a.edit_id for a in u["subj"]]
                r.subj_before = before[j].subj_after if before is not None else r.subj_after
                if r.subj_before is not None and len(r.subj_before) == len(r.subj_after):
                    same = [M.generation_agrees(b, a) for b, a in zip(r.subj_before, r.subj_after)]
                    r.subj_loc = sum(same) / len(same)
            if u["long"]:
                r.long_answers = [a.answer for a in u["long"]]
                r.ge = 100.0 * (M.n_gram_entropy(r.long_answers) or 0.0)
                r.repeats = [M.repeats_target(a, c.target) for a in r.long_answers]

    @staticmethod
    def fill_free(results: Sequence[CaseResult], cases: Sequence[EditCase], free: Sequence[AnswerOutcome | None]) -> None:
        for r, c, a in zip(results, cases, free):
            if a is not None:
                r.free_answer = a.answer
                r.rel_free = M.names_target_once(a.answer, c.target)

    def _prepare_user_view(self, cases: Sequence[EditCase], active: Sequence[int]) -> dict[str, Any]:
        cfg = self.cfg
        self.subj, rel_of = plan_subject_queries(cases, k=cfg.subject_queries, seed=cfg.seed)
        pool = list(active)
        size = len(pool) if cfg.fluency_n == 0 else min(cfg.fluency_n, len(pool))
        self.fluency_idx = set(random.Random(cfg.seed).sample(pool, size))
        self._relations = ["|".join(r) or None for r in rel_of]
        asks = locality_conflicts(cases, rel_of) if cfg.sequential else [None] * len(cases)
        self._loc_asks = [cases[j].case_id if j is not None else None for j in asks]
        return {
            "modes": list(self.modes),
            "subject_queries_per_case": cfg.subject_queries,
            "subject_relation_found": sum(1 for r in rel_of if len(r) == 1),
            "subject_relation_ambiguous": sum(1 for r in rel_of if len(r) > 1),
            "subject_relation_unknown": sum(1 for r in rel_of if not r),
            "subject_queries_total": sum(len(q) for q in self.subj),
            "locality_asks_another_edit": sum(1 for a in self._loc_asks if a is not None),
            "fluency_cases": size,
            "fluency_of": len(pool),
            "fluency_case_ids": sorted((cases[i].case_id for i in self.fluency_idx), key=str),
            "fluency_tokens": cfg.fluency_tokens,
            "free_tokens": cfg.free_tokens,
            "free_mode": "chat",
        }

    def _new_results(self, cases: Sequence[EditCase], sup: Sequence[int | None], mode: Mode) -> list[CaseResult]:
        rels = getattr(self, "_relations", [None] * len(cases))
        asks = getattr(self, "_loc_asks", [None] * len(cases))
        return [CaseResult(c.case_id, c.prompt, c.target, mode=mode, relation=rels[i], loc_asks=asks[i],
                           superseded_by=cases[sup[i]].case_id if sup[i] is not None else None)
                for i, c in enumerate(cases)]

    # -- rows --------------------------------------------------------------------------------------
    def row(self, name: str, results: Sequence[CaseResult], base: Sequence[CaseResult] | None = None,
            **extra: Any) -> dict[str, Any]:
        """Summary of ``results``; ``base``: the same cases before any edit (for the fluency change)."""
        seed, nb = self.cfg.seed, self.cfg.n_boot
        summ = lambda values: M.summarize(values, seed=seed, n_boot=nb).as_dict()  # noqa: E731
        row: dict[str, Any] = {"name": name, "n": len(results)}
        for attr in ("rel_tf", "rel_em", "gen_tf", "gen_em"):
            row[attr] = summ([getattr(r, attr) for r in results])
        for attr in ("loc_tf", "loc_em"):  # a locality prompt that asks another edit's fact is no locality test
            row[attr] = summ([getattr(r, attr) for r in results if r.loc_asks is None])
        row["locality_asks_another_edit"] = sum(1 for r in results if r.loc_asks is not None)
        row["subject_locality"] = summ([r.subj_loc for r in results])
        row["subject_locality_routed"] = sum(1 for r in results for e in (r.subj_routed or []) if e is not None)
        row["subject_locality_queries"] = sum(len(r.subj_routed or []) for r in results)
        ge = summ([r.ge for r in results])
        if base is None:
            ge_base = ge["mean"]
        else:  # the same cases before any edit, aligned with ``results``
            ge_base = M.mean_or_none([b.ge for r, b in zip(results, base) if r.ge is not None and b.ge is not None])
        row["fluency"] = {"ge": ge, "ge_base": ge_base, "ge_change": M.relative_change(ge["mean"], ge_base),
                          "answers": sum(len(r.long_answers or []) for r in results)}
        if base is not None:
            pairs = [(e, b) for r, c in zip(results, base) if r.long_answers and c.long_answers
                     and len(r.long_answers) == len(c.long_answers) for e, b in zip(r.long_answers, c.long_answers)]
            matched = M.matched_n_gram_entropy(pairs)
            if matched is not None:
                row["fluency"].update(ge_matched=100.0 * matched[0], ge_matched_base=100.0 * matched[1],
                                      ge_matched_change=M.relative_change(*matched))
        row["repeat_rate"] = summ([f for r in results for f in (r.repeats or [])])
        row["rel_free"] = summ([r.rel_free for r in results])
        row.update(extra)
        return row

    def _row_name(self, name: str, mode: Mode) -> str:
        return f"{name} ({mode})" if len(self.modes) > 1 else name

    # -- the run -----------------------------------------------------------------------------------
    def run(self, dataset: Dataset | None = None) -> EvalResult:
        t_start = time.perf_counter()
        cfg = self.cfg
        ds = dataset or load_dataset(cfg.dataset, cfg.file)
        cases, rest = select(ds.cases[cfg.start:], cfg.n, shuffle=cfg.shuffle, seed=cfg.seed)
        rest = rest + ds.cases[: cfg.start]  # held-set candidates: every record not edited
        model_id = self.b.model_id()
        editing = cfg.method != BASE_METHOD
        # Re-edits of one fact: only sequential runs keep the older edit around to be superseded.
        sup = supersede_plan(cases) if cfg.sequential and editing else [None] * len(cases)
        active = [i for i in range(len(cases)) if sup[i] is None]
        user_view = self._prepare_user_view(cases, active)
        free_mode: Mode = "chat" if "chat" in self.modes else self.modes[0]  # the row that shows rel_free
        indices = list(range(len(cases)))

        base_results: dict[str, list[CaseResult]] = {}
        refs: dict[str, dict[str, Reference]] = {m: {} for m in self.modes}
        helds: dict[str, tuple[list[EditCase], dict[str, Any]]] = {m: ([], {"pool": 0, "size": 0}) for m in self.modes}
        self._base_timing: dict[str, Any] | None = None
        probe = [c.locality_prompt or c.prompt for c in cases]  # single-query latency, before and after edits
        if cfg.base_from is None:
            for k, mode in enumerate(self.modes):
                self.mode = mode
                self.progress(f"base model ({mode})", 0, 1)
                res = self._new_results(cases, sup, mode)
                greedy = self.measure_greedy(cases)
                refs[mode] = self.references(cases, greedy["loc"])
                tf = self.measure_tf(cases, refs[mode])
                self.fill(res, cases, tf, greedy, refs[mode])
                self.fill_user(res, cases, self.measure_user(cases, indices), None, indices)
                helds[mode] = self.build_held(rest, cases)
                base_results[mode] = res
                self.progress(f"base model ({mode})", 1, 1)
            self.progress("base model (free-form)", 0, 1)
            self.fill_free(base_results[free_mode], cases, self.measure_free(cases, indices))
            self.progress("base model (free-form)", 1, 1)
            self.mode = self.modes[0]
            self._base_timing = {"answer_ms_base": M.latency_summary(self.probe_latency(probe)),
                                 "answer_batch_ms_per_query_base": M.latency_summary(self.batch_latencies)}
        else:
            # Measured by another run: loaded when the edits are done (see _load_base); a file that is
            # already there is checked now, so that a run with other settings stops before editing.
            self._base_target = (cases, rest, sup, model_id, ds.sha256, base_results, refs, helds, user_view)
            if Path(cfg.base_from).is_file():
                stale = self._check_base(json.loads(Path(cfg.base_from).read_text(encoding="utf-8")),
                                         Path(cfg.base_from), ds.sha256, model_id, cases, reask=cfg.base_reask)
                if stale:
                    self._reask_subject(cases, stale)

        curves: list[dict[str, Any]] = []
        fu = routing = None
        results: dict[str, list[CaseResult]] = {}
        held_acc: dict[str, float | None] = {m: None for m in self.modes}
        self.batch_latencies = []
        if editing:
            if cfg.sequential:
                results, curves, fu, routing, held_acc = self._sequential(cases, refs, helds, sup, base_results)
            else:
                results, routing, held_acc = self._independent(cases, refs, base_results, helds)
        edited_single = self.probe_latency(probe) if editing and cfg.sequential else []
        if cfg.base_from is not None:
            self._load_base()  # a no-op once loaded (a sequential run loads it before its final measurement)

        rows: list[dict[str, Any]] = []
        superseded: dict[str, Any] = {"count": sum(1 for s_ in sup if s_ is not None), "rows": []}
        for mode in self.modes:
            held = helds[mode][0]
            base_act = [base_results[mode][i] for i in active]
            rows.append(self.row(self._row_name(BASE_ROW, mode), base_act, mode=mode,
                                 held_accuracy=1.0 if held else None,
                                 performance_deterioration=0.0 if held else None, fu_ratio=None))
            if not editing:
                continue
            pd = M.performance_deterioration(1.0 if held else None, held_acc.get(mode))
            rows.append(self.row(self._row_name(cfg.method, mode), [results[mode][i] for i in active], base_act,
                                 mode=mode, held_accuracy=held_acc.get(mode), performance_deterioration=pd,
                                 fu_ratio=fu["ratio"] if fu else None))
            old = [i for i in indices if sup[i] is not None]
            if old:
                superseded["rows"].append(self.row(
                    self._row_name(f"{cfg.method}, superseded edits (own old targets)", mode),
                    [results[mode][i] for i in old], [base_results[mode][i] for i in old], mode=mode))
        first = self.modes[0]
        edited_first = results.get(first, [])
        timing = {
            "edit_wall_ms": M.latency_summary([r.edit_ms for r in edited_first if r.edit_ms is not None]),
            "edit_fit_ms": M.latency_summary([r.fit_ms for r in edited_first if r.fit_ms is not None]),
            **(self._base_timing or {}),
            "answer_ms_edited": M.latency_summary(edited_single),
            "answer_batch_ms_per_query_edited": M.latency_summary(self.batch_latencies),
            "stages_s": dict(self.stage_s),
        }
        held_info = dict(helds[first][1])
        held_info.update(case_ids=[c.case_id for c in helds[first][0]])
        if len(self.modes) > 1:
            held_info["by_mode"] = {m: {**helds[m][1], "case_ids": [c.case_id for c in helds[m][0]]} for m in self.modes}
        errors: dict[str, int] = {}
        for r in edited_first:
            if r.edit_error:
                errors[r.edit_error] = errors.get(r.edit_error, 0) + 1
        extra: dict[str, Any] = {"edit_errors": errors}
        if cfg.base_from is not None:
            extra["base_from"] = self._base_source
        return EvalResult(
            config=cfg.model_dump(mode="json"),
            dataset={"name": ds.name, "file": str(ds.path), "sha256": ds.sha256, "records": ds.total,
                     "usable": len(ds.cases), "skipped": ds.skipped, "skip_reasons": dict(ds.skip_reasons),
                     "edited": len(cases)},
            model_id=model_id, rows=rows, curves=curves, fu=fu, routing=routing, timing=timing, held=held_info,
            cases=[asdict(r) for m in self.modes for r in results.get(m, [])],
            base_cases=[asdict(r) for m in self.modes for r in base_results[m]],
            elapsed_s=time.perf_counter() - t_start,
            extra={**extra,
                   # the pre-edit references of locality, so that a later run can reuse this base model
                   "references": {m: {k: asdict(v) for k, v in refs[m].items()} for m in self.modes}},
            superseded=superseded, user_view=user_view,
        )

    def _check_base(self, data: dict[str, Any], path: Path, sha: str, model_id: str, cases: list[EditCase],
                    reask: bool = False) -> list[int]:
        """Refuse a base file made with other settings, data, model, cases or subject questions (checked
        before editing when the file is already there, so that a long run does not stop at its end).
        With ``reask``, cases whose subject questions differ are returned instead (to be asked here); cases
        already asked here (``self._reasked``) are not checked again."""
        other = data.get("config", {})
        diff = [k for k in BASE_KEYS if other.get(k, EvalConfig.model_fields[k].default) != getattr(self.cfg, k)]
        if diff:
            raise BaseReuseError(f"{path} was made with other settings: {', '.join(diff)}")
        if data.get("dataset", {}).get("sha256") != sha or data.get("model_id") != model_id:
            raise BaseReuseError(f"{path} was made on another data file or model")
        saved_refs = (data.get("extra") or {}).get("references") or {}
        stale: set[int] = set()
        for mode in self.modes:
            rows = [c for c in data.get("base_cases", []) if c.get("mode") == mode]
            if [c["case_id"] for c in rows] != [c.case_id for c in cases] or mode not in saved_refs:
                raise BaseReuseError(f"{path} has no base records of these cases in {mode} form")
            done = set(self._reasked[mode][0]) if mode in self._reasked else set()
            for i, d in enumerate(rows):  # the subject questions must be the ones this run asks
                if i in done:
                    continue
                asked = d.get("subj_queries")
                plan = [q.prompt for q in self.subj[i]]
                # A file that did not record its questions (an older harness) can only be checked by their
                # count; with ``reask`` every such case is asked again (the same count may be other questions).
                count_only = asked is None and not reask and len(d.get("subj_after") or []) == len(plan)
                if asked != plan and not count_only:
                    if not reask:
                        raise BaseReuseError(f"{path} asked other subject-locality questions (case {d['case_id']}); "
                                             "--base-reask asks the base model this run's before the first edit")
                    stale.add(i)
        return sorted(stale)

    def _reask_subject(self, cases: list[EditCase], stale: list[int]) -> None:
        """Ask the subject questions of cases ``stale`` of the base model (no edit made yet), in every form."""
        keep, self.fluency_idx = self.fluency_idx, set()  # subject questions only, no long answers
        try:
            for mode in self.modes:
                self.mode = mode
                self.progress(f"base model, subject questions ({mode})", 0, 1)
                self._reasked[mode] = (stale, self.measure_user([cases[i] for i in stale], stale))
                self.progress(f"base model, subject questions ({mode})", 1, 1)
        finally:
            self.fluency_idx, self.mode = keep, self.modes[0]

    def _load_base(self) -> None:
        """Fill the base-model state from ``cfg.base_from`` (waiting for the file): per-case base
        records, locality references, held sets, fluency sample and base timing. Refuses a file made
        on other cases, settings or model."""
        if self._base_source is not None:
            return
        cases, rest, sup, model_id, sha, base_results, refs, helds, user_view = self._base_target
        path = Path(self.cfg.base_from)
        deadline = time.monotonic() + self.cfg.base_wait
        self.progress("waiting for the base run", 0, 1)
        while not path.is_file():
            if time.monotonic() > deadline:
                raise BaseReuseError(f"{path} did not appear within {self.cfg.base_wait:.0f} s")
            time.sleep(10.0)
        self.progress("waiting for the base run", 1, 1)
        data = json.loads(path.read_text(encoding="utf-8"))
        self._check_base(data, path, sha, model_id, cases)
        saved_refs = (data.get("extra") or {}).get("references") or {}
        for mode in self.modes:
            rows = [c for c in data.get("base_cases", []) if c.get("mode") == mode]
            mine = self._new_results(cases, sup, mode)
            for r, d in zip(mine, rows):
                for f in fields(CaseResult):
                    if f.name not in ("mode", "relation", "superseded_by", "case_id", "prompt", "target", "loc_asks"):
                        setattr(r, f.name, d.get(f.name))
            if mode in self._reasked:
                idx, user = self._reasked[mode]
                for i in idx:
                    mine[i].subj_queries = mine[i].subj_before = mine[i].subj_after = None
                    mine[i].subj_routed, mine[i].subj_loc = None, None
                self.fill_user([mine[i] for i in idx], [cases[i] for i in idx], user, None, idx)
            base_results[mode] = mine
            refs[mode].update({k: Reference(**v) for k, v in saved_refs[mode].items()})
            held = data.get("held") or {}
            info = (held.get("by_mode") or {}).get(mode, held)
            by_id = {c.case_id: c for c in rest}
            held_cases = [by_id[i] for i in info.get("case_ids", []) if i in by_id]
            helds[mode] = (held_cases, {k: v for k, v in info.items() if k not in ("case_ids", "by_mode")})
        ids = set((data.get("user_view") or {}).get("fluency_case_ids") or [])
        self.fluency_idx = {i for i, c in enumerate(cases) if c.case_id in ids}
        user_view.update(fluency_cases=len(self.fluency_idx), fluency_case_ids=sorted(ids, key=str))
        t = data.get("timing") or {}
        self._base_timing = {k: t[k] for k in ("answer_ms_base", "answer_batch_ms_per_query_base") if k in t}
        env = data.get("env") or {}
        self._base_source = {"file": str(path), "commit": (env.get("git") or {}).get("commit"),
                             "date": env.get("date"), "elapsed_s": data.get("elapsed_s"),
                             "stages_s": t.get("stages_s"),
                             "subject_questions_asked_here": len(next(iter(self._reasked.values()))[0])
                             if self._reasked else 0}

    def _edit(self, case: EditCase, result: CaseResult) -> bool:
        """Apply one edit; a refusal (e.g. the target already holds) is recorded, not fatal."""
        try:
            out = self.b.edit(case, self.cfg.method, self.cfg.config)
        except BackendError as exc:
            if exc.status in (401, 403):
                raise
            if exc.code in ("unknown_method", "invalid_config"):
                raise
            result.edit_error = exc.code
            return False
        result.edit_id, result.edit_ms, result.fit_ms = out.id, out.wall_ms, out.fit_ms
        return True

    def _measure_all(self, cases, indices, results, refs, base_results, mode: Mode) -> None:
        """Every measurement of ``cases`` in the current state, in form ``mode``, into ``results``."""
        self.mode = mode
        tf = self.measure_tf(cases, refs[mode])
        greedy = self.measure_greedy(cases)
        self.fill(results, cases, tf, greedy, refs[mode])
        self.fill_user(results, cases, self.measure_user(cases, indices), [base_results[mode][i] for i in indices],
                       indices)
        return tf

    def _sequential(self, cases, refs, helds, sup, base_results):
        first = self.modes[0]
        results = {m: self._new_results(cases, sup, m) for m in self.modes}
        step = self.cfg.curve_step()
        curves: list[dict[str, Any]] = []
        self.mode = first
        self.progress("editing", 0, len(cases))
        for i, c in enumerate(cases):
            r = results[first][i]
            self._edit(c, r)
            for m in self.modes[1:]:
                results[m][i].edit_id, results[m][i].edit_error = r.edit_id, r.edit_error
                results[m][i].edit_ms, results[m][i].fit_ms = r.edit_ms, r.fit_ms
            r.success_after_edit = self._score([(c.prompt, c.target)])[0].all_correct
            for m in self.modes[1:]:
                results[m][i].success_after_edit = r.success_after_edit
            self.progress("editing", i + 1, len(cases))
            if (i + 1) % step == 0 or i + 1 == len(cases):
                live = [j for j, s_ in enumerate(supersede_plan(cases[: i + 1])) if s_ is None]
                curves.append(self._curve_point([cases[j] for j in live], [results[first][j] for j in live],
                                                refs[first], helds[first][0]))
        indices = list(range(len(cases)))
        if self.cfg.base_from is not None:
            self._load_base()
        held_acc: dict[str, float | None] = {}
        final_tf = None
        for m in self.modes:
            self.progress(f"final measurement ({m})", 0, 1)
            tf = self._measure_all(cases, indices, results[m], refs, base_results, m)
            if m == first:
                final_tf = tf
                held_first, held_scores = self.held_accuracy(helds[m][0])
                held_acc[m] = held_first
            else:
                held_acc[m], _ = self.held_accuracy(helds[m][0])
            self.progress(f"final measurement ({m})", 1, 1)
        free_mode = "chat" if "chat" in self.modes else first
        self.progress("final measurement (free-form)", 0, 1)
        self.fill_free(results[free_mode], cases, self.measure_free(cases, indices))
        self.progress("final measurement (free-form)", 1, 1)
        self.mode = first
        active = [i for i in indices if sup[i] is None]
        final_ok = [bool(final_tf["rel_s"][i] and final_tf["rel_s"][i].all_correct) for i in active]
        fu = M.fu_ratio([bool(results[first][i].success_after_edit) for i in active], final_ok).as_dict()
        routing = self._routing([results[first][i] for i in active], extra_out=[s.edit_id for s in held_scores])
        return results, curves, fu, routing, held_acc

    def _curve_point(self, cases, results, refs, held) -> dict[str, Any]:
        tf = self.measure_tf(cases, refs)
        held_acc, _ = self.held_accuracy(held)
        final_ok = [bool(s and s.all_correct) for s in tf["rel_s"]]
        fu = M.fu_ratio([bool(r.success_after_edit) for r in results], final_ok)
        return {
            "edits": len(cases),
            "rel_tf": M.mean_or_none(tf["rel"]),
            "gen_tf": M.mean_or_none(tf["gen"]),
            "loc_tf": M.mean_or_none([v for v, r in zip(tf["loc"], results) if r.loc_asks is None]),
            "rel_all_correct": M.mean_or_none(final_ok),
            "held_accuracy": held_acc,
            "fu_ratio": fu.ratio,
        }

    def _independent(self, cases, refs, base_results, helds):
        """Each edit alone: made, measured in every form (the held set too), reverted. Held accuracy is
        the mean over the edits of the held set's accuracy with that one edit in place (De Cao et al.'s
        performance deterioration of single edits)."""
        if self.cfg.base_from is not None:
            self._load_base()  # each edit is measured at once: the base state is needed from the start
        first = self.modes[0]
        sup = [None] * len(cases)
        results = {m: self._new_results(cases, sup, m) for m in self.modes}
        held_runs: dict[str, list[float]] = {m: [] for m in self.modes}
        held_out: list[str | None] = []
        free_mode = "chat" if "chat" in self.modes else first
        for i, c in enumerate(cases):
            r = results[first][i]
            self._edit(c, r)
            try:
                for m in self.modes:
                    rm = results[m][i]
                    rm.edit_id, rm.edit_error, rm.edit_ms, rm.fit_ms = r.edit_id, r.edit_error, r.edit_ms, r.fit_ms
                    tf = self._measure_all([c], [i], [rm], refs, base_results, m)
                    if m == first:
                        r.success_after_edit = bool(tf["rel_s"][0] and tf["rel_s"][0].all_correct)
                    acc, scores = self.held_accuracy(helds[m][0])
                    if acc is not None and r.edit_id is not None:
                        held_runs[m].append(acc)
                        if m == first:
                            held_out.extend(s.edit_id for s in scores)
                self.fill_free([results[free_mode][i]], [c], self.measure_free([c], [i]))
            finally:
                self.mode = first
                if r.edit_id is not None:
                    self.b.revert(r.edit_id)
            self.progress("editing", i + 1, len(cases))
        held_acc = {m: (sum(v) / len(v) if v else None) for m, v in held_runs.items()}
        return results, self._routing(results[first], extra_out=held_out), held_acc

    @staticmethod
    def _routing(results: Sequence[CaseResult], extra_out: Sequence[str | None] = ()) -> dict[str, Any]:
        in_scope: list[tuple[str, str | None]] = []
        out_scope: list[str | None] = list(extra_out)
        for r in results:
            if r.edit_id is None:
                continue
            in_scope.append((r.edit_id, r.routed_prompt))
            if r.gen_answer is not None:
                in_scope.append((r.edit_id, r.routed_paraphrase))
            if r.loc_after is not None and r.loc_asks is None:
                out_scope.append(r.routed_locality)
        return M.routing_confusion(in_scope, out_scope).as_dict()


def run_eval(backend: Backend, cfg: EvalConfig, progress: ProgressFn | None = None) -> EvalResult:
    return Runner(backend, cfg, progress).run()
