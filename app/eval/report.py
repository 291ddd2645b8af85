"""Write what a run measured: results.json, report.md, PNG curves, and a rich table.

Every report carries what is needed to rerun and trust it: the command line, git commit (and
whether the tree was dirty), date, model id, method config and the data file's sha256.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

SHORT_LABELS = {"reliability (TF)": "rel TF", "reliability (greedy EM)": "rel EM", "generalization (TF)": "gen TF",
                "generalization (greedy EM)": "gen EM", "locality (TF)": "loc TF", "locality (greedy EM)": "loc EM",
                "perf. deterioration": "PD", "held acc": "held", "subject locality (greedy EM)": "subj loc",
                "repeat rate": "repeat", "reliability (free, chat)": "rel free", "fluency GE (x100)": "GE",
                "GE vs base": "GE Δ", "GE vs base, equal length": "GE Δ (eq. len)"}
METRIC_COLUMNS: list[tuple[str, str]] = [
    ("rel_tf", "reliability (TF)"),
    ("rel_em", "reliability (greedy EM)"),
    ("gen_tf", "generalization (TF)"),
    ("gen_em", "generalization (greedy EM)"),
    ("loc_tf", "locality (TF)"),
    ("loc_em", "locality (greedy EM)"),
]
# What a user sees (rows of results.json written since these columns exist; older files show n/a).
USER_COLUMNS: list[tuple[str, str]] = [
    ("subject_locality", "subject locality (greedy EM)"),
    ("repeat_rate", "repeat rate"),
    ("rel_free", "reliability (free, chat)"),
]
CURVE_SERIES: list[tuple[str, str]] = [
    ("rel_tf", "reliability (TF)"),
    ("gen_tf", "generalization (TF)"),
    ("loc_tf", "locality (TF)"),
    ("rel_all_correct", "reliability (all tokens)"),
    ("held_accuracy", "held-set accuracy"),
]


def git_info(cwd: Path | None = None) -> dict[str, Any]:
    cwd = cwd or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                                   check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def command_string(argv: Sequence[str] | None = None) -> str:
    """``factpatch`` and the arguments, quoted so that the line can be pasted back into a shell."""
    return "factpatch " + shlex.join(list(argv if argv is not None else sys.argv[1:]))


def environment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "command": command_string(argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_info(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return info


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def stat_cell(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def ge_cells(row: dict[str, Any]) -> list[str]:
    """Generation entropy of the row (x100, with interval) and its relative change from the base model."""
    f = row.get("fluency") or {}
    ge = f.get("ge")
    cell = "n/a" if not ge or ge.get("mean") is None else f"{ge['mean']:.1f} [{ge['low']:.1f}, {ge['high']:.1f}]"
    pct = lambda change: "n/a" if change is None else f"{100 * change:+.1f}%"  # noqa: E731
    return [cell, pct(f.get("ge_change")), pct(f.get("ge_matched_change"))]


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = (["run", "n"] + [label for _, label in METRIC_COLUMNS] + [label for _, label in USER_COLUMNS]
              + ["fluency GE (x100)", "GE vs base", "GE vs base, equal length", "held acc", "perf. deterioration", "F/U"])
    rows = []
    for row in results["rows"]:
        rows.append([row["name"], str(row["n"])] + [stat_cell(row.get(k)) for k, _ in METRIC_COLUMNS]
                    + [stat_cell(row.get(k)) for k, _ in USER_COLUMNS] + ge_cells(row)
                    + [_num(row.get("held_accuracy")), _num(row.get("performance_deterioration")), _num(row.get("fu_ratio"))])
    return header, rows


def coverage_lines(results: dict[str, Any]) -> list[str]:
    """How many cases (answers, queries) each metric of each row covers."""
    lines = []
    for row in results["rows"]:
        cells = [f"{label.split(' (')[0] if k.startswith(('rel', 'gen', 'loc')) else label}: "
                 f"{(row.get(k) or {}).get('n', 0)}" for k, label in METRIC_COLUMNS[::2]]
        if "subject_locality" in row:
            f = row.get("fluency") or {}
            cells += [f"subject locality: {row['subject_locality']['n']} cases "
                      f"({row.get('subject_locality_queries', 0)} queries, "
                      f"{row.get('subject_locality_routed', 0)} routed to an edit)",
                      f"fluency: {(f.get('ge') or {}).get('n', 0)} cases ({f.get('answers', 0)} answers)",
                      f"repeat rate: {row['repeat_rate']['n']} answers",
                      f"free-form reliability: {row['rel_free']['n']} cases"]
        lines.append(f"- {row['name']} ({row['n']} cases): " + "; ".join(cells))
    return lines


def superseded_lines(results: dict[str, Any]) -> list[str]:
    sup = results.get("superseded") or {}
    if not sup.get("count"):
        return []
    parts = ["", "## Re-edits of the same fact",
             f"{sup['count']} edits were superseded by a later edit of the same fact (same subject and prompt, "
             "normalised). The rows above score each fact against its latest target only; the superseded edits, "
             "measured against their own (old) targets, are here and are not counted as failures (a low "
             "reliability here means the old target is gone, as it should be)."]
    if sup.get("rows"):
        header, rows = table_rows({"rows": sup["rows"]})
        parts += ["", markdown_table(header, rows)]
    return parts


def subset_lines(results: dict[str, Any]) -> list[str]:
    """Rows recomputed over named subsets of the cases (``factpatch eval-subset``)."""
    parts: list[str] = []
    for sub in results.get("subsets") or []:
        header, rows = table_rows({"rows": sub["rows"]})
        parts += ["", f"## Subset: {sub['name']}",
                  f"Cases with ids {sub['cases']} ({sub['n']} active cases), all {results['dataset']['edited']} "
                  "edits still active; computed from the per-case records by "
                  f"`factpatch eval-subset --cases {sub['cases']} --name \"{sub['name']}\"`.",
                  "", markdown_table(header, rows)]
    return parts


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def eval_markdown(results: dict[str, Any], plot: str | None) -> str:
    cfg, env, ds = results["config"], results["env"], results["dataset"]
    header, rows = table_rows(results)
    mode = "sequential (all edits kept active; measured after the last edit)" if cfg["sequential"] else \
        "independent (each edit alone, reverted after its measurement)"
    t = results["timing"]
    partial = [f"{row['name']}: {label} over {row[k]['n']} of {row['n']} cases"
               for row in results["rows"] for k, label in METRIC_COLUMNS
               if row.get(k) and row[k].get("n") not in (None, row["n"])]
    parts = [
        f"# factpatch eval: {cfg['method']} on {ds['name']} ({ds['edited']} edits)",
        "",
        f"Command: `{env['command']}`",
        "",
        markdown_table(header, rows),
        "",
        *([f"Cells over fewer cases (no paraphrase or locality prompt in the record, or a locality reference "
           f"the pre-edit model does not reproduce): {'; '.join(partial)}.", ""] if partial else []),
        "Means with 95% bootstrap intervals. TF: teacher-forced token accuracy of the target as the "
        "prompt's continuation (as EasyEdit reports). Greedy EM: the greedy generation begins with the "
        "whole target. Locality compares each unrelated prompt's output after the edits with its output "
        "before any edit (TF: per-token agreement on the pre-edit greedy continuation; EM: the first "
        f"{cfg['locality_tokens']} greedy tokens are identical). The edit request carries only prompt, "
        "target and subject: paraphrases and locality prompts are never shown to the method.",
        "",
        "What a user sees: subject locality asks each edited subject "
        f"{cfg.get('subject_queries', 2)} questions of other relations that fit its type (ParaRel templates; "
        "see app/eval/pararel.py) and compares the greedy answers after all edits with those before any edit "
        f"(first {cfg['locality_tokens']} tokens identical). Fluency is ROME's generation entropy "
        "(weighted 2-/3-gram entropy, x100) of "
        f"{cfg.get('fluency_tokens', 100)}-token greedy answers to the edit prompts and paraphrases; GE vs base is "
        "its relative change from the base model's answers to the same prompts; at equal length, each edited "
        "answer and the base model's answer to the same prompt are cut to the words of the shorter one first "
        "(answers end where the model ends them, and entropy grows with length: a short answer is not a "
        "disfluent one). Repeat rate: share of those "
        "answers naming the target more than once. Free-form reliability: the chat answer, written until the "
        f"model stops (at most {cfg.get('free_tokens', 64)} tokens), names the target exactly once; it is always "
        "measured in chat form and shown in the chat row (or the only row).",
        "",
        "Cases each metric covers:",
        *coverage_lines(results),
        *superseded_lines(results),
        *subset_lines(results),
        "",
        "## Settings",
        f"- mode: {mode}; prompt form: {cfg['mode']}",
        f"- dataset: {ds['name']}, `{ds['file']}`, sha256 `{ds['sha256']}`",
        *([f"- user view: fluency, repeat rate and free-form reliability on a seeded sample of "
            f"{results['user_view']['fluency_cases']} of {results['user_view']['fluency_of']} cases; subject "
            f"relation found for {results['user_view']['subject_relation_found']} cases, ambiguous (several "
            f"relations share the template) for {results['user_view']['subject_relation_ambiguous']}, unknown "
            f"(type-agnostic default relations) for {results['user_view']['subject_relation_unknown']}; "
            f"{results['user_view']['subject_queries_total']} subject-locality queries"]
          if results.get("user_view") else []),
        f"- records: {ds['records']}, usable {ds['usable']}, skipped {ds['skipped']} {ds['skip_reasons'] or ''}",
        f"- edited: {ds['edited']} ({'seeded sample, seed ' + str(cfg['seed']) if cfg['shuffle'] else 'first records in file order'})",
        f"- model: `{results['model_id']}`; backend: {results.get('backend', 'n/a')}",
        f"- method: `{cfg['method']}`, config `{json.dumps(cfg['config'], sort_keys=True)}`",
        f"- edits refused or failed by the service: {results.get('extra', {}).get('edit_errors') or 'none'} "
        "(such cases are still measured; they count in no routing cell)",
        f"- git commit: `{env['git']['commit']}`{' (uncommitted changes)' if env['git'].get('dirty') else ''}",
        f"- date (UTC): {env['date']}; python {env['python']}, torch {env.get('torch', '?')}, "
        f"{env.get('threads', '?')} threads",
        f"- held set: {results['held'].get('size', 0)} questions the base model answers "
        f"({'exactly' if cfg.get('held_min_accuracy', 1.0) >= 1.0 else 'with at least ' + str(cfg['held_min_accuracy']) + ' of the truth tokens as argmax'}) "
        f"(from {results['held'].get('pool', 0)} unedited records, base accuracy there "
        f"{_num(results['held'].get('base_pool_accuracy'))})",
        "",
        "## Time",
        f"- per edit (client round trip): p50 {_num(t['edit_wall_ms']['p50'], 0)} ms, "
        f"p95 {_num(t['edit_wall_ms']['p95'], 0)} ms; method fit: p50 {_num(t['edit_fit_ms']['p50'], 0)} ms, "
        f"p95 {_num(t['edit_fit_ms']['p95'], 0)} ms",
        f"- single-query answer latency ({cfg.get('latency_probe', 0)} unrelated prompts, "
        f"{cfg['locality_tokens']} tokens, client side): before edits p50 {_num(t['answer_ms_base']['p50'], 1)} ms, "
        f"p95 {_num(t['answer_ms_base']['p95'], 1)} ms; after all edits p50 {_num(t['answer_ms_edited']['p50'], 1)} ms, "
        f"p95 {_num(t['answer_ms_edited']['p95'], 1)} ms",
        f"- whole run: {results['elapsed_s']:.0f} s"
        + (" (" + ", ".join(f"{k} {v:.0f} s" for k, v in t["stages_s"].items()) + ")" if t.get("stages_s") else ""),
    ]
    if results.get("fu"):
        fu = results["fu"]
        parts += ["", "## Forgetting", f"- F/U ratio {_num(fu['ratio'])}: {fu['forgotten']} forgotten of "
                  f"{fu['updated']} edits that held right after they were applied."]
    if results.get("routing"):
        r = results["routing"]
        parts += ["", "## Selector routing",
                  "| | routed to its edit | routed to another edit | base model |", "|---|---|---|---|",
                  f"| in scope (prompt, paraphrase) | {r['in_correct']} | {r['in_wrong_edit']} | {r['in_missed']} |",
                  f"| out of scope (locality, held) | - | {r['out_routed']} | {r['out_rejected']} |",
                  "", f"recall {_num(r['recall'])}, precision {_num(r['precision'])}, "
                  f"false-positive rate {_num(r['false_positive_rate'])}, accuracy {_num(r['accuracy'])}"]
    if plot:
        parts += ["", "## Curves", f"![curves]({plot})"]
    return "\n".join(parts) + "\n"


def plot_curves(curves: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Metric vs number of edits so far; False when there is nothing to draw."""
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    xs = [p["edits"] for p in curves]
    styles = [("o", "-", 9), ("s", "--", 7.5), ("^", "-.", 6), ("D", ":", 4.5), ("v", "-", 3)]
    for (key, label), (marker, line, size) in zip(CURVE_SERIES, styles):
        ys = [p.get(key) for p in curves]
        if any(y is not None for y in ys):
            # Distinct markers and sizes keep series visible where they coincide (often at 1.0).
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker=marker, linestyle=line,
                    markersize=size, label=label)
    ax.set_xlabel("edits applied (all kept active)")
    ax.set_ylabel("score on the cases edited so far")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def write_eval(results: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "md": out / "report.md"}
    png = out / "curves.png"
    title = f"{results['config']['method']} on {results['dataset']['name']} ({results['model_id']})"
    if plot_curves(results.get("curves") or [], png, title):
        files["png"] = png
    write_json(results, files["json"])
    files["md"].write_text(eval_markdown(results, png.name if "png" in files else None), encoding="utf-8")
    return files


def rich_table(header: list[str], rows: list[list[str]], title: str):
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    return table


def _console(console=None):
    """The given console, or stdout wide enough for the table even when it is not a terminal."""
    from rich.console import Console

    if console is not None:
        return console
    c = Console()
    return c if c.is_terminal else Console(width=200)


def print_eval(results: dict[str, Any], console=None) -> None:
    console = _console(console)
    header, rows = table_rows(results)
    header = [SHORT_LABELS.get(h, h) for h in header]
    console.print(rich_table(header, rows, f"{results['config']['method']} on {results['dataset']['name']} "
                                           "(mean [95% CI]; TF teacher-forced, EM greedy exact match)"))


# -- bench ----------------------------------------------------------------------------------------------
def _med(s: dict[str, Any] | None, digits: int = 1) -> str:
    """A median with its min..max spread."""
    if not s or s.get("median") is None:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}..{s['max']:.{digits}f})"


def bench_tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    ans = results.get("answer") or {}
    if ans.get("points"):
        rows = []
        for p in ans["points"]:
            if "skipped" in p:
                rows.append([str(p["edits"]), p["skipped"]] + [""] * 7)
                continue
            rows.append([str(p["edits"]), _med(p["served_ms"]), _med(p["plain_ms"]), _med(p["ratio"], 3),
                         _med(p["served_rps"], 2), _num(p["same_text"], 2), _med(p.get("edited_served_ms")),
                         _med(p.get("edited_ratio"), 3), _num(p.get("edited_routed"), 2)])
        tables.append(("/answer vs plain transformers generate (per query; unrelated prompts, then prompts of "
                       "active edits)",
                       ["active edits", "served ms", "plain ms", "ratio", "served req/s", "same text",
                        "edited-query ms", "edited ratio", "edited routed"], rows))
    sel = results.get("selector") or {}
    if sel.get("points"):
        rows = [[p["rule"], str(p["keys"]), str(p["edits"]), _med(p["lookup_ms"], 3), _num(p["lookup_p95_ms"], 3),
                 _num(p["build_ms"], 0)] for p in sel["points"]]
        tables.append((f"selector lookup after embedding (encode: {_med(sel.get('encode_ms'), 2)} ms per query)",
                       ["rule", "keys", "edits", "lookup ms", "p95 ms", "build ms"], rows))
    if results.get("edits"):
        rows = [[m, _med(v["edit_wall_ms"], 0), _med(v["fit_ms"], 0), str(len(v["errors"])) +
                 (f" ({v['errors'][0][:60]})" if v["errors"] else "")] for m, v in results["edits"].items()]
        tables.append(("time per edit", ["method", "POST /edits ms", "fit ms", "errors"], rows))
    load = results.get("load") or {}
    if load.get("summary"):
        s = load["summary"]
        tables.append((f"load run: {load['clients']} clients, {load['requests']} requests per run, "
                       f"bound {load['seconds_bound']:.0f} s",
                       ["p50 ms", "p95 ms", "p99 ms", "req/s", "errors"],
                       [[_med(s["p50"]), _med(s["p95"]), _med(s["p99"]), _med(s["rps"], 2), str(load["errors_total"])]]))
    return tables


def bench_markdown(results: dict[str, Any], plot: str | None) -> str:
    env, cfg = results["env"], results["config"]
    parts = [f"# factpatch bench ({results.get('model_id', '?')})", "", f"Command: `{env['command']}`", "",
             "Each figure: median over repeats (min..max in brackets)."]
    for title, header, rows in bench_tables(results):
        parts += ["", f"## {title}", "", markdown_table(header, rows)]
    notes = []
    ans = results.get("answer") or {}
    if ans.get("synthetic"):
        notes.append(f"- synthetic active edits: {ans['synthetic']}; prompts route to none of them")
    for section in ("selector", "answer", "load"):
        skipped = (results.get(section) or {}).get("skipped")
        if skipped:
            notes.append(f"- {section}: skipped ({skipped})")
    load = results.get("load") or {}
    parts += ["", "## Settings",
              f"- model: `{results.get('model_id')}`; {cfg['repeats']} repeats; {cfg['max_new_tokens']} greedy "
              f"tokens per answer; {cfg['prompts']} prompts",
              f"- peak memory (this process): {_num(results.get('peak_rss_mib'), 0)} MiB; server of the load run: "
              f"{_num(load.get('server_peak_rss_mib'), 0)} MiB",
              f"- git commit: `{env['git']['commit']}`{' (uncommitted changes)' if env['git'].get('dirty') else ''}",
              f"- date (UTC): {env['date']}; python {env['python']}, torch {env.get('torch', '?')}, "
              f"{env.get('threads', '?')} threads; {env['platform']}",
              f"- whole run: {results.get('elapsed_s', 0):.0f} s", *notes]
    if plot:
        parts += ["", f"![bench]({plot})"]
    return "\n".join(parts) + "\n"


def plot_bench(results: dict[str, Any], path: Path) -> bool:
    ans = [p for p in (results.get("answer") or {}).get("points", []) if "skipped" not in p]
    sel = (results.get("selector") or {}).get("points", [])
    if not ans and not sel:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)

    def errbar(ax, xs, stats, label):
        med = [s["median"] for s in stats]
        lo = [m - s["min"] for m, s in zip(med, stats)]
        hi = [s["max"] - m for m, s in zip(med, stats)]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=label)

    ax = axes[0]
    if ans:
        xs = [max(p["edits"], 1) for p in ans]
        errbar(ax, xs, [p["served_ms"] for p in ans], "served GET /answer")
        errbar(ax, xs, [p["plain_ms"] for p in ans], "plain transformers generate")
        ax.set_xscale("log")
        ax.set_xlabel("active edits (0 drawn at 1)")
        ax.set_ylabel("ms per query")
        ax.set_title("answer latency")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[1]
    for rule in sorted({p["rule"] for p in sel}):
        pts = [p for p in sel if p["rule"] == rule]
        errbar(ax, [p["keys"] for p in pts], [p["lookup_ms"] for p in pts], f"rule: {rule}")
    if sel:
        ax.set_xscale("log")
        ax.set_xlabel("selector keys")
        ax.set_ylabel("ms per lookup (after embedding)")
        ax.set_title("selector lookup")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_bench(results: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "md": out / "report.md"}
    png = out / "bench.png"
    if plot_bench(results, png):
        files["png"] = png
    write_json(results, files["json"])
    files["md"].write_text(bench_markdown(results, png.name if "png" in files else None), encoding="utf-8")
    return files


def print_bench(results: dict[str, Any], console=None) -> None:
    console = _console(console)
    for title, header, rows in bench_tables(results):
        console.print(rich_table(header, rows, title))


# -- README "Results" section ---------------------------------------------------------------------------
def results_section(paths: Sequence[Path]) -> str:
    """Markdown for the README, generated from results.json files (eval and bench), with commands."""
    evals, benches = [], []
    for p in paths:
        data = json.loads(Path(p).read_text(encoding="utf-8"))
        (benches if data.get("kind") == "bench" else evals).append((Path(p), data))
    parts = ["## Results", "",
             "Generated by `python -m app.eval.report results/*/results.json` from the files under `results/`; "
             "every number below comes from the command shown with it. Timing on a shared 2-core CPU is indicative."]
    for path, data in evals:
        header, rows = table_rows(data)
        ds, env, cfg = data["dataset"], data["env"], data["config"]
        mode = "sequential, measured after all edits" if cfg["sequential"] else "independent"
        parts += ["", f"### {cfg['method']} on {ds['name']} ({ds['edited']} edits, {mode})", "",
                  f"`{env['command']}`  ", f"{env['date']}, commit `{(env['git']['commit'] or '')[:10]}`, "
                  f"model `{data['model_id']}`, data sha256 `{ds['sha256'][:12]}…`, report `{path.parent}/report.md`",
                  "", markdown_table(header, rows)]
        t = data["timing"]
        if t["edit_wall_ms"]["n"]:
            parts += ["", f"Time per edit p50 {_num(t['edit_wall_ms']['p50'], 0)} ms, p95 "
                          f"{_num(t['edit_wall_ms']['p95'], 0)} ms."]
    for path, data in benches:
        env = data["env"]
        parts += ["", f"### bench ({data.get('model_id')})", "", f"`{env['command']}`  ",
                  f"{env['date']}, commit `{(env['git']['commit'] or '')[:10]}`, report `{path.parent}/report.md`"]
        for title, header, rows in bench_tables(data):
            parts += ["", f"**{title}**", "", markdown_table(header, rows)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(results_section([Path(a) for a in sys.argv[1:]]), end="")
