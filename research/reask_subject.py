"""Ask the base model the subject-locality questions of a finished `factpatch eval` run again and rescore
subject locality against those answers (rows, per-case records, report).

For a run whose `--base-from` file came from an older harness that did not record its subject questions:
such a file can only be checked by the number of questions, and the same number may be other questions.
`factpatch eval --base-reask` now asks every such case before the first edit; this rescores a run made
before that. The base model is the served model with no edit (an in-process backend on an empty store).

    .venv/bin/python research/reask_subject.py results/eval-zsre-pnp-n1000-both-head24 --threads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.cli.common import make_backend, set_threads
from app.eval import metrics as M
from app.eval.report import write_eval
from app.eval.runner import BASE_ROW, CaseResult, EvalConfig, Runner

SUBJECT_KEYS = ("subject_locality", "subject_locality_queries", "subject_locality_routed")


def rescore_rows(runner: Runner, rows: list[dict], mode: str, base: list[dict], edited: list[dict]) -> None:
    """The subject-locality figures of the rows of ``mode``, as the run computes them (``Runner.row``)."""
    active = {c["case_id"] for c in edited if not c.get("superseded_by")}
    for row in rows:
        if row.get("mode") != mode or "superseded" in row["name"]:
            continue
        src = base if row["name"].startswith(BASE_ROW) else edited
        fresh = runner.row(row["name"], [CaseResult(**c) for c in src if c["case_id"] in active])
        row.update({k: fresh[k] for k in SUBJECT_KEYS})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    data = json.loads((args.run / "results.json").read_text(encoding="utf-8"))
    cfg = EvalConfig(**data["config"])
    backend, _ = make_backend(None, None, None)
    runner = Runner(backend, cfg)
    try:
        for mode in cfg.modes():
            runner.mode = mode
            edited = [c for c in data["cases"] if c["mode"] == mode]
            base = {c["case_id"]: c for c in data["base_cases"] if c["mode"] == mode}
            queries = [q for c in edited for q in (c.get("subj_queries") or [])]
            answers = iter(a.answer for a in runner._generate(queries, [cfg.locality_tokens] * len(queries)))
            for c in edited:
                qs = c.get("subj_queries") or []
                before = [next(answers) for _ in qs]
                b = base[c["case_id"]]
                if not qs:
                    b["subj_queries"] = b["subj_before"] = b["subj_after"] = b["subj_routed"] = b["subj_loc"] = None
                    c["subj_before"] = c["subj_loc"] = None
                    continue
                b.update(subj_queries=qs, subj_before=before, subj_after=before, subj_routed=[None] * len(qs),
                         subj_loc=1.0)
                same = [M.generation_agrees(x, y) for x, y in zip(before, c["subj_after"])]
                c.update(subj_before=before, subj_loc=sum(same) / len(same))
            rescore_rows(runner, data["rows"], mode, list(base.values()), edited)
    finally:
        backend.close()
    info = data["extra"].setdefault("base_from", {})
    info["subject_questions_asked_here"] = len({c["case_id"] for c in data["cases"] if c.get("subj_queries")})
    info["subject_questions_asked_by"] = "research/reask_subject.py (after the run)"
    write_eval(data, args.run)
    for row in data["rows"]:
        print(row["name"], row["subject_locality"].get("mean"), row["subject_locality_queries"],
              row["subject_locality_routed"])


if __name__ == "__main__":
    main()
