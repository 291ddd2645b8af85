"""``factpatch compare``: run several methods the same way and write the seeds' table side by side
(the table itself: :mod:`app.eval.compare`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from app.cli.common import (DEFAULT_RESULTS, DatasetChoice, ModeChoice, command_line, command_text, make_backend, parse_config,
                            progress_bar, quiet_http_logs, set_threads, stage_progress)
from app.eval.compare import COLUMNS, compare_markdown, table_rows


def compare_command(
    dataset: DatasetChoice = typer.Option(DatasetChoice.zsre, "--dataset", help="Dataset format."),
    file: Optional[Path] = typer.Option(None, "--file", exists=True, dir_okay=False, help="Data file."),
    methods: str = typer.Option("ke,ft,ft_constrained,pnp", "--methods", help="Methods, comma-separated."),
    config: Optional[list[str]] = typer.Option(
        None, "--config", help="method.key=value for one method, or key=value for all (repeatable)."),
    n: int = typer.Option(50, "--n", min=1, help="Cases edited per method."),
    sequential: bool = typer.Option(True, "--sequential/--independent",
                                    help="Keep all edits active, or revert each after measuring it."),
    held: int = typer.Option(50, "--held", min=0, help="Largest held set for performance deterioration."),
    held_min_accuracy: float = typer.Option(
        1.0, "--held-min-accuracy", min=0.01, max=1.0,
        help="Share of a held question's truth tokens that must be the argmax (1.0: greedy writes it)."),
    fluency_n: int = typer.Option(20, "--fluency-n", min=0, help="Cases sampled for fluency and free-form answers."),
    subject_queries: int = typer.Option(2, "--subject-queries", min=0, help="Other-relation questions per subject."),
    mode: ModeChoice = typer.Option(ModeChoice.completion, "--mode", help="Prompt form of the measurements."),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling and intervals."),
    out: Optional[Path] = typer.Option(None, "--out", file_okay=False, help="Output folder."),
    from_runs: Optional[list[Path]] = typer.Option(
        None, "--from", exists=True, file_okay=False, help="Tabulate these eval result folders instead of running."),
    model: Optional[str] = typer.Option(None, "--model", help="In-process model (default: FACTPATCH_MODEL)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
) -> None:
    """Run several methods the same way and write the seeds' table side by side."""
    from rich.console import Console

    from app.eval.report import write_json

    console = Console(stderr=True)
    runs: list[dict[str, Any]] = []
    if from_runs:
        for folder in from_runs:
            path = folder / "results.json"
            if not path.exists():
                raise typer.BadParameter(f"{path} does not exist", param_hint="--from")
            runs.append(json.loads(path.read_text(encoding="utf-8")))
        out = out or DEFAULT_RESULTS / "compare"
    else:
        if file is None:
            raise typer.BadParameter("--file is required unless --from is given", param_hint="--file")
        names = [m.strip() for m in methods.split(",") if m.strip()]
        if not names:
            raise typer.BadParameter("no method named", param_hint="--methods")
        shared: dict[str, Any] = {}
        per: dict[str, dict[str, Any]] = {m: {} for m in names}
        for key, value in parse_config(config).items():
            head, dot, rest = key.partition(".")
            if dot and head in per:
                per[head][rest] = value
            else:
                shared[key] = value
        out = out or DEFAULT_RESULTS / f"compare-{dataset.value}-n{n}-{'seq' if sequential else 'ind'}"
        runs = [_run_one(dataset, file, m, {**shared, **per[m]}, n, sequential, held, held_min_accuracy, fluency_n,
                         subject_queries,
                         mode, seed, out / m, model, threads, console) for m in names]
    out.mkdir(parents=True, exist_ok=True)
    command = command_text("compare")
    write_json({"command": command, "columns": COLUMNS, "rows": table_rows(runs),
                "runs": [{k: r.get(k) for k in ("config", "dataset", "model_id", "rows", "timing", "held", "extra")}
                         for r in runs]}, out / "results.json")
    (out / "report.md").write_text(compare_markdown(runs, command), encoding="utf-8")
    from app.eval.report import rich_table

    console.print(rich_table(COLUMNS, table_rows(runs), "methods side by side"))
    console.print(f"wrote {out / 'results.json'}, {out / 'report.md'}")


def _run_one(dataset, file, method, cfg_dict, n, sequential, held, held_min_accuracy, fluency_n, subject_queries, mode, seed, out,
             model, threads, console) -> dict[str, Any]:
    from app.eval.datasets import load_dataset
    from app.eval.report import environment, write_eval
    from app.eval.runner import EvalConfig, Runner

    ds = load_dataset(dataset.value, file)
    cfg = EvalConfig(dataset=dataset.value, file=file, n=n, method=method, config=cfg_dict, sequential=sequential,
                     seed=seed, held=held, held_min_accuracy=held_min_accuracy, mode=mode.value, fluency_n=fluency_n, subject_queries=subject_queries)
    set_threads(threads)
    quiet_http_logs()
    backend, where = make_backend(None, None, model)
    console.print(f"[bold]{method}[/] {cfg_dict or ''}")
    try:
        with progress_bar() as bar:
            result = Runner(backend, cfg, stage_progress(bar, f"{method}: ")).run(ds)
    finally:
        backend.close()
    data = result.as_dict()
    data["backend"] = where
    data["env"] = environment(command_line("compare"))  # the command that made this run
    write_eval(data, out)
    return data
