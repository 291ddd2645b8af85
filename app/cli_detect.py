"""``factpatch detect``: how well CKA separates true facts from false ones on a facts file.

Each true fact is paired with a false one: the same subject and relation with the object of
another fact of the same relation. Scores compared (AUROC, true facts as positives): CKA, the
raw P(o | s, r) under the LAMA template, and rank-based assessment (rank of the object's first
token among all next tokens, and among the first tokens of the relation's candidate objects).
The pairs are split in two halves: design choices and the threshold are chosen on the dev half,
the numbers that matter are reported on the test half.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from app.knowledge.cka import (
    DEFAULT_ALPHA,
    DEFAULT_LENGTH_NORM,
    DEFAULT_SCORING,
    DEFAULT_THRESHOLD,
    DEFAULT_TOP_K,
    FactScores,
    auroc,
    best_threshold,
    first_token_id,
    judge,
    roc_curve,
    score_facts,
    validate_facts,
)
from app.knowledge.facts import Fact, corrupt_pairs, load_facts, object_pool
from app.knowledge.templates import load_relations

log = logging.getLogger(__name__)

VARIANT_ALPHAS = (0.0, 1e-6, 1e-4, 1e-2)


@dataclass
class DetectionReport:
    file: str
    relation: str | None
    n_pairs: int
    n_dev: int
    n_test: int
    seed: int
    top_k: int
    alpha: float
    scoring: str
    length_norm: bool
    threshold_default: float
    threshold_dev: float
    seconds: float
    date: str
    auroc_test: dict[str, float]
    auroc_all: dict[str, float]
    rates_test: dict[str, float]
    variants_dev: list[dict] = field(default_factory=list)
    per_relation_test: dict[str, dict] = field(default_factory=dict)
    command: str = ""


def candidate_ids(lm, pool: dict[str, list[str]], relations) -> dict[str, tuple[int, ...]]:
    """First tokens of every candidate object of each relation, as written after its LAMA prefix."""
    out = {}
    for rid, objects in pool.items():
        if rid not in relations:
            continue
        template = relations[rid].template
        out[rid] = tuple(sorted({first_token_id(lm, template, "X", o) for o in objects if o.strip()}))
    return out


def _cka_values(facts, scores, *, alpha, scoring, length_norm) -> np.ndarray:
    return np.array(
        [judge(f, s, alpha=alpha, scoring=scoring, length_norm=length_norm).cka for f, s in zip(facts, scores)]
    )


def run_detection(
    lm,
    all_facts: list[Fact],
    *,
    relation: str | None = None,
    n: int = 1000,
    seed: int = 0,
    top_k: int = DEFAULT_TOP_K,
    alpha: float = DEFAULT_ALPHA,
    scoring: str = DEFAULT_SCORING,
    length_norm: bool = DEFAULT_LENGTH_NORM,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 64,
    file: str = "",
) -> tuple[DetectionReport, dict]:
    """Score ``n`` true/false pairs once and derive every metric from those scores."""
    t0 = time.perf_counter()
    relations = load_relations()
    usable = [f for f in all_facts if f.relation in relations and f.subject.strip() and f.object.strip()]
    pool = object_pool(usable)
    chosen = [f for f in usable if relation is None or f.relation == relation]
    if n < len(chosen):
        chosen = random.Random(seed).sample(chosen, n)
    pairs = corrupt_pairs(chosen, pool, seed=seed, known=usable)
    if not pairs:
        raise typer.BadParameter("no fact could be paired with a false object")
    true_facts = [t for t, _ in pairs]
    false_facts = [f for _, f in pairs]
    cands = candidate_ids(lm, pool, relations)
    scores_true = score_facts(lm, true_facts, validate_facts(true_facts, max_facts=None), candidates=cands,
                              with_suffix=True, batch_size=batch_size)
    scores_false = score_facts(lm, false_facts, validate_facts(false_facts, max_facts=None), candidates=cands,
                               with_suffix=True, batch_size=batch_size)
    order = list(range(len(pairs)))
    random.Random(seed + 1).shuffle(order)
    dev, test = sorted(order[: len(order) // 2]), sorted(order[len(order) // 2 :])

    def metric_arrays(idx: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        tf, ff = [true_facts[i] for i in idx], [false_facts[i] for i in idx]
        st, sf = [scores_true[i] for i in idx], [scores_false[i] for i in idx]
        opts = dict(alpha=alpha, scoring=scoring, length_norm=length_norm)
        return {
            "cka": (_cka_values(tf, st, **opts), _cka_values(ff, sf, **opts)),
            "p_object": (_probs(st, scoring, length_norm), _probs(sf, scoring, length_norm)),
            "rank_vocab": (-np.array([s.main.first_rank for s in st]), -np.array([s.main.first_rank for s in sf])),
            "rank_candidates": (
                -np.array([s.main.candidate_rank for s in st]), -np.array([s.main.candidate_rank for s in sf])
            ),
        }

    test_arrays, dev_arrays, all_arrays = metric_arrays(test), metric_arrays(dev), metric_arrays(order)
    thr_dev = best_threshold(*dev_arrays["cka"])
    pos, neg = test_arrays["cka"]
    rank_pos, rank_neg = test_arrays["rank_vocab"]
    rates = {
        "false_rate_cka_default": float((pos < threshold).mean()),
        "detected_false_cka_default": float((neg < threshold).mean()),
        "false_rate_cka_dev_threshold": float((pos < thr_dev).mean()),
        "detected_false_cka_dev_threshold": float((neg < thr_dev).mean()),
        "false_rate_rank_topk": float((-rank_pos >= top_k).mean()),
        "detected_false_rank_topk": float((-rank_neg >= top_k).mean()),
        "auroc_rank_topk_binary": auroc((-rank_pos < top_k).astype(float), (-rank_neg < top_k).astype(float)),
    }
    report = DetectionReport(
        file=file, relation=relation, n_pairs=len(pairs), n_dev=len(dev), n_test=len(test), seed=seed,
        top_k=top_k, alpha=alpha, scoring=scoring, length_norm=length_norm, threshold_default=threshold,
        threshold_dev=thr_dev, seconds=round(time.perf_counter() - t0, 1),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        auroc_test={k: auroc(*v) for k, v in test_arrays.items()},
        auroc_all={k: auroc(*v) for k, v in all_arrays.items()},
        rates_test=rates,
        variants_dev=_variants(true_facts, false_facts, scores_true, scores_false, dev),
        per_relation_test=_per_relation(true_facts, test, test_arrays["cka"], threshold),
    )
    return report, test_arrays


def _probs(scores: list[FactScores], scoring: str, length_norm: bool) -> np.ndarray:
    return np.array([s.main.prob(scoring=scoring, length_norm=length_norm) for s in scores])


def _variants(true_facts, false_facts, scores_true, scores_false, idx) -> list[dict]:
    """AUROC on the dev half for each scoring choice: the measurement behind the defaults."""
    tf, ff = [true_facts[i] for i in idx], [false_facts[i] for i in idx]
    st, sf = [scores_true[i] for i in idx], [scores_false[i] for i in idx]
    rows = []
    for scoring in ("prefix", "sentence"):
        for length_norm in (False, True):
            row = {"scoring": scoring, "length_norm": length_norm,
                   "auroc_p_object": auroc(_probs(st, scoring, length_norm), _probs(sf, scoring, length_norm))}
            for alpha in VARIANT_ALPHAS:
                opts = dict(alpha=alpha, scoring=scoring, length_norm=length_norm)
                row[f"auroc_cka_alpha_{alpha:g}"] = auroc(_cka_values(tf, st, **opts), _cka_values(ff, sf, **opts))
            rows.append(row)
    return rows


def _per_relation(true_facts, idx, cka_arrays, threshold) -> dict[str, dict]:
    pos, neg = cka_arrays
    by_rel: dict[str, list[int]] = {}
    for j, i in enumerate(idx):
        by_rel.setdefault(true_facts[i].relation, []).append(j)
    return {
        rel: {"n": len(js), "auroc_cka": auroc(pos[js], neg[js]), "false_rate": float((pos[js] < threshold).mean())}
        for rel, js in sorted(by_rel.items())
    }


# -- output ----------------------------------------------------------------------------------

_LABELS = {
    "cka": "CKA",
    "p_object": "raw P(o|s,r)",
    "rank_vocab": "rank of o (all next tokens)",
    "rank_candidates": "rank of o (relation's candidate objects)",
}


def markdown(report: DetectionReport) -> str:
    r = report
    lines = [
        f"# CKA detection: {r.n_pairs} true/false pairs ({r.date})",
        "",
        *([f"`{r.command}`", ""] if r.command else []),
        f"File `{r.file}`, relation {r.relation or 'all'}, seed {r.seed}; false facts: same subject and relation, "
        f"object of another fact of the relation. Dev half {r.n_dev} pairs (choices, threshold), "
        f"test half {r.n_test} pairs (reported). Scoring `{r.scoring}`, length_norm {r.length_norm}, "
        f"alpha {r.alpha:g}; {r.seconds:.0f} s.",
        "",
        "| score | AUROC test | AUROC all |",
        "|---|---|---|",
    ]
    for k, label in _LABELS.items():
        lines.append(f"| {label} | {r.auroc_test[k]:.3f} | {r.auroc_all[k]:.3f} |")
    rt = r.rates_test
    lines += [
        f"| rank top-{r.top_k} (binary) | {rt['auroc_rank_topk_binary']:.3f} | |",
        "",
        "| assessment (test half) | true facts judged false (false rate) | false facts judged false |",
        "|---|---|---|",
        f"| CKA < {r.threshold_default:g} (default) | {rt['false_rate_cka_default']:.1%} | {rt['detected_false_cka_default']:.1%} |",
        f"| CKA < {r.threshold_dev:.3g} (best on dev) | {rt['false_rate_cka_dev_threshold']:.1%} | {rt['detected_false_cka_dev_threshold']:.1%} |",
        f"| first token not in top-{r.top_k} | {rt['false_rate_rank_topk']:.1%} | {rt['detected_false_rank_topk']:.1%} |",
        "",
        "Scoring choices, AUROC on the dev half:",
        "",
        "| scoring | length_norm | raw P | " + " | ".join(f"CKA a={a:g}" for a in VARIANT_ALPHAS) + " |",
        "|---|---|---|" + "---|" * len(VARIANT_ALPHAS),
    ]
    for v in r.variants_dev:
        cells = " | ".join(f"{v[f'auroc_cka_alpha_{a:g}']:.3f}" for a in VARIANT_ALPHAS)
        lines.append(f"| {v['scoring']} | {v['length_norm']} | {v['auroc_p_object']:.3f} | {cells} |")
    lines += ["", "Per relation (test half):", "", "| relation | n | AUROC CKA | false rate |", "|---|---|---|---|"]
    for rel, v in r.per_relation_test.items():
        lines.append(f"| {rel} | {v['n']} | {v['auroc_cka']:.3f} | {v['false_rate']:.1%} |")
    return "\n".join(lines) + "\n"


def print_table(report: DetectionReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"CKA detection, {report.n_test} test pairs")
    table.add_column("score")
    table.add_column("AUROC test", justify="right")
    table.add_column("AUROC all", justify="right")
    for k, label in _LABELS.items():
        table.add_row(label, f"{report.auroc_test[k]:.3f}", f"{report.auroc_all[k]:.3f}")
    console = Console()
    console.print(table)
    rt = report.rates_test
    console.print(
        f"false rate (true facts judged false): CKA<{report.threshold_default:g}: {rt['false_rate_cka_default']:.1%}; "
        f"CKA<{report.threshold_dev:.3g} (dev): {rt['false_rate_cka_dev_threshold']:.1%}; "
        f"rank>= {report.top_k}: {rt['false_rate_rank_topk']:.1%}"
    )


def plot(report: DetectionReport, arrays: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for k, label in _LABELS.items():
        fpr, tpr = roc_curve(*arrays[k])
        ax.plot(fpr, tpr, label=f"{label} ({report.auroc_test[k]:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false facts judged true (FPR)")
    ax.set_ylabel("true facts judged true (TPR)")
    ax.set_title(f"ROC, {report.n_test} test pairs")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_lm(model: str | None):
    from app.lm import LM
    from app.settings import get_settings

    settings = get_settings()
    return LM.load(model or settings.model, settings.home, settings.device, settings.dtype)


def detect(
    file: Path = typer.Option(..., "--file", help="JSON lines of facts: T-REx {sub_label, relation, obj_label} or {subject, relation, object}."),
    relation: Optional[str] = typer.Option(None, "--relation", help="Keep only this LAMA relation id (e.g. P36)."),
    n: int = typer.Option(1000, "--n", min=2, help="Number of true facts (each paired with a false one)."),
    out: Path = typer.Option(Path("results/detect"), "--out", help="Folder for detect.md, detect.json and roc.png."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample, the false objects and the dev/test halves."),
    top_k: int = typer.Option(DEFAULT_TOP_K, "--top-k", min=1, help="k of the rank-based assessment."),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, "--threshold", help="CKA below this: judged false."),
    alpha: float = typer.Option(DEFAULT_ALPHA, "--alpha", min=0.0, help="Smoothing constant of CKA."),
    scoring: str = typer.Option(DEFAULT_SCORING, "--scoring", help="prefix (object after the text before [Y]) or sentence (object plus the rest)."),
    length_norm: bool = typer.Option(DEFAULT_LENGTH_NORM, "--length-norm/--no-length-norm", help="Per-token geometric mean instead of the product."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Prompts per forward pass."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: FACTPATCH_MODEL)."),
) -> None:
    """Measure CKA against raw probability and rank-based assessment on true vs corrupted facts."""
    if scoring not in ("prefix", "sentence"):
        raise typer.BadParameter("--scoring must be prefix or sentence")
    lm = load_lm(model)
    all_facts = load_facts(file)
    report, arrays = run_detection(
        lm, all_facts, relation=relation, n=n, seed=seed, top_k=top_k, alpha=alpha, scoring=scoring,
        length_norm=length_norm, threshold=threshold, batch_size=batch_size, file=str(file),
    )
    from app.eval.cli import command_text

    report.command = command_text("detect")
    out.mkdir(parents=True, exist_ok=True)
    (out / "detect.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    (out / "detect.md").write_text(markdown(report))
    plot(report, arrays, out / "roc.png")
    print_table(report)
    typer.echo(f"wrote {out / 'detect.md'}, {out / 'detect.json'}, {out / 'roc.png'}")


if __name__ == "__main__":
    typer.run(detect)
