"""``factpatch train-editor``: train the KnowledgeEditor (method ``ke``) for a model.

Training records come from the data folder: CounterFact train (prompt -> target_new, its
rephrase and ParaRel templates of its relation filled with its subject as paraphrases, its
locality prompt as an unrelated input) and zsRE train records from ``--zsre-skip`` on (the first
ones are the evaluation's; the next ``--val`` of them are the validation curve's, never trained
on). The editor is written to ``--out``/editor.safetensors and, with ``--install``, to the home's
``editors/`` folder under the weights' hash, where ``serve`` finds it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import typer

DEFAULT_DATA = Path("/work/shared/data")


def _records_cf(path: Path, pararel_k: int, seed: int):
    from app.eval.pararel import find_relation, relations
    from app.methods.ke.train import Record

    rels = relations()
    rng = random.Random(seed)
    out = []
    for r in json.loads(path.read_text(encoding="utf-8")):
        prompt, target, subject = (r.get("prompt") or "").strip(), (r.get("target_new") or "").strip(), r.get("subject")
        if not prompt or not target:
            continue
        para = [r["rephrase_prompt"].strip()] if (r.get("rephrase_prompt") or "").strip() else []
        rid = find_relation(prompt, subject) if subject else None
        if rid and rid in rels and subject:
            templates = [t for t in rels[rid].prompts if t.startswith("[X]")]
            for t in rng.sample(templates, min(pararel_k, len(templates))):
                para.append(t.replace("[X]", subject))
        unrelated = [r["locality_prompt"].strip()] if (r.get("locality_prompt") or "").strip() else []
        out.append(Record(prompt, target, para, unrelated))
    return out


def _records_zsre(path: Path):
    from app.methods.ke.train import Record

    out = []
    for r in json.loads(path.read_text(encoding="utf-8")):
        src, alt = (r.get("src") or "").strip(), (r.get("alt") or "").strip()
        if not src or not alt:
            out.append(None)  # keep indices aligned with the evaluation's record order
            continue
        loc = (r.get("loc") or "").removeprefix("nq question: ").strip()
        para = [r["rephrase"].strip()] if (r.get("rephrase") or "").strip() else []
        out.append(Record(src, alt, para, [loc] if loc else []))
    return out


def train_editor_cmd(
    model: Optional[str] = typer.Option(None, "--model", help="Model to train for (default: FACTPATCH_MODEL)."),
    data: Path = typer.Option(DEFAULT_DATA, "--data", exists=True, file_okay=False,
                              help="Data folder (counterfact/, zsre/, with the shared layout)."),
    out: Path = typer.Option(Path("results/ke-editor"), "--out", file_okay=False,
                             help="Run folder: checkpoint, validation curve, final editor."),
    steps: int = typer.Option(3000, "--steps", min=1, help="Training steps (one record each)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's checkpoint."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", min=0.1,
                                                help="Stop with a checkpoint after this long (resume continues)."),
    lr: float = typer.Option(1e-3, "--lr", min=1e-6, help="Adam learning rate of the editor."),
    margin: float = typer.Option(1e-2, "--margin", min=0.0, help="m: KL budget on unrelated inputs."),
    paraphrases: bool = typer.Option(True, "--paraphrases/--no-paraphrases", help="The +P^x variant."),
    unrelated_continuation: int = typer.Option(
        0, "--unrelated-continuation", min=0, max=64,
        help="Also hold the KL on this many tokens of the base model's greedy continuation of each unrelated "
        "input (the positions an answer is written at; docs/ke-notes.md, Global edits)."),
    init: Optional[Path] = typer.Option(None, "--init", exists=True, dir_okay=False,
                                        help="Start from this editor file (the same weights) instead of from scratch."),
    lambda_init: float = typer.Option(0.0, "--lambda-init", min=0.0,
                                      help="Start of the Lagrange multiplier (e.g. the λ an --init editor ended with)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Edited blocks, comma-separated (default: 3 at depth 0.75)."),
    zsre_skip: int = typer.Option(300, "--zsre-skip", min=0, help="zsRE records left to evaluation and validation."),
    val: int = typer.Option(20, "--val", min=1, help="Validation records (zsRE, before --zsre-skip, after the first 200)."),
    val_every: int = typer.Option(150, "--val-every", min=1, help="Steps between validation points."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", min=1, help="Steps between checkpoints."),
    install: bool = typer.Option(True, "--install/--no-install", help="Copy the editor to FACTPATCH_HOME/editors/."),
    scope: str = typer.Option("routed", "--scope",
                              help="Which edits the installed editor makes: routed (the default) or global "
                              "(`\"routed\": false`; without a global editor the routed one makes those too)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    seed: int = typer.Option(0, "--seed", help="Seed of the record order and paraphrase choice."),
) -> None:
    """Train the KnowledgeEditor (method `ke`) for the served model, resumably."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from app.lm.engine import LM
    from app.methods.ke import editor as E
    from app.methods.ke.train import TrainConfig, train_editor
    from app.settings import get_settings

    console = Console(stderr=True)
    if scope not in E.SCOPES:
        raise typer.BadParameter(f"expected one of {', '.join(E.SCOPES)}", param_hint="--scope")
    cf_file, zsre_file = data / "counterfact" / "counterfact_train.json", data / "zsre" / "zsre_train_1k.json"
    for f in (cf_file, zsre_file):
        if not f.exists():
            raise typer.BadParameter(f"{f} is missing", param_hint="--data")
    layer_list = None
    if layers:
        try:
            layer_list = [int(v) for v in layers.split(",") if v.strip()]
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated integers, got {layers!r}", param_hint="--layers") from None
    if threads:
        torch.set_num_threads(threads)
    settings = get_settings()
    lm = LM.load(model or settings.model, settings.home, settings.device, settings.dtype)
    zs = _records_zsre(zsre_file)
    val_start = min(200, zsre_skip)
    val_recs = [r for r in zs[val_start:zsre_skip] if r is not None][:val]
    train = [r for r in zs[zsre_skip:] if r is not None] + _records_cf(cf_file, 2, seed)
    console.print(f"{len(train)} training records, {len(val_recs)} validation records; model {lm.name}")
    cfg = TrainConfig(steps=steps, lr=lr, margin=margin, paraphrases=paraphrases, layers=layer_list,
                      unrelated_continuation=unrelated_continuation,
                      init=str(init) if init else None, lambda_init=lambda_init,
                      val_every=val_every, checkpoint_every=checkpoint_every, seed=seed,
                      max_seconds=max_minutes * 60 if max_minutes else None)
    with Progress(TextColumn("train-editor"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("train", total=steps, info="")

        def progress(step: int, total: int, parts: dict) -> None:
            bar.update(task, completed=step,
                       info=f"edit {parts['edit']:.2f} kl {parts['kl']:.4f} λ {parts['lambda']:.2f}")

        summary = train_editor(lm, train, val_recs, cfg, out, resume=resume, progress=progress, log=bar.console.print)
    if install and summary["finished"]:
        target = E.editor_paths(settings.home, summary["model_hash"], scope)[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        # The best validation point's editor is the one served (the last one when none is better).
        shutil.copyfile(summary.get("best") or summary["editor"], target)
        summary["installed"] = str(target)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    console.print(json.dumps(summary, indent=2))
    if not summary["finished"]:
        console.print(f"[yellow]stopped at step {summary['steps']} of {steps}; continue with --resume[/]")
