"""``factpatch compare``: the seeds' table for several methods, side by side, from one command.

Each method is run by the same :class:`~app.eval.runner.Runner` as ``factpatch eval`` (same
records, same held set, same settings); its full results go to ``<out>/<method>/``, and
``<out>/results.json`` + ``report.md`` hold the comparison: the papers' measures (success rate,
retain accuracy, equivalence accuracy, performance deterioration) beside the harness's
(reliability, generalization and locality teacher-forced, subject locality, edit time).
``--from`` builds the same table from eval result folders that already exist. The command is
:mod:`app.cli.compare`; this module makes the table.

Where the seeds' names map to the harness's: success rate = reliability (greedy EM: the edited
prompt's greedy answer is the target), equivalence accuracy = generalization (greedy EM, on the
held-out paraphrase), retain accuracy = locality (greedy EM: an unrelated prompt's greedy answer
is unchanged), performance deterioration = 1 − held accuracy after / before the edits.
"""

from __future__ import annotations

from typing import Any

from app.eval.runner import BASE_ROW


COLUMNS = ["method", "config", "form", "n", "success rate", "equivalence acc.", "retain acc.", "perf. deterioration",
           "reliability (TF)", "generalization (TF)", "locality (TF)", "subject locality", "edit p50 (ms)",
           "edit errors"]


def _mean(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.3f}"


def summary_rows(data: dict[str, Any]) -> list[list[str]]:
    """The comparison rows of one eval's results.json: one per prompt form its edited rows were
    measured in (completion, chat), else its base row alone."""
    rows = data.get("rows", [])
    cfg = data.get("config", {})
    method = cfg.get("method")
    edited = [r for r in rows if not str(r.get("name", "")).startswith(BASE_ROW)] or rows[:1]
    edit = (data.get("timing") or {}).get("edit_wall_ms") or {}
    config = ", ".join(f"{k}={v}" for k, v in sorted((cfg.get("config") or {}).items())) or "defaults"
    mode = "sequential" if cfg.get("sequential", True) else "one at a time, reverted"
    errors = sum((data.get("extra") or {}).get("edit_errors", {}).values())
    out = []
    for row in edited:
        pd = row.get("performance_deterioration")
        out.append([method or row["name"], f"{config}; {mode}", str(row.get("mode") or "completion"), str(row["n"]),
                    _mean(row.get("rel_em")), _mean(row.get("gen_em")), _mean(row.get("loc_em")),
                    "n/a" if pd is None else f"{pd:.3f}", _mean(row.get("rel_tf")), _mean(row.get("gen_tf")),
                    _mean(row.get("loc_tf")), _mean(row.get("subject_locality")),
                    "n/a" if edit.get("p50") is None else f"{edit['p50']:.0f}", str(errors)])
    return out


def table_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """Every run's rows, completion-form rows of all methods first, then chat."""
    rows = [row for r in runs for row in summary_rows(r)]
    form = COLUMNS.index("form")
    forms = list(dict.fromkeys(row[form] for row in rows))
    return [row for f in forms for row in rows if row[form] == f]


def compare_markdown(runs: list[dict[str, Any]], command: str) -> str:
    from app.eval.report import markdown_table

    first = runs[0] if runs else {}
    ds = first.get("dataset", {})
    lines = [
        "# Methods side by side", "", "```", command, "```", "",
        f"Dataset {ds.get('name')} ({ds.get('file')}, sha256 {str(ds.get('sha256'))[:12]}), model "
        f"{first.get('model_id')}. Success rate = reliability (greedy EM), equivalence accuracy = "
        "generalization (greedy EM), retain accuracy = locality (greedy EM), performance deterioration = "
        "1 - held accuracy after / before (De Cao et al.).", "",
        markdown_table(COLUMNS, table_rows(runs)), "",
    ]
    return "\n".join(lines)
