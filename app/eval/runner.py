"""One evaluation run: the base model's numbers, then N edits, sequential or independent.

Sequential (the default) keeps every edit active and measures every edited case on the final
state, after all N edits, so forgetting shows; curves measure the cases edited so far every
``curve_every`` edits. Independent applies each edit alone, measures it and reverts it.

All inputs of the judgement are ones the edit never saw: the paraphrase (generalization), an
unrelated prompt (locality: does the greedy output stay what it was before any edit?) and a
held set of the dataset's own questions the base model answers right (performance
deterioration). Both datasets are scored in completion form: the target as the continuation of
the prompt (a zsRE question, a CounterFact sentence prefix) with nothing added.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, Field

from app.eval import metrics as M
from app.eval.backends import AnswerOutcome, Backend, BackendError, Mode, ScoreOutcome
from app.eval.datasets import Dataset, EditCase, load_dataset, select

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
    mode: Literal["completion", "chat"] = Field(default="completion", description="Prompt form for scoring and answers.")
    locality_tokens: int = Field(default=8, ge=1, description="Greedy tokens compared for locality exact match.")
    max_answer_tokens: int = Field(default=48, ge=1, description="Cap on greedy tokens generated per target.")
    n_boot: int = Field(default=2000, ge=100, description="Bootstrap resamples per interval.")
    latency_probe: int = Field(default=5, ge=0, description="Single-query answers timed before and after the edits.")

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_budget(target: str, cap: int) -> int:
    """Greedy tokens enough to write the whole target (a token is at least one character)."""
    return max(4, min(cap, len(target.strip()) // 2 + 4))


class Runner:
    def __init__(self, backend: Backend, cfg: EvalConfig, progress: ProgressFn | None = None):
        self.b = backend
        self.cfg = cfg
        self.mode: Mode = cfg.mode
        self.progress = progress or (lambda stage, done, total: None)
        self.batch_latencies: list[float] = []  # per query, amortised over a batch

    # -- backend helpers ---------------------------------------------------------------------------
    def _score(self, pairs: Sequence[tuple[str, str]]) -> list[ScoreOutcome]:
        return self.b.score(pairs, self.mode) if pairs else []

    def _generate(self, queries: Sequence[str], budgets: Sequence[int]) -> list[AnswerOutcome]:
        """Greedy answers, batched by similar budget (one max_new_tokens per request)."""
        order = sorted(range(len(queries)), key=lambda i: budgets[i])
        out: list[AnswerOutcome | None] = [None] * len(queries)
        batch = getattr(self.b, "batch", 32)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            t0 = time.perf_counter()
            res = self.b.answer([queries[i] for i in idx], self.mode, max(budgets[i] for i in idx))
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

    # -- rows --------------------------------------------------------------------------------------
    def row(self, name: str, results: Sequence[CaseResult], **extra: Any) -> dict[str, Any]:
        seed, nb = self.cfg.seed, self.cfg.n_boot
        stat = lambda attr: M.summarize([getattr(r, attr) for r in results], seed=seed, n_boot=nb).as_dict()  # noqa: E731
        row = {"name": name, "n": len(results)}
        for attr in ("rel_tf", "rel_em", "gen_tf", "gen_em", "loc_tf", "loc_em"):
            row[attr] = stat(attr)
        row.update(extra)
        return row

    # -- the run -----------------------------------------------------------------------------------
    def run(self, dataset: Dataset | None = None) -> EvalResult:
        t_start = time.perf_counter()
        cfg = self.cfg
        ds = dataset or load_dataset(cfg.dataset, cfg.file)
        cases, rest = select(ds.cases, cfg.n, shuffle=cfg.shuffle, seed=cfg.seed)
        model_id = self.b.model_id()

        self.progress("base model", 0, 1)
        base_results = [CaseResult(c.case_id, c.prompt, c.target) for c in cases]
        base_greedy = self.measure_greedy(cases)
        refs = self.references(cases, base_greedy["loc"])
        base_tf = self.measure_tf(cases, refs)
        self.fill(base_results, cases, base_tf, base_greedy, refs)
        held, held_info = self.build_held(rest, cases)
        probe = [c.locality_prompt or c.prompt for c in cases]
        base_single = self.probe_latency(probe)
        base_batch = M.latency_summary(self.batch_latencies)
        self.progress("base model", 1, 1)
        rows = [self.row("base (no edits)", base_results, held_accuracy=1.0 if held else None,
                         performance_deterioration=0.0 if held else None, fu_ratio=None)]

        curves: list[dict[str, Any]] = []
        fu = routing = None
        results: list[CaseResult] = []
        self.batch_latencies = []
        if cfg.method != BASE_METHOD:
            if cfg.sequential:
                results, curves, fu, routing, held_acc = self._sequential(cases, refs, held)
            else:
                results, routing = self._independent(cases, refs)
                held_acc = None
            pd = M.performance_deterioration(1.0 if held else None, held_acc)
            rows.append(self.row(cfg.method, results, held_accuracy=held_acc, performance_deterioration=pd,
                                 fu_ratio=fu["ratio"] if fu else None))
        edited_single = self.probe_latency(probe) if cfg.method != BASE_METHOD and cfg.sequential else []
        timing = {
            "edit_wall_ms": M.latency_summary([r.edit_ms for r in results if r.edit_ms is not None]),
            "edit_fit_ms": M.latency_summary([r.fit_ms for r in results if r.fit_ms is not None]),
            "answer_ms_base": M.latency_summary(base_single),
            "answer_ms_edited": M.latency_summary(edited_single),
            "answer_batch_ms_per_query_base": base_batch,
            "answer_batch_ms_per_query_edited": M.latency_summary(self.batch_latencies),
        }
        held_info.update(case_ids=[c.case_id for c in held])
        errors: dict[str, int] = {}
        for r in results:
            if r.edit_error:
                errors[r.edit_error] = errors.get(r.edit_error, 0) + 1
        return EvalResult(
            config=cfg.model_dump(mode="json"),
            dataset={"name": ds.name, "file": str(ds.path), "sha256": ds.sha256, "records": ds.total,
                     "usable": len(ds.cases), "skipped": ds.skipped, "skip_reasons": dict(ds.skip_reasons),
                     "edited": len(cases)},
            model_id=model_id, rows=rows, curves=curves, fu=fu, routing=routing, timing=timing, held=held_info,
            cases=[asdict(r) for r in results], base_cases=[asdict(r) for r in base_results],
            elapsed_s=time.perf_counter() - t_start, extra={"edit_errors": errors},
        )

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

    def _sequential(self, cases, refs, held):
        results = [CaseResult(c.case_id, c.prompt, c.target) for c in cases]
        step = self.cfg.curve_step()
        curves: list[dict[str, Any]] = []
        for i, (c, r) in enumerate(zip(cases, results)):
            self._edit(c, r)
            r.success_after_edit = self._score([(c.prompt, c.target)])[0].all_correct
            self.progress("editing", i + 1, len(cases))
            if (i + 1) % step == 0 or i + 1 == len(cases):
                curves.append(self._curve_point(cases[: i + 1], results[: i + 1], refs, held))
        self.progress("final measurement", 0, 1)
        tf = self.measure_tf(cases, refs)
        greedy = self.measure_greedy(cases)
        self.fill(results, cases, tf, greedy, refs)
        held_acc, held_scores = self.held_accuracy(held)
        self.progress("final measurement", 1, 1)
        final_ok = [bool(s and s.all_correct) for s in tf["rel_s"]]
        fu = M.fu_ratio([bool(r.success_after_edit) for r in results], final_ok).as_dict()
        routing = self._routing(results, extra_out=[s.edit_id for s in held_scores])
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
            "loc_tf": M.mean_or_none(tf["loc"]),
            "rel_all_correct": M.mean_or_none(final_ok),
            "held_accuracy": held_acc,
            "fu_ratio": fu.ratio,
        }

    def _independent(self, cases, refs):
        results = [CaseResult(c.case_id, c.prompt, c.target) for c in cases]
        for i, (c, r) in enumerate(zip(cases, results)):
            self._edit(c, r)
            try:
                tf = self.measure_tf([c], refs)
                greedy = self.measure_greedy([c])
                self.fill([r], [c], tf, greedy, refs)
                r.success_after_edit = bool(tf["rel_s"][0] and tf["rel_s"][0].all_correct)
            finally:
                if r.edit_id is not None:
                    self.b.revert(r.edit_id)
            self.progress("editing", i + 1, len(cases))
        return results, self._routing(results)

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
            if r.loc_after is not None:
                out_scope.append(r.routed_locality)
        return M.routing_confusion(in_scope, out_scope).as_dict()


def run_eval(backend: Backend, cfg: EvalConfig, progress: ProgressFn | None = None) -> EvalResult:
    return Runner(backend, cfg, progress).run()
