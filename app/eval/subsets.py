"""Rows of a finished eval recomputed over a subset of its cases.

A sequential run must edit every record it reports (the memory holds all N edits), but some of
those records may have been looked at while choosing settings. ``factpatch eval-subset`` adds
rows over the cases named by id ranges (e.g. the records no setting was tuned on), computed from
the per-case records in results.json with the same summaries as the run's own rows; the run's
other numbers (held set, forgetting, routing) stay those of the whole run.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterable

from app.eval.runner import BASE_ROW, CaseResult, EvalConfig, Runner


class SubsetError(ValueError):
    pass


def parse_ranges(spec: str) -> list[tuple[int, int]]:
    """``"100-499,700-749,950"`` -> inclusive integer ranges."""
    out: list[tuple[int, int]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise SubsetError(f"not a case id range: {part!r} (use e.g. 100-499,950)") from None
        if a > b:
            raise SubsetError(f"empty range: {part!r}")
        out.append((a, b))
    if not out:
        raise SubsetError("no case id range given")
    return out


def in_ranges(case_id: str, ranges: Iterable[tuple[int, int]]) -> bool:
    try:
        k = int(case_id)
    except (TypeError, ValueError):
        return False
    return any(a <= k <= b for a, b in ranges)


def _case(d: dict[str, Any]) -> CaseResult:
    names = {f.name for f in fields(CaseResult)}
    return CaseResult(**{k: v for k, v in d.items() if k in names})


def subset_rows(results: dict[str, Any], spec: str, name: str) -> dict[str, Any]:
    """A subset entry (name, ranges, rows) for ``results``; rows per form, base and edited, over the
    active (not superseded) cases whose id lies in ``spec``."""
    ranges = parse_ranges(spec)
    cfg = EvalConfig(**results["config"])
    runner = Runner(backend=None, cfg=cfg)  # type: ignore[arg-type]  # rows need no backend
    modes = runner.modes
    multi = len(modes) > 1
    rows: list[dict[str, Any]] = []
    for mode in modes:
        base = [_case(c) for c in results["base_cases"] if c.get("mode") == mode]
        edited = [_case(c) for c in results["cases"] if c.get("mode") == mode]
        keep = [i for i, c in enumerate(base) if in_ranges(c.case_id, ranges) and c.superseded_by is None]
        if not keep:
            raise SubsetError(f"no case of the run has an id in {spec!r}")
        b = [base[i] for i in keep]
        label = lambda s: f"{s} ({mode})" if multi else s  # noqa: E731
        rows.append(runner.row(label(f"{BASE_ROW}, {name}"), b, mode=mode))
        if edited:
            by_id = {c.case_id: c for c in edited}
            e = [by_id[c.case_id] for c in b]
            rows.append(runner.row(label(f"{cfg.method}, {name}"), e, b, mode=mode))
    return {"name": name, "cases": spec, "n": len(keep), "rows": rows}


def add_subset(results: dict[str, Any], spec: str, name: str) -> dict[str, Any]:
    """``results`` with the subset added (replacing an earlier subset of the same name)."""
    entry = subset_rows(results, spec, name)
    subsets = [s for s in results.get("subsets") or [] if s.get("name") != name]
    results["subsets"] = subsets + [entry]
    return results
