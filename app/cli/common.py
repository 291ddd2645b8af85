"""What the measurement commands share: their option types, ``--config`` parsing, the rerun line that
reports print, quiet client logs, torch threads, a progress bar and the backend an evaluation drives."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import typer

DEFAULT_RESULTS = Path("results")


class ModeChoice(str, Enum):
    completion = "completion"
    chat = "chat"
    both = "both"


class DatasetChoice(str, Enum):
    zsre = "zsre"
    counterfact = "counterfact"


def parse_config(items: list[str] | None) -> dict[str, Any]:
    """``k=v`` pairs; values are read as JSON when they parse (numbers, booleans, lists), else text."""
    config: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--config")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        config[key.strip()] = value
    return config


def command_line(name: str) -> list[str]:
    """The arguments as typed, from the subcommand on (for the report's rerun line)."""
    argv = sys.argv[1:]
    return argv[argv.index(name) :] if name in argv else [name, "..."]


def command_text(name: str) -> str:
    """The rerun line of subcommand ``name`` as reports print it (``factpatch <name> <args>``)."""
    from app.eval.report import command_string

    return command_string(command_line(name))


def quiet_http_logs() -> None:
    """Per-request client logs would drown the progress bar."""
    import logging

    for name in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False)


def stage_progress(bar, prefix: str = "") -> Callable[[str, int, int], None]:
    """A :class:`~app.eval.runner.Runner` progress callback: one task of ``bar`` per stage, labelled
    ``prefix`` + the stage's name."""
    tasks: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(prefix + stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return progress


def make_backend(url: str | None, key: str | None, model: str | None):
    from app.eval.backends import HttpBackend, InProcessBackend

    if url:
        return HttpBackend(url, key), url
    return InProcessBackend(model=model), "in-process (TestClient, temporary SQLite home, no Redis)"
