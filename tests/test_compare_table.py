"""`factpatch compare`'s table: one row per method and prompt form, completion rows first."""

from __future__ import annotations

from app.eval.compare import COLUMNS, compare_markdown, summary_rows, table_rows


def _stat(v):
    return {"mean": v, "lo": v, "hi": v}


def _run(method: str, chat_success: float) -> dict:
    def row(name, mode, success, pd=None):
        return {"name": name, "mode": mode, "n": 4, "rel_em": _stat(success), "gen_em": _stat(0.5),
                "loc_em": _stat(1.0), "rel_tf": _stat(1.0), "gen_tf": _stat(0.75), "loc_tf": _stat(1.0),
                "subject_locality": _stat(0.9), "performance_deterioration": pd}

    return {
        "config": {"method": method, "config": {"routed": False}, "sequential": False},
        "rows": [row("base (no edits) (completion)", "completion", 0.0, 0.0), row(f"{method} (completion)", "completion", 1.0, 0.05),
                 row("base (no edits) (chat)", "chat", 0.0, 0.0), row(f"{method} (chat)", "chat", chat_success)],
        "timing": {"edit_wall_ms": {"p50": 250.4}},
        "extra": {"edit_errors": {"target_already_holds": 1}},
    }


def test_each_edited_form_is_a_row_and_base_rows_are_left_out():
    rows = summary_rows(_run("ke", 0.25))
    assert [r[COLUMNS.index("form")] for r in rows] == ["completion", "chat"]
    first, chat = rows
    assert first[COLUMNS.index("method")] == "ke"
    assert first[COLUMNS.index("config")] == "routed=False; one at a time, reverted"
    assert first[COLUMNS.index("success rate")] == "1.000" and chat[COLUMNS.index("success rate")] == "0.250"
    assert first[COLUMNS.index("perf. deterioration")] == "0.050" and chat[COLUMNS.index("perf. deterioration")] == "n/a"
    assert first[COLUMNS.index("edit p50 (ms)")] == "250" and first[COLUMNS.index("edit errors")] == "1"
    assert all(len(r) == len(COLUMNS) for r in rows)


def test_table_groups_completion_rows_before_chat_rows():
    runs = [_run("ke", 0.25), _run("ft", 0.0)]
    rows = table_rows(runs)
    assert [(r[0], r[2]) for r in rows] == [("ke", "completion"), ("ft", "completion"), ("ke", "chat"), ("ft", "chat")]
    text = compare_markdown(runs, "factpatch compare --methods ke,ft")
    assert "| ft | routed=False; one at a time, reverted | chat | 4 | 0.000 |" in text


def test_a_run_without_edits_shows_its_base_row():
    run = _run("none", 0.0)
    run["rows"] = run["rows"][:1]
    assert [r[3] for r in summary_rows(run)] == ["4"]
