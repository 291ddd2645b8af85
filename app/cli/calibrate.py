"""``factpatch calibrate``: offline CaliNet measurement on T-REx facts the model gets wrong.

1. Screen a seeded shuffle of the facts file with CKA (LAMA template, default threshold) until
   ``--n`` facts are judged false; only relations with enough ParaRel paraphrases for a
   train/val/test template split take part, one object per (subject, relation).
2. Calibrate them (CaliNet slots, train templates only; early stopping on val templates).
3. Report before -> after on the ``--split`` templates (test: never seen in training; val: for
   choosing settings such as the layer): false rate by CKA, exact match and F1 of the greedy
   object; perplexity on the shipped generic sentences and on LAMA sentences of other true
   facts; how many held-out facts (known before) flip; extra parameters vs the model.
"""

from __future__ import annotations

import json
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer

from app.knowledge.cka import assess
from app.knowledge.facts import Fact, load_facts, render
from app.knowledge.templates import load_relations, split_templates
from app.methods.calinet.config import CaliNetConfig
from app.methods.calinet.method import calibrate, evaluate_templates, fact_splits, measure, perplexity


def calibratable(facts: list[Fact]) -> list[Fact]:
    """Facts of built-in relations that have a template split, one object per (subject, relation)."""
    relations = load_relations()
    ok = {rid for rid, rel in relations.items() if split_templates(rel) is not None}
    seen: set[tuple[str, str]] = set()
    out = []
    for f in facts:
        key = (f.subject, f.relation or "")
        if f.relation in ok and f.subject.strip() and f.object.strip() and key not in seen:
            seen.add(key)
            out.append(f)
    return out


def select_wrong(lm, facts: list[Fact], n: int, *, chunk: int = 256, log=print) -> tuple[list[Fact], dict[str, Any]]:
    """The first ``n`` facts (in the given order) that CKA judges false, and screening stats."""
    wrong: list[Fact] = []
    screened = 0
    for start in range(0, len(facts), chunk):
        batch = facts[start : start + chunk]
        verdicts = assess(lm, batch, max_facts=None)
        for f, a in zip(batch, verdicts):
            screened += 1
            if a.verdict == "false":
                wrong.append(f)
                if len(wrong) == n:
                    break
        log(f"screened {screened}: {len(wrong)} judged false")
        if len(wrong) >= n:
            break
    return wrong, {"screened": screened, "judged_false": len(wrong), "screen_false_rate": len(wrong) / max(1, screened)}


def heldout_metrics(lm, facts: list[Fact], delta, *, generate: bool = True) -> dict[str, Any]:
    """Unrelated true facts (LAMA template): perplexity of their sentences, and verdict/EM changes."""
    relations = load_relations()
    texts = [render(relations[f.relation].template, f.subject, f.object) for f in facts]
    templates = [[relations[f.relation].template] for f in facts]
    before = evaluate_templates(lm, facts, templates, None, generate=generate)
    after = evaluate_templates(lm, facts, templates, delta, generate=generate)
    ppl_b, ppl_a = perplexity(lm, texts), perplexity(lm, texts, deltas=[delta])
    strip = lambda d: {k: v for k, v in d.items() if k != "examples"}  # noqa: E731
    return {
        "n": len(facts),
        "perplexity": {"before": ppl_b, "after": ppl_a, "ratio": ppl_a / ppl_b},
        "before": strip(before),
        "after": strip(after),
    }


def markdown(report: dict[str, Any]) -> str:
    m, part = report["metrics"], report["split"]
    b, a = m[part]["before"], m[part]["after"]
    pg = m["perplexity_generic"]
    lines = [
        f"# CaliNet on {m['n_facts']} T-REx facts judged false by CKA ({report['date']})",
        "",
        f"`{report['command']}`",
        "",
        f"Layer {m['layer']} (`{m['module']}`), {m['slots']} slots, {m['extra_params']:,} extra parameters "
        f"= {m['param_fraction']:.3%} of {m['model_params']:,}; {m['steps']} steps (best {m['best_step']}), "
        f"train {m['train_seconds']:.0f} s; screening: {report['screen']['screened']} facts screened, "
        f"{report['screen']['screen_false_rate']:.1%} judged false.",
        "",
        f"| metric ({part} templates: {b['n_pairs']} (fact, template) pairs of {b['n_facts']} facts) | before | after |",
        "|---|---|---|",
        f"| false rate by CKA | {b['false_rate']:.1%} | {a['false_rate']:.1%} |",
        f"| exact match of greedy object | {b['exact_match']:.1%} | {a['exact_match']:.1%} |",
        f"| F1 of greedy object | {b['f1']:.1%} | {a['f1']:.1%} |",
        f"| greedy decoding writes the object | {b['greedy_object']:.1%} | {a['greedy_object']:.1%} |",
        f"| perplexity, generic sentences (app/data, eval half) | {pg['before']:.2f} | {pg['after']:.2f} ({pg['ratio'] - 1:+.1%}) |",
    ]
    if report["heldout"]:
        ph, hb, ha = (report["heldout"][k] for k in ("perplexity", "before", "after"))
        lines += [
            f"| perplexity, LAMA sentences of {report['heldout']['n']} other true facts | {ph['before']:.2f} | {ph['after']:.2f} ({ph['ratio'] - 1:+.1%}) |",
            f"| other facts: false rate by CKA | {hb['false_rate']:.1%} | {ha['false_rate']:.1%} |",
            f"| other facts: exact match | {hb['exact_match']:.1%} | {ha['exact_match']:.1%} |",
        ]
    return "\n".join(lines) + "\n"


def calibrate_cmd(
    file: Path = typer.Option(..., "--file", help="JSON lines of T-REx facts {sub_label, relation, obj_label} or {subject, relation, object}."),
    n: int = typer.Option(100, "--n", min=1, help="Number of facts judged false to calibrate."),
    relation: Optional[str] = typer.Option(None, "--relation", help="Keep only this relation id."),
    seed: int = typer.Option(0, "--seed", help="Seed of the screening order and of training."),
    split: str = typer.Option("test", "--split", help="Templates to report on: test (unseen) or val (for choosing settings)."),
    heldout: int = typer.Option(200, "--heldout", min=0, help="Other true facts for the locality measurements."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Block of the slots (default: the config's)."),
    slots: Optional[int] = typer.Option(None, "--slots", help="Slot count (default: from the number of facts)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the facts."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (overrides --epochs)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    locality_weight: Optional[float] = typer.Option(None, "--locality-weight", help="Weight of the generic-text penalty."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training examples per step."),
    out: Path = typer.Option(Path("results/calibrate"), "--out", help="Folder for the json and md report."),
    tag: str = typer.Option("", "--tag", help="Suffix of the report file names."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: FACTPATCH_MODEL)."),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="Measure EM/F1 by free generation (slower) or EM by teacher forcing."),
    init_std: Optional[float] = typer.Option(None, "--init-std", help="Std of the random key init."),
    kl_weight: Optional[float] = typer.Option(None, "--kl-weight", help="Weight of the KL term on generic sentences."),
    key_init: Optional[str] = typer.Option(None, "--key-init", help="random or data."),
    selected: Optional[Path] = typer.Option(
        None, "--selected", help="Cache of the screened facts: read if it exists (same file, n, seed), else written."
    ),
) -> None:
    """Calibrate facts the model gets wrong and measure the change on unseen templates."""
    from app.cli.detect import load_lm
    from app.cli.common import command_text

    if split not in ("test", "val"):
        raise typer.BadParameter("--split must be test or val")
    overrides = {k: v for k, v in dict(layer=layer, slots=slots, epochs=epochs, steps=steps, lr=lr,
                 locality_weight=locality_weight, batch_size=batch_size, seed=seed, init_std=init_std, kl_weight=kl_weight, key_init=key_init).items() if v is not None}
    config = CaliNetConfig(evaluate=False, **overrides)
    lm = load_lm(model)
    facts = calibratable(load_facts(file, relation=relation))
    random.Random(seed).shuffle(facts)
    t0 = time.perf_counter()
    if selected is not None and selected.exists():
        cached = json.loads(selected.read_text())
        wrong, screen = [Fact(**f) for f in cached["facts"]], cached["screen"]
    else:
        wrong, screen = select_wrong(lm, facts, n, log=typer.echo)
        screen["seconds"] = round(time.perf_counter() - t0, 1)
        if selected is not None:
            selected.parent.mkdir(parents=True, exist_ok=True)
            selected.write_text(json.dumps({"screen": screen, "facts": [
                {"subject": f.subject, "object": f.object, "relation": f.relation} for f in wrong]}))
    chosen_subjects = {f.subject for f in wrong}
    others = [f for f in facts[screen["screened"] :] if f.subject not in chosen_subjects][:heldout]

    def progress(step: int, total: int, loss: float) -> None:
        if step == 1 or step % 10 == 0 or step == total:
            typer.echo(f"step {step}/{total} loss {loss:.3f}")

    result = calibrate(lm, wrong, config, progress)
    t1 = time.perf_counter()
    metrics = dict(result.metrics)
    metrics.update(measure(lm, wrong, result.delta, part=split, splits=fact_splits(wrong), generate=generate))
    metrics["eval_seconds"] = round(time.perf_counter() - t1, 1)
    report = {
        "command": command_text("calibrate"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "split": split,
        "config": config.model_dump(),
        "screen": screen,
        "metrics": metrics,
        "heldout": heldout_metrics(lm, others, result.delta, generate=generate) if others else {},
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = f"calibrate_n{n}_{split}{('_' + tag) if tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    typer.echo(markdown(report))


if __name__ == "__main__":
    typer.run(calibrate_cmd)
