"""``factpatch``: serve, worker, db upgrade, keys, config, and the measurement commands (eval, bench, detect)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

# h11 parses request heads up to this size and hands an over-long URL to the app, which answers a
# JSON 414 (httptools, uvicorn's default, answers URLs over 64 KiB with a plain-text 400 itself).
SERVER_OPTIONS = {"http": "h11", "h11_max_incomplete_event_size": 256 * 1024}

app = typer.Typer(help="factpatch: edit the factual knowledge of a served language model.", no_args_is_help=True)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
console = Console()


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Bind address (default FACTPATCH_HOST)."),
    port: Optional[int] = typer.Option(None, help="Port (default FACTPATCH_PORT)."),
    workers: int = typer.Option(1, help="Worker processes; each loads its own model copy."),
) -> None:
    """Run migrations, load the model and serve the HTTP API."""
    import uvicorn

    from app.settings import get_settings

    s = get_settings()
    uvicorn.run(
        "app.main:create_app", factory=True, host=host or s.host, port=port or s.port, workers=workers,
        log_level=s.log_level.lower(), **SERVER_OPTIONS,
    )


@app.command()
def worker(
    threads: Optional[int] = typer.Option(None, help="torch threads for training (default: torch's choice)."),
) -> None:
    """Run queued training jobs (edits, calibrations) for the API replicas: FACTPATCH_TRAINING=workers."""
    import logging
    import signal
    import threading

    from app.runtime import Runtime, run_worker
    from app.settings import get_settings

    s = get_settings()
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not s.uses_workers:
        console.print("[red]factpatch worker needs FACTPATCH_TRAINING=workers, FACTPATCH_REDIS_URL and "
                      "FACTPATCH_DATABASE_URL[/red]")
        raise typer.Exit(2)
    if threads:
        import torch

        torch.set_num_threads(threads)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    rt = Runtime.build(s, worker=True)
    try:
        run_worker(rt, stop)
    finally:
        rt.close()


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations to FACTPATCH_DATABASE_URL (or the embedded SQLite file)."""
    from app.settings import get_settings
    from app.store import Database

    s = get_settings()
    db = Database(s.resolved_database_url(), s.database_schema)
    db.upgrade(revision)
    console.print(f"database {db.describe()} at revision {db.current_revision()}")


@keys_app.command("create")
def keys_create(
    role: str = typer.Option(..., "--role", help="reader, editor or admin."),
    name: str = typer.Option("cli", help="A label for the key."),
) -> None:
    """Create an API key and print it once."""
    from app.services.keys import KeyService
    from app.settings import get_settings
    from app.store import ROLES, Database

    if role not in ROLES:
        console.print(f"[red]unknown role {role!r}; choose from {', '.join(ROLES)}[/red]")
        raise typer.Exit(2)
    s = get_settings()
    db = Database(s.resolved_database_url(), s.database_schema)
    db.upgrade()
    key_id, raw = KeyService(db).create(name, role)
    console.print(f"id {key_id} role {role}")
    print(raw)


@app.command("config")
def show_config(markdown: bool = typer.Option(False, help="Print a Markdown table (for the README).")) -> None:
    """Every FACTPATCH_* setting with its default and meaning."""
    from app.settings import Settings

    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else ""
        rows.append((f"FACTPATCH_{name.upper()}", str(default), field.description or ""))
    if markdown:
        print("| variable | default | meaning |\n|---|---|---|")
        for r in rows:
            print(f"| `{r[0]}` | `{r[1]}` | {r[2]} |" if r[1] else f"| `{r[0]}` | | {r[2]} |")
        return
    table = Table("variable", "default", "meaning")
    for r in rows:
        table.add_row(*r)
    console.print(table)


# Measurement commands live beside their code.
def _register_measurements() -> None:
    from app.cli.calibrate import calibrate_cmd
    from app.cli.detect import detect
    from app.cli.export import export_cmd, export_parity_cmd
    from app.cli.repair import repair_eval_cmd, repair_eval_edits_cmd
    from app.cli.train_editor import train_editor_cmd
    from app.cli.evaluate import register

    register(app)
    app.command("detect", help="Every detection score on T-REx true vs corrupted facts (AUROC) and candidate sentences (top-1).")(detect)
    app.command("calibrate", help="CaliNet on facts the model gets wrong: false rate, EM/F1, perplexity before and after.")(
        calibrate_cmd
    )
    app.command("export", help="An edit as a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).")(
        export_cmd
    )
    app.command("export-parity", help="Edits exported as PEFT adapters: same greedy answers as factpatch?")(
        export_parity_cmd
    )
    app.command("repair-eval", help="Repair (Tanno et al.): noisy facts in a calibration, cause identification, treatment.")(
        repair_eval_cmd
    )
    app.command("repair-eval-edits", help="Repair: a planted bad edit among good ones, ranked, reverted and restored.")(
        repair_eval_edits_cmd
    )
    app.command("train-editor", help="Train the KnowledgeEditor (method `ke`) for a model: resumable, with a validation curve.")(
        train_editor_cmd
    )


_register_measurements()


if __name__ == "__main__":
    app()
