"""``factpatch eval``, ``eval-subset`` and ``bench``: the commands behind every reported number.

Bad arguments (a missing file, an unknown dataset, n <= 0, a malformed ``--config``) are usage
errors: a clear message and exit code 2, before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from app.cli.common import (DEFAULT_RESULTS, DatasetChoice, ModeChoice, command_line, make_backend, parse_config,
                            progress_bar, quiet_http_logs, set_threads, stage_progress)

def eval_command(
    dataset: DatasetChoice = typer.Option(..., "--dataset", help="Dataset format: zsre (MEND) or counterfact (EasyEdit)."),
    file: Path = typer.Option(..., "--file", exists=True, dir_okay=False, readable=True, help="Data file."),
    n: int = typer.Option(200, "--n", min=1, help="Number of cases to edit."),
    method: str = typer.Option("pnp", "--method", help="Editing method; `none` measures the base model only."),
    config: Optional[list[str]] = typer.Option(None, "--config", help="Method config entry k=v (repeatable)."),
    sequential: bool = typer.Option(True, "--sequential/--independent",
                                    help="Keep all edits active (default) or revert each after measuring it."),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling and bootstrap intervals."),
    shuffle: bool = typer.Option(False, "--shuffle", help="Edit a seeded sample instead of the first n records."),
    start: int = typer.Option(0, "--start", min=0, help="Skip this many usable records first (file order)."),
    curve_every: Optional[int] = typer.Option(None, "--curve-every", min=1, help="Curve point every k edits."),
    held: int = typer.Option(50, "--held", min=0, help="Largest held set for performance deterioration."),
    held_min_accuracy: float = typer.Option(
        1.0, "--held-min-accuracy", min=0.01, max=1.0,
        help="Share of a held question's truth tokens that must be the argmax (1.0: greedy writes it)."),
    latency_probe: int = typer.Option(5, "--latency-probe", min=0,
                                      help="Single-query answers timed before and after the edits."),
    mode: ModeChoice = typer.Option(
        ModeChoice.completion, "--mode",
        help="Prompt form of every measurement: completion, chat (the service's default), or both (edits made "
             "once, measured in each form; one row per form)."),
    fluency_n: int = typer.Option(
        200, "--fluency-n", min=0,
        help="Seeded sample of cases for fluency (generation entropy), repeat rate and free-form reliability "
             "(100-token and 64-token answers); 0 = all cases."),
    subject_queries: int = typer.Option(2, "--subject-queries", min=0,
                                        help="Other-relation questions per edited subject (subject locality)."),
    out: Optional[Path] = typer.Option(None, "--out", file_okay=False, help="Output folder."),
    url: Optional[str] = typer.Option(None, "--url", help="Drive a running service over HTTP instead of in-process."),
    key: Optional[str] = typer.Option(None, "--key", envvar="FACTPATCH_EVAL_KEY", help="Admin API key for --url."),
    model: Optional[str] = typer.Option(None, "--model", help="In-process model (default: FACTPATCH_MODEL)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (in-process)."),
    base_from: Optional[Path] = typer.Option(
        None, "--base-from", dir_okay=False,
        help="results.json of a run on the same cases and settings (e.g. --method none, started beside this "
        "one) whose base-model measurements to reuse; waited for when the edits are done."),
    base_reask: bool = typer.Option(
        False, "--base-reask",
        help="With --base-from (a file already there): ask the base model this run's subject-locality questions "
        "before the first edit where the file asked others (e.g. made by an older version), instead of refusing it."),
) -> None:
    """Edit N cases of a dataset and report reliability, generalization, locality and more."""
    from rich.console import Console

    from app.eval.datasets import DatasetError, load_dataset
    from app.eval.report import environment, print_eval, write_eval
    from app.eval.runner import BaseReuseError, EvalConfig, Runner

    cfg_dict = parse_config(config)
    try:
        ds = load_dataset(dataset.value, file)
    except DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--file") from None
    cfg = EvalConfig(dataset=dataset.value, file=file, n=n, method=method, config=cfg_dict, sequential=sequential,
                     seed=seed, shuffle=shuffle, start=start, curve_every=curve_every, held=held,
                     latency_probe=latency_probe, held_min_accuracy=held_min_accuracy, mode=mode.value,
                     fluency_n=fluency_n, subject_queries=subject_queries, base_from=base_from,
                     base_reask=base_reask)
    out = out or DEFAULT_RESULTS / f"eval-{dataset.value}-{method}-n{n}-{'seq' if sequential else 'ind'}"
    console = Console(stderr=True)
    console.print(f"{ds.name}: {len(ds.cases)} usable records, {ds.skipped} skipped {dict(ds.skip_reasons) or ''}")
    if n > len(ds.cases):
        console.print(f"[yellow]only {len(ds.cases)} usable records: editing all of them[/]")
    set_threads(threads)
    quiet_http_logs()
    import httpx

    from app.eval.backends import BackendError

    backend, where = make_backend(url, key, model)
    env = environment(command_line("eval"))  # the commit (and date) the run starts from: the code it loaded
    try:
        with progress_bar() as bar:
            result = Runner(backend, cfg, stage_progress(bar)).run(ds)
    except BaseReuseError as exc:
        console.print(f"[red]eval stopped: {exc}[/]")
        raise typer.Exit(1) from None
    except (BackendError, httpx.HTTPError) as exc:
        # The service refused the run (unknown method, bad config, missing role) or is unreachable.
        console.print(f"[red]eval stopped: {exc}[/]")
        raise typer.Exit(1) from None
    finally:
        backend.close()
    data = result.as_dict()
    data["backend"] = where
    data["env"] = env
    files = write_eval(data, out)
    print_eval(data)
    console.print("wrote " + ", ".join(str(p) for p in files.values()))


def bench_command(
    edits: str = typer.Option("0,100,1000,10000", "--edits", help="Active-edit counts for the /answer comparison."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Repeats per figure (median and spread reported)."),
    out: Path = typer.Option(DEFAULT_RESULTS / "bench", "--out", file_okay=False, help="Output folder."),
    prompts: int = typer.Option(8, "--prompts", min=1, help="Prompts per /answer measurement."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Greedy tokens per answer."),
    keys: str = typer.Option("1000,10000,100000", "--keys", help="Selector memory sizes for lookup timing."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Methods to time per edit (default: all registered)."),
    edits_per_method: int = typer.Option(3, "--edits-per-method", min=1, help="Edits timed per method."),
    clients: int = typer.Option(4, "--clients", min=1, help="Concurrent clients in the load run."),
    requests: int = typer.Option(40, "--requests", min=0, help="Requests in the load run (0 skips it)."),
    load_seconds: float = typer.Option(120.0, "--load-seconds", min=1.0, help="Time bound of the load run."),
    model: Optional[str] = typer.Option(None, "--model", help="Model (default: FACTPATCH_MODEL)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    seed: int = typer.Option(0, "--seed", help="Seed of synthetic edits and keys."),
) -> None:
    """Speed and scale: /answer vs plain transformers, selector lookup, time per edit, load run."""
    def ints(text: str, name: str, minimum: int) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=name) from None
        if not values or min(values) < minimum:
            raise typer.BadParameter(f"expected integers >= {minimum}, got {text!r}", param_hint=name)
        return values

    edit_counts, key_counts = ints(edits, "--edits", 0), ints(keys, "--keys", 1)
    from rich.console import Console

    from app.eval.bench import BenchConfig, run_bench
    from app.eval.report import environment

    cfg = BenchConfig(
        edits=edit_counts, repeats=repeats, prompts=prompts, max_new_tokens=max_new_tokens,
        keys=key_counts, methods=[m for m in (methods or "").split(",") if m] or None,
        edits_per_method=edits_per_method, clients=clients, requests=requests, load_seconds=load_seconds,
        model=model, seed=seed,
    )
    set_threads(threads)
    quiet_http_logs()
    console = Console(stderr=True)
    env = environment(command_line("bench"))
    run_bench(cfg, out, env, console)


def eval_subset_command(
    run: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of a finished eval (results.json)."),
    cases: str = typer.Option(..., "--cases", help="Case id ranges, e.g. 100-499,700-749,950-999."),
    name: str = typer.Option(..., "--name", help="Name of the subset in results.json and report.md."),
) -> None:
    """Add rows over a subset of a finished run's cases (e.g. the records no setting was tuned on)."""
    from app.eval.report import write_eval
    from app.eval.subsets import SubsetError, add_subset

    path = run / "results.json"
    if not path.is_file():
        raise typer.BadParameter(f"{path} not found", param_hint="RUN")
    results = json.loads(path.read_text(encoding="utf-8"))
    try:
        add_subset(results, cases, name)
    except SubsetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--cases") from None
    files = write_eval(results, run)
    typer.echo(f"wrote {', '.join(str(p) for p in files.values())}")


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``bench`` to the main CLI."""
    from app.cli.compare import compare_command
    from app.eval.replicas import replicas_command
    from app.eval.vllm_bench import vllm_bench_command

    app.command("eval")(eval_command)
    app.command("eval-subset")(eval_subset_command)
    app.command("bench")(bench_command)
    app.command("compare")(compare_command)
    app.command("replicas")(replicas_command)
    app.command("vllm-bench")(vllm_bench_command)


def standalone() -> typer.Typer:
    """A CLI with only these two commands (tests, or before the main CLI includes them)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(app)
    return app
