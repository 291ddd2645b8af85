"""``factpatch export`` (an edit as a PEFT LoRA adapter folder) and ``factpatch export-parity``
(do exported adapters answer like factpatch?)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer


def export_cmd(
    edit: str = typer.Option(..., "--edit", help="The edit's id."),
    out: Path = typer.Option(..., "--out", file_okay=False, help="Folder to write the adapter into (created)."),
    base_model: Optional[str] = typer.Option(
        None, "--base-model", help="base_model_name_or_path to write into adapter_config.json "
                                   "(default: where the served model was loaded from)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
) -> None:
    """Write an edit's delta as a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors,
    factpatch_edit.json) for peft.PeftModel.from_pretrained(base, OUT) or an engine serving LoRAs.
    Reads FACTPATCH_DATABASE_URL and loads FACTPATCH_MODEL (for its module names and shapes)."""
    import re

    from app.api.schemas import UUID_PATTERN
    from app.errors import FactpatchError
    from app.lm.engine import LM
    from app.services.adapters import AdapterService
    from app.settings import get_settings
    from app.store import Database

    if not re.match(UUID_PATTERN, edit):
        raise typer.BadParameter("expected an edit id (a UUID)", param_hint="--edit")
    if out.exists() and any(out.iterdir()):
        raise typer.BadParameter(f"{out} exists and is not empty", param_hint="--out")
    if threads:
        import torch

        torch.set_num_threads(threads)
    s = get_settings()
    db = Database(s.resolved_database_url(), s.database_schema)
    try:
        lm = LM.load(s.model, s.home, s.device, s.dtype)
        files, status = AdapterService(db, lm).files(edit, base_model=base_model)
    except FactpatchError as exc:
        print(f"export failed: {exc.code}: {exc.message}", file=sys.stderr)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    config = json.loads(files["adapter_config.json"])
    print(f"wrote {', '.join(sorted(files))} to {out} (edit {edit}, {status}; r={config['r']}, "
          f"{len(config['target_modules'])} modules)")


def export_parity_cmd(
    dataset: str = typer.Option("zsre", "--dataset", help="zsre or counterfact."),
    file: Path = typer.Option(Path("/work/shared/data/zsre/zsre_train_1k.json"), "--file", exists=True,
                              dir_okay=False, help="Data file (records with a rephrase)."),
    n: int = typer.Option(20, "--n", min=1, max=500, help="Edits to make and export."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, max=256, help="Greedy tokens per answer."),
    out: Path = typer.Option(Path("results/peft-export"), "--out", file_okay=False, help="Output folder."),
    model: Optional[str] = typer.Option(None, "--model", help="Model (default: FACTPATCH_MODEL)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
) -> None:
    """Make N edits in a throwaway in-process service, export each through GET /edits/{id}/adapter,
    load it with peft into a separate base model and compare greedy answers on the prompt and rephrase."""
    from app.eval.backends import InProcessBackend
    from app.cli.common import command_line, quiet_http_logs, set_threads
    from app.eval.datasets import DatasetError, load_dataset
    from app.eval.peft_parity import ParityConfig, report_markdown, run_parity
    from app.eval.report import environment

    try:
        import peft  # noqa: F401
    except ImportError:
        print("export-parity needs peft: pip install peft", file=sys.stderr)
        raise typer.Exit(2) from None
    if dataset not in ("zsre", "counterfact"):
        raise typer.BadParameter("zsre or counterfact", param_hint="--dataset")
    try:
        ds = load_dataset(dataset, file)
    except DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--file") from None
    cases = [c for c in ds.cases if c.paraphrase][:n]
    env = environment(command_line("export-parity"))  # the commit the run starts from
    set_threads(threads)
    quiet_http_logs()
    backend = InProcessBackend(model=model)
    try:
        data = run_parity(backend, cases, ParityConfig(n=len(cases), max_new_tokens=max_new_tokens),
                          log=lambda m: print(m, file=sys.stderr))
    finally:
        backend.close()
    data["dataset"] = {"name": dataset, "file": str(file), "sha256": ds.sha256,
                       "selection": f"the first {len(cases)} records with a rephrase, in file order"}
    data["env"] = env
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(report_markdown(data))
    print(report_markdown(data).split("## Differences")[0])
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}", file=sys.stderr)
