"""``factpatch detect``: how well each detection score tells true facts from false ones.

Two measurements from one pass of the model:

* T-REx pairs: each true fact against a false one (same subject and relation, the object of
  another fact of the relation); AUROC of every score, true facts as positives.
* Candidate sentences: a template of the relation with a blank in the subject slot (two thirds)
  or the object slot, the true filler and three false fillers of the same relation; top-1 (the
  true filler scores highest) per score, overall and per slot, and verdict accuracy (true
  fillers judged true, false fillers judged false).

Items are split by (relation, subject) into a tuning half and a held-out half
(``app.knowledge.sentences.fact_split``): the scoring choices (paraphrases, weight of the false
relations) and a threshold per score are chosen on the tuning half, and the held-out half is
reported. The raw per-template measurements are written too (``measurements.json``), so the
report can be rebuilt without the model (``--from-measurements``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from app.knowledge.cka import auroc, best_threshold, roc_curve
from app.knowledge.facts import Fact, corrupt_pairs, load_facts, object_pool, resolve
from app.knowledge.sentences import build_sentences, fact_split, sentence_facts
from app.knowledge.statement import (
    DEFAULT_ALPHA,
    DEFAULT_NEGATIVE_WEIGHT,
    DEFAULT_PARAPHRASES,
    DEFAULT_PMI_WEIGHT,
    DEFAULT_THRESHOLDS,
    StatementScores,
    all_scores,
    measure,
)
from app.knowledge.templates import load_relations

log = logging.getLogger(__name__)

SCORES = ("contrast", "pmi", "cka_paper", "p_object")
LABELS = {
    "contrast": "contrast (default): log P(o|s,r) + β · PMI over paraphrases − w · false relations",
    "pmi": "PMI of the filled sentences over paraphrases",
    "cka_paper": "CKA (Dong et al. 2022)",
    "p_object": "raw P(o|s,r)",
}
GRID_PARAPHRASES = (1, 2, 4)
GRID_PMI_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.4)
GRID_WEIGHTS = (0.0, 0.1, 0.25, 1.0)


# -- measuring -------------------------------------------------------------------------------


def measure_sets(lm, all_facts: list[Fact], *, n: int, n_sentences: int, seed: int, max_paraphrases: int,
                 batch_size: int) -> dict:
    """Build the T-REx pairs and candidate sentences and score every filled sentence once."""
    relations = load_relations()
    usable = [f for f in all_facts if f.relation in relations and f.subject.strip() and f.object.strip()]
    pool = object_pool(usable)
    chosen = random.Random(seed).sample(usable, min(n, len(usable)))
    pairs = corrupt_pairs(chosen, pool, seed=seed, known=usable)
    sents = build_sentences(usable, n=n_sentences, seed=seed + 1, relations=relations)
    sent_facts = [sentence_facts(cs.sentence, cs.candidates, cs.relation, relations)[1] for cs in sents]
    flat = [f for t, c in pairs for f in (t, c)] + [f for fs in sent_facts for f in fs]
    m = measure(lm, flat, [resolve(f, relations) for f in flat], paraphrases=max_paraphrases, batch_size=batch_size)
    out = {"pairs": [], "sentences": []}
    for i, (t, c) in enumerate(pairs):
        out["pairs"].append({"split": fact_split(t), "relation": t.relation, "subject": t.subject, "object": t.object,
                             "false_object": c.object, "true": asdict(m[2 * i]), "false": asdict(m[2 * i + 1])})
    k = 2 * len(pairs)
    for cs, fs in zip(sents, sent_facts):
        out["sentences"].append({**asdict(cs), "scores": [asdict(x) for x in m[k : k + len(fs)]]})
        k += len(fs)
    return out


def _stmt(d: dict) -> StatementScores:
    return StatementScores(**{**d, "obj_logprob_negative": [tuple(x) for x in d["obj_logprob_negative"]],
                              "parts": [tuple(x) for x in d["parts"]]})


def score_of(d: dict, name: str, *, paraphrases: int, weight: float, pmi_weight: float = DEFAULT_PMI_WEIGHT) -> float:
    """One score of one measured fact, with ``paraphrases`` true templates, the weight of the
    false relations and of the PMI term."""
    s = _stmt(d)
    n = len(s.pmi_true)
    k = max(1, min(paraphrases, n))
    s = StatementScores(pmi_true=s.pmi_true[:k], pmi_negative=s.pmi_negative, obj_logprob=s.obj_logprob,
                        obj_tokens=s.obj_tokens, obj_logprob_negative=s.obj_logprob_negative,
                        parts=s.parts[:k] + s.parts[n:])
    return all_scores(s, negative_weight=weight, pmi_weight=pmi_weight, alpha=DEFAULT_ALPHA)[name]


# -- metrics ---------------------------------------------------------------------------------


def metrics(data: dict, split: str, name: str, *, threshold: float | None = None, **kw) -> dict:
    pairs = [p for p in data["pairs"] if p["split"] == split]
    sents = [s for s in data["sentences"] if s["split"] == split]
    sc = lambda d: score_of(d, name, **kw)  # noqa: E731
    pos, neg = np.array([sc(p["true"]) for p in pairs]), np.array([sc(p["false"]) for p in pairs])
    top, by_slot, t_true, t_false = [], {"subject": [], "object": []}, [], []
    for s in sents:
        v = [sc(m) for m in s["scores"]]
        ok = bool(int(np.nanargmax(v)) == s["answer"]) if not all(math.isnan(x) for x in v) else False
        top.append(ok)
        by_slot[s["blank"]].append(ok)
        t_true.append(v[s["answer"]])
        t_false += [x for j, x in enumerate(v) if j != s["answer"]]
    out = {
        "n_pairs": len(pairs), "n_sentences": len(sents),
        "n_subject": len(by_slot["subject"]), "n_object": len(by_slot["object"]),
        "auroc_pairs": auroc(pos, neg),
        "top1": float(np.mean(top)) if top else float("nan"),
        "top1_subject": float(np.mean(by_slot["subject"])) if by_slot["subject"] else float("nan"),
        "top1_object": float(np.mean(by_slot["object"])) if by_slot["object"] else float("nan"),
        "auroc_sentence_fillers": auroc(t_true, t_false),
    }
    if threshold is not None:
        out.update({
            "threshold": threshold,
            "pairs_true_judged_true": float((pos >= threshold).mean()),
            "pairs_false_judged_false": float((neg < threshold).mean()),
            "sentences_true_judged_true": float((np.array(t_true) >= threshold).mean()),
            "sentences_false_judged_false": float((np.array(t_false) < threshold).mean()),
        })
    return out


def _values(data: dict, split: str, name: str, **kw) -> tuple[list[float], list[float]]:
    """(true, false) values of every item of a split: pairs and sentence fillers together."""
    pos, neg = [], []
    for p in data["pairs"]:
        if p["split"] == split:
            pos.append(score_of(p["true"], name, **kw))
            neg.append(score_of(p["false"], name, **kw))
    for s in data["sentences"]:
        if s["split"] == split:
            for j, m in enumerate(s["scores"]):
                (pos if j == s["answer"] else neg).append(score_of(m, name, **kw))
    return pos, neg


def report(data: dict, *, paraphrases: int, weight: float, pmi_weight: float, thresholds: dict[str, float]) -> dict:
    """Grid on the tuning half, thresholds tuned there, every score on both halves."""
    grid = []
    for k in GRID_PARAPHRASES:
        for b in GRID_PMI_WEIGHTS:
            for w in GRID_WEIGHTS:
                m = metrics(data, "tune", "contrast", paraphrases=k, weight=w, pmi_weight=b)
                grid.append({"paraphrases": k, "pmi_weight": b, "weight": w, **{x: m[x] for x in
                             ("auroc_pairs", "top1", "top1_subject", "top1_object")}})
    kw = dict(paraphrases=paraphrases, weight=weight, pmi_weight=pmi_weight)
    tuned_thresholds = {}
    for name in SCORES:
        pos, neg = _values(data, "tune", name, **kw)
        tuned_thresholds[name] = best_threshold(pos, neg)
    rows = {}
    for split in ("tune", "heldout"):
        rows[split] = {}
        for name in SCORES:
            rows[split][name] = {
                "default_threshold": metrics(data, split, name, threshold=thresholds[name], **kw),
                "tuned_threshold": metrics(data, split, name, threshold=tuned_thresholds[name], **kw),
            }
    return {"grid_tune": grid, "thresholds_default": thresholds, "thresholds_tuned": tuned_thresholds,
            "splits": rows}


# -- output ----------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    h = r["splits"]["heldout"]
    first = h["contrast"]["default_threshold"]
    lines = [
        f"# Detection scores: T-REx pairs and candidate sentences ({r['date']})", "",
        *([f"`{r['command']}`", ""] if r.get("command") else []),
        *([f"Measurements made by `{r['measured_by']}`; the report is rebuilt from them by the command above.", ""]
          if r.get("measured_by") and r.get("measured_by") != r.get("command") else []),
        f"Model `{r['model']}`; file `{r['file']}`; seed {r['seed']}; {r['seconds']:.0f} s. "
        f"Held-out half (never tuned on): {first['n_pairs']} T-REx true/corrupted pairs, "
        f"{first['n_sentences']} candidate sentences ({first['n_subject']} with the blank in the subject slot, "
        f"{first['n_object']} in the object slot; 1 true + 3 false fillers of the relation). "
        f"Default score `contrast` with {r['paraphrases']} templates per relation, PMI weight β = "
        f"{r['pmi_weight']:g} and false-relation weight w = {r['weight']:g}.", "",
        "| score | AUROC pairs | top-1 sentences | top-1 blank subject | top-1 blank object | AUROC sentence fillers |",
        "|---|---|---|---|---|---|",
    ]
    for name in SCORES:
        m = h[name]["default_threshold"]
        lines.append(f"| {LABELS[name]} | {m['auroc_pairs']:.3f} | {m['top1']:.0%} | {m['top1_subject']:.0%} | "
                     f"{m['top1_object']:.0%} | {m['auroc_sentence_fillers']:.3f} |")
    lines += [
        "", "Verdicts on the held-out half (score ≥ threshold: \"true\"); default thresholds are the service's, "
        "tuned ones are chosen on the tuning half (best balanced accuracy over its pairs and fillers):", "",
        "| score | threshold | pairs: true judged true | pairs: false judged false | sentences: true judged true | "
        "sentences: false judged false |",
        "|---|---|---|---|---|---|",
    ]
    for name in SCORES:
        for kind in ("default_threshold", "tuned_threshold"):
            m = h[name][kind]
            lines.append(f"| {name} | {m['threshold']:.4g} ({kind.split('_')[0]}) | {m['pairs_true_judged_true']:.0%} | "
                         f"{m['pairs_false_judged_false']:.0%} | {m['sentences_true_judged_true']:.0%} | "
                         f"{m['sentences_false_judged_false']:.0%} |")
    t = r["splits"]["tune"]
    lines += ["", "Tuning half, same scores:", "",
              "| score | AUROC pairs | top-1 | top-1 subject | top-1 object |", "|---|---|---|---|---|"]
    for name in SCORES:
        m = t[name]["default_threshold"]
        lines.append(f"| {name} | {m['auroc_pairs']:.3f} | {m['top1']:.0%} | {m['top1_subject']:.0%} | "
                     f"{m['top1_object']:.0%} |")
    lines += ["", "Choices of `contrast` on the tuning half (templates per relation k, PMI weight β, weight of the "
              "false relations w; β = 0, w = 0 is raw log P(o|s,r), β = 0, w = 1 is log CKA with geometric means):",
              "", "| k | β | w | AUROC pairs | top-1 | top-1 subject | top-1 object |", "|---|---|---|---|---|---|---|"]
    for g in r["grid_tune"]:
        lines.append(f"| {g['paraphrases']} | {g['pmi_weight']:g} | {g['weight']:g} | {g['auroc_pairs']:.3f} | "
                     f"{g['top1']:.0%} | {g['top1_subject']:.0%} | {g['top1_object']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kw = dict(paraphrases=r["paraphrases"], weight=r["weight"], pmi_weight=r["pmi_weight"])
    h = r["splits"]["heldout"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 5))
    for name in SCORES:
        pos = [score_of(p["true"], name, **kw) for p in data["pairs"] if p["split"] == "heldout"]
        neg = [score_of(p["false"], name, **kw) for p in data["pairs"] if p["split"] == "heldout"]
        fpr, tpr = roc_curve(pos, neg)
        a1.plot(fpr, tpr, label=f"{name} ({h[name]['default_threshold']['auroc_pairs']:.3f})")
    a1.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    a1.set_xlabel("corrupted facts judged true (FPR)")
    a1.set_ylabel("true facts judged true (TPR)")
    a1.set_title("T-REx pairs, held out: ROC")
    a1.legend(loc="lower right", fontsize=8)
    x = np.arange(3)
    width = 0.8 / len(SCORES)
    for i, name in enumerate(SCORES):
        m = h[name]["default_threshold"]
        a2.bar(x + i * width, [m["top1"], m["top1_subject"], m["top1_object"]], width, label=name)
    a2.axhline(0.25, color="grey", linestyle=":", linewidth=1)
    a2.set_xticks(x + width * (len(SCORES) - 1) / 2, ["all", "blank subject", "blank object"])
    a2.set_ylim(0, 1)
    a2.set_ylabel("true filler ranked first")
    a2.set_title("Candidate sentences (4 fillers), held out")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def load_lm(model: str | None):
    from app.lm import LM
    from app.settings import get_settings

    settings = get_settings()
    return LM.load(model or settings.model, settings.home, settings.device, settings.dtype)


def detect(
    file: Optional[Path] = typer.Option(None, "--file", help="JSON lines of facts: T-REx {sub_label, relation, obj_label} or {subject, relation, object}."),
    n: int = typer.Option(200, "--n", min=2, help="T-REx true facts, each paired with a corrupted one."),
    sentences: int = typer.Option(90, "--sentences", min=0, help="Candidate sentences (1 true + 3 false fillers)."),
    out: Path = typer.Option(Path("results/detect"), "--out", help="Folder for detect.md, detect.json, measurements.json, detect.png."),
    seed: int = typer.Option(0, "--seed", help="Seed of the samples and the false fillers."),
    paraphrases: int = typer.Option(DEFAULT_PARAPHRASES, "--paraphrases", min=1, help="True templates per relation for the reported scores."),
    weight: float = typer.Option(DEFAULT_NEGATIVE_WEIGHT, "--negative-weight", help="Weight of the false relations in `contrast`."),
    pmi_weight: float = typer.Option(DEFAULT_PMI_WEIGHT, "--pmi-weight", help="Weight of the PMI term in `contrast`."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Sentences per forward pass."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: FACTPATCH_MODEL)."),
    from_measurements: Optional[Path] = typer.Option(None, "--from-measurements", help="Rebuild the report from a measurements.json (no model)."),
) -> None:
    """AUROC of every detection score on T-REx pairs and top-1 on candidate sentences, side by side."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if from_measurements:
        saved = json.loads(from_measurements.read_text())
        data, meta = saved["data"], saved["meta"]
    else:
        if file is None:
            raise typer.BadParameter("give --file (or --from-measurements)")
        lm = load_lm(model)
        data = measure_sets(lm, load_facts(file), n=n, n_sentences=sentences, seed=seed,
                            max_paraphrases=max(GRID_PARAPHRASES), batch_size=batch_size)
        from app.cli.common import command_text as _cmd

        meta = {"model": lm.name, "file": str(file), "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                "measured_by": _cmd("detect")}
    r = report(data, paraphrases=paraphrases, weight=weight, pmi_weight=pmi_weight, thresholds=dict(DEFAULT_THRESHOLDS))
    from app.cli.common import command_text

    r.update(meta, paraphrases=paraphrases, weight=weight, pmi_weight=pmi_weight, command=command_text("detect"),
             date=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    out.mkdir(parents=True, exist_ok=True)
    if not from_measurements:
        (out / "measurements.json").write_text(json.dumps({"meta": meta, "data": data}) + "\n")
    (out / "detect.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "detect.md").write_text(markdown(r))
    plot(data, r, out / "detect.png")
    typer.echo(markdown(r))
    typer.echo(f"wrote {out / 'detect.md'}, {out / 'detect.json'}, {out / 'detect.png'}")


if __name__ == "__main__":
    typer.run(detect)
