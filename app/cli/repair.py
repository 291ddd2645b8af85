"""``factpatch repair-eval``: the repair experiment of Tanno et al. (2022) on this service.

1. Screen a seeded shuffle of T-REx facts for ``--n`` facts the base model answers right (greedy,
   teacher-forced, on the relation's LAMA template), of relations with a train/val/test split of
   their ParaRel templates. Known facts are used so that a failure caused by a noisy datum can be
   cured by removing it (the base model then answers right again).
2. Replace the object of a ``--noise`` share of them by a wrong object of the same relation
   ("annotation noise") and calibrate all of them (CaliNet, train templates).
3. F = questions (the true facts on their templates) the base model gets right and the calibrated
   model gets wrong. Query half: train and val templates (``--query-val``: val only); held-out
   half: test templates, never trained on.
4. Identify causes from the query half, treat the top ``--top-k`` (default: the number of noisy
   facts), and measure on the held-out half and on the clean facts (test templates).
   Baselines: a random ranking and the per-fact training loss.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer

from app.knowledge.cka import ScoreItem, encode_item
from app.knowledge.facts import Fact, load_facts
from app.knowledge.templates import load_relations


def _rows(lm, facts, templates):
    out = []
    for f, t in zip(facts, templates):
        p, o, _ = encode_item(lm, ScoreItem(t, f.subject, f.object))
        out.append((tuple(p), tuple(o)))
    return out


def select_known(lm, facts: list[Fact], n: int, *, probe: int = 16, chunk: int = 256, log=print) -> tuple[list[Fact], dict[str, Any]]:
    """``n`` facts whose object is the base model's greedy answer on the relation's LAMA template.

    A probe of ``probe`` facts per relation orders the relations by the share the model knows;
    the facts are then screened relation by relation in that order (a 135M model knows few
    T-REx facts, so screening in file order would take hours)."""
    from app.methods.repair.method import score_rows

    relations = load_relations()
    by_rel: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)

    def known_of(batch: list[Fact]) -> list[bool]:
        rows = _rows(lm, batch, [relations[f.relation].template for f in batch])
        keep = [i for i, r in enumerate(rows) if r[1]]
        flags = [False] * len(batch)
        for i, (_, ok) in zip(keep, score_rows(lm, [rows[i] for i in keep], [])):
            flags[i] = ok
        return flags

    probe_facts = [f for fs in by_rel.values() for f in fs[:probe]]
    flags = known_of(probe_facts)
    rate: dict[str, float] = {}
    known: list[Fact] = []
    for rel, fs in by_rel.items():
        got = [f for f, ok in zip(probe_facts, flags) if ok and f.relation == rel]
        rate[rel] = len(got) / max(1, min(probe, len(fs)))
        known.extend(got)
    log(f"probe of {len(probe_facts)} facts: {len(known)} known")
    screened = len(probe_facts)
    for rel in sorted(rate, key=lambda r: -rate[r]):
        if len(known) >= n or rate[rel] == 0:
            break
        rest = by_rel[rel][probe:]
        for start in range(0, len(rest), chunk):
            batch = rest[start : start + chunk]
            known.extend(f for f, ok in zip(batch, known_of(batch)) if ok)
            screened += len(batch)
            log(f"screened {screened}: {len(known)} known ({rel})")
            if len(known) >= n:
                break
    order = {id(f): i for i, f in enumerate(facts)}
    known = sorted(known, key=lambda f: order[id(f)])[:n]
    return known, {"screened": screened, "known": len(known), "probe_known_rate": rate}


def precision_at(ranking: list[int], noisy: set[int], ks: list[int]) -> dict[int, float]:
    return {k: sum(1 for i in ranking[:k] if i in noisy) / k for k in ks}


def _plots(out: Path, curves: dict[str, list[float]], steps: list[dict[str, Any]], n_query: int, n_held: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel("k (top-ranked facts)")
    ax.set_ylabel("precision@k (noisy facts)")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "precision_at_k.png", dpi=120)
    files.append("precision_at_k.png")
    plt.close(fig)
    if steps:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [s["step_size"] for s in steps]
        ax.plot(xs, [s["query_fixed"] / max(1, n_query) for s in steps], marker="o", label="query half")
        ax.plot(xs, [s.get("heldout_fixed", 0) / max(1, n_held) for s in steps], marker="o", label="held-out half")
        ax.plot(xs, [s["kept_train_accuracy"] for s in steps], marker=".", linestyle=":", label="kept training rows acc.")
        ax.set_xscale("log")
        ax.set_xlabel("step size γ (Newton removal)")
        ax.set_ylabel("share of failures fixed")
        ax.set_ylim(0, 1.02)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "fixed_vs_step.png", dpi=120)
        files.append("fixed_vs_step.png")
        plt.close(fig)
    return files


def repair_eval_cmd(
    file: Path = typer.Option(Path("../shared/data/pararel/trex_facts.jsonl"), "--file", help="JSON lines of T-REx facts."),
    n: int = typer.Option(500, "--n", min=10, max=1000, help="Facts to calibrate."),
    noise: float = typer.Option(0.1, "--noise", min=0.0, max=0.9, help="Share of facts given a wrong object of the same relation."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Causes to treat (default: the number of noisy facts)."),
    identify: str = typer.Option("ewc", "--identify", help="influence or ewc."),
    treatment: str = typer.Option("newton", "--treatment", help="newton, ewc or finetune (the eval's default stays the paper's Newton removal)."),
    step_size: Optional[float] = typer.Option(None, "--step-size", help="γ of the Newton removal (default: chosen on the query half)."),
    damping: Optional[float] = typer.Option(None, "--damping", help="Fisher damping (fraction of its mean)."),
    parameters: Optional[str] = typer.Option(None, "--parameters", help="KV or V."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fact order, the noise and the random baseline."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="CaliNet passes over the facts (default: its config's)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="CaliNet learning rate (default: its config's)."),
    out: Path = typer.Option(Path("results/repair_eval"), "--out", help="Folder for results.json, report.md and plots."),
    cache: Path = typer.Option(Path("/tmp/factpatch-repair-eval"), "--cache", help="Where screened facts and calibrations are kept between runs."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: FACTPATCH_MODEL)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    query_train: bool = typer.Option(
        True, "--query-train/--query-val",
        help="Query half: the facts asked on their training and validation templates (default), or on validation "
        "templates only. The held-out half is always the test templates, never trained on.",
    ),
) -> None:
    import torch

    from app.cli.calibrate import calibratable
    from app.delta import Delta
    from app.lm import LM
    from app.methods.calinet.config import CaliNetConfig
    from app.methods.calinet.method import calibrate, fact_splits
    from app.methods.repair.config import RepairConfig
    from app.methods.repair.method import Question, ScopedCalibration, repair, score_rows
    from app.settings import get_settings

    if threads:
        torch.set_num_threads(threads)
    command = "factpatch repair-eval " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "factpatch repair-eval"
    settings = get_settings()
    lm = LM.load(model or settings.model, settings.home, settings.device, settings.dtype)
    rng = random.Random(seed)
    pool = calibratable(load_facts(file))
    rng.shuffle(pool)
    t0 = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    skey = hashlib.sha256(json.dumps([lm.name, [f.__dict__ for f in pool], n], sort_keys=True).encode()).hexdigest()[:16]
    spath = cache / f"screen-{skey}.json"
    if spath.exists():
        saved = json.loads(spath.read_text())
        known = [Fact(**{**f, "negatives": tuple(f.get("negatives") or ())}) for f in saved["known"]]
        screen = saved["screen"]
        typer.echo(f"screened facts from {spath}")
    else:
        known, screen = select_known(lm, pool, n, log=typer.echo)
        spath.write_text(json.dumps({"known": [f.__dict__ for f in known], "screen": screen}))
    if len(known) < n:
        raise typer.BadParameter(f"only {len(known)} known facts found")
    objects: dict[str, list[str]] = {}
    for f in pool:
        objects.setdefault(f.relation, []).append(f.object)
    noisy = set(rng.sample(range(n), round(noise * n)))
    train = []
    for i, f in enumerate(known):
        if i in noisy:
            choices = sorted({o for o in objects[f.relation] if o != f.object})
            train.append(Fact(f.subject, rng.choice(choices), f.relation))
        else:
            train.append(f)
    screen_s = time.perf_counter() - t0

    # calibrate (cached by its facts and config)
    cfg = CaliNetConfig(evaluate=False, **({"epochs": epochs} if epochs else {}), **({"lr": lr} if lr else {}))
    key = hashlib.sha256(json.dumps([lm.name, [f.__dict__ for f in train], cfg.model_dump()], default=str,
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"calibration-{key}.safetensors"
    t1 = time.perf_counter()
    if path.exists():
        delta = Delta.from_bytes(path.read_bytes())
        typer.echo(f"calibration from {path}")
    else:
        def progress(step: int, total: int, loss: float) -> None:
            if step % 10 == 0 or step == total:
                typer.echo(f"calibration step {step}/{total} loss {loss:.3f}")

        delta = calibrate(lm, train, cfg, progress).delta
        path.write_bytes(delta.to_bytes())
    calibrate_s = time.perf_counter() - t1

    # failures: true facts on val (query) and test (held-out) templates, right before, wrong now
    splits = fact_splits(known)
    cand: list[tuple[int, str, str]] = []
    for i, (f, s) in enumerate(zip(known, splits)):
        ask = (*s.train, *s.val) if query_train else s.val
        cand += [(i, t, "query") for t in ask] + [(i, t, "heldout") for t in s.test]
    rows = _rows(lm, [known[i] for i, _, _ in cand], [t for _, t, _ in cand])
    base = score_rows(lm, rows, [])
    cal = score_rows(lm, rows, [delta])
    questions = [Question(r[0], r[1], i, t, half) for (i, t, half), r, b, c in zip(cand, rows, base, cal)
                 if r[1] and b[1] and not c[1]]
    failing_facts = sorted({q.failure for q in questions})
    typer.echo(f"{len(questions)} failing questions ({sum(q.half == 'query' for q in questions)} query) "
               f"of {len(failing_facts)} facts, {len(set(failing_facts) & noisy)} of them noisy")

    k = top_k or max(1, len(noisy))
    rc = dict(identify=identify, treatment=treatment, top_k=k, max_causes_reported=n)
    for name, value in (("step_size", step_size), ("damping", damping), ("parameters", parameters)):
        if value is not None:
            rc[name] = value
    config = RepairConfig(**rc)
    t2 = time.perf_counter()
    outcome = repair(lm, questions, [ScopedCalibration("cal", delta, train)], [], config=config,
                     progress=lambda s, t, l: (s % 20 == 0 or s == t) and typer.echo(f"repair {s}/{t}"))
    repair_s = time.perf_counter() - t2

    ranking = [c.fact for c in outcome.causes if c.kind == "calibration_fact"]
    loss = outcome.baselines["cal"]["loss"]
    by_loss = sorted(range(n), key=lambda i: -loss[i])
    rand = list(range(n))
    random.Random(seed + 1).shuffle(rand)
    ks = sorted({1, 5, 10, 20, 50, 100, len(noisy)} & set(range(1, n + 1)))
    rankings = [(f"repair ({identify})", ranking)]
    if identify != "influence":
        infl = outcome.baselines["cal"]["influence"]
        rankings.append(("repair (influence)", sorted(range(n), key=lambda i: -infl[i])))
    rankings += [("training loss", by_loss), ("random", rand)]
    curves = {name: [sum(1 for i in r[:j] if i in noisy) / j for j in range(1, n + 1)] for name, r in rankings}

    # clean facts on their test templates, with and without the repair
    clean = [i for i in range(n) if i not in noisy]
    crow, cidx = [], []
    for i in clean:
        for t in splits[i].test:
            crow.append(_rows(lm, [known[i]], [t])[0])
            cidx.append(i)
    extra = list(outcome.deltas.values())
    c_before = score_rows(lm, crow, [delta])
    c_after = score_rows(lm, crow, [delta] + extra)
    acc_b = sum(ok for _, ok in c_before) / max(1, len(crow))
    acc_a = sum(ok for _, ok in c_after) / max(1, len(crow))
    rep = outcome.report
    held = rep["failures"]["heldout"]
    query = rep["failures"]["query"]
    result = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": lm.name,
        "n": n, "noise": noise, "noisy": len(noisy), "seed": seed, "top_k": k,
        "query_templates": "train+val" if query_train else "val",
        "config": config.model_dump(),
        "screen": screen,
        "failures": {"questions": len(questions), "query": query["questions"], "heldout": held["questions"],
                     "facts": len(failing_facts), "noisy_facts_with_failures": len(set(failing_facts) & noisy)},
        "precision_at": {name: {str(j): curves[name][j - 1] for j in ks} for name in curves},
        "treatment": {
            "heldout_fixed_share": held["fixed_share"], "heldout_fixed": held["fixed"], "heldout_failing": held["failing_before"],
            "query_fixed_share": query["fixed_share"],
            "clean_facts_accuracy": {"before": acc_b, "after": acc_a, "drop_points": 100 * (acc_b - acc_a),
                                     "questions": len(crow)},
            "perplexity_generic": rep["perplexity_generic"],
            "step_size": rep["step_size"], "step_search": rep["step_search"],
            "treated_noisy": sum(1 for c in outcome.treated if c.fact in noisy), "treated": len(outcome.treated),
        },
        "seconds": {"screen": round(screen_s, 1), "calibrate": round(calibrate_s, 1), "repair": round(repair_s, 1),
                    **rep["seconds"]},
    }
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = _plots(out, curves, rep["step_search"], query["failing_before"], held["failing_before"])
    _write(out, result, markdown(result))


def _write(out: Path, result: dict[str, Any], report: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(report)
    typer.echo(report)


def markdown(r: dict[str, Any]) -> str:
    t = r["treatment"]
    lines = [
        f"# repair-eval: {r['n']} facts, {r['noisy']} noisy ({r['model']})", "",
        f"`{r['command']}` ({r['date']})", "",
        f"Failures: {r['failures']['questions']} questions ({r['failures']['query']} query, "
        f"{r['failures']['heldout']} held-out) of {r['failures']['facts']} facts; "
        f"{r['failures']['noisy_facts_with_failures']} of the {r['noisy']} noisy facts cause at least one.", "",
        "| ranking | " + " | ".join(f"p@{k}" for k in next(iter(r["precision_at"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(r["precision_at"].values()))),
    ]
    for name, vals in r["precision_at"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals.values()) + " |")
    ppl = t["perplexity_generic"]
    fixed_share = t["heldout_fixed_share"]
    lines += [
        "", f"Treatment `{r['config']['treatment']}` of the top {r['top_k']} ({t['treated']} treated, "
        f"{t['treated_noisy']} of them noisy); step size {t['step_size']}", "",
        "| measure | value |", "|---|---|",
        f"| held-out failures fixed | {t['heldout_fixed']}/{t['heldout_failing']}"
        + (f" ({fixed_share:.1%})" if fixed_share is not None else "") + " |",
        f"| query failures fixed | {t['query_fixed_share'] if t['query_fixed_share'] is None else format(t['query_fixed_share'], '.1%')} |",
        f"| clean facts, test templates: accuracy | {t['clean_facts_accuracy']['before']:.1%} -> "
        f"{t['clean_facts_accuracy']['after']:.1%} ({t['clean_facts_accuracy']['drop_points']:+.1f} points drop) |",
        f"| generic perplexity | {ppl['before']:.2f} -> {ppl['after']:.2f} ({ppl['ratio'] - 1:+.2%}) |",
        f"| identification + treatment | {r['seconds']['identify'] + r['seconds']['treat']:.0f} s |",
        "", "Seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()), "",
    ]
    if t["step_search"]:
        lines += ["| γ | query fixed | held-out fixed | fit ppl ratio | kept train acc | within limits |", "|---|---|---|---|---|---|"]
        for s in t["step_search"]:
            lines.append(f"| {s['step_size']:.3g} | {s['query_fixed']} | {s.get('heldout_fixed', '')} | "
                         f"{s['fit_perplexity_ratio']:.4f} | {s['kept_train_accuracy']:.3f} | {s['within_limits']} |")
    lines += ["", *[f"![{p}]({p})" for p in r.get("plots", [])]]
    return "\n".join(lines) + "\n"


def repair_eval_edits_cmd(
    n: int = typer.Option(200, "--n", min=1, max=2000, help="Good edits made before the bad one."),
    file: Path = typer.Option(Path("../shared/data/counterfact/counterfact_train.json"), "--file",
                              help="CounterFact records of the good edits."),
    facts_file: Path = typer.Option(Path("../shared/data/pararel/trex_facts.jsonl"), "--facts",
                                    help="T-REx facts: the bad edit's subject and the questions it breaks."),
    relation: str = typer.Option("P36", "--relation", help="T-REx relation of the questions the bad edit breaks."),
    subject: str = typer.Option("capital", "--subject",
                                help="Subject the bad edit names: a word of the relation's questions, not an entity."),
    questions_n: int = typer.Option(40, "--questions", min=3, max=500, help="Known facts of the relation asked."),
    method: str = typer.Option("pnp", "--method", help="Method of every edit."),
    out: Path = typer.Option(Path("results/repair_eval_edits"), "--out", help="Folder for results.json and report.md."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
) -> None:
    """A planted bad edit among ``--n`` good ones, found and reverted by a repair (through the API).

    The bad edit gives one fact of ``--relation`` a wrong object and names as its subject a word of
    the relation's questions (``--subject``, e.g. "capital") with ``"scope": "subject"``: its keys
    route unrelated questions (other subjects' facts of that relation) to it, and those the base
    model knew (T-REx, LAMA template, teacher-forced greedy) become failures. The repair is asked
    about them with every edit in scope; the bad edit should rank first. Applied, it reverts the
    bad edit; the failures' and the good edits' answers are checked, and the repair is reverted
    again."""
    from app.cli.common import quiet_http_logs, set_threads
    from app.eval.backends import BackendError, InProcessBackend
    from app.eval.datasets import load_dataset

    set_threads(threads)
    quiet_http_logs()
    command = "factpatch " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "factpatch repair-eval-edits"
    relations = load_relations()
    if relation not in relations:
        raise typer.BadParameter(f"unknown relation {relation!r}")
    all_facts = [f for f in load_facts(facts_file) if f.relation == relation]
    facts = all_facts[: 10 * questions_n]
    pool = load_dataset("counterfact", file).cases
    backend = InProcessBackend()
    t_start = time.perf_counter()
    try:
        def score(pairs):
            return backend.score(pairs, "completion")

        from app.knowledge.facts import prefix

        questions = [(prefix(relations[f.relation].template, f.subject), " " + f.object.strip()) for f in facts]
        base = score(questions)
        known = [(q, f) for q, f, s in zip(questions, facts, base) if s.all_correct and q[0]][:questions_n]
        typer.echo(f"{len(known)} known facts of {relation} (of {len(facts)} screened)")
        if len(known) < 3:
            raise typer.BadParameter(f"the base model knows fewer than 3 facts of {relation}")

        t0 = time.perf_counter()
        good: list[str] = []
        cases = []
        for case in pool:
            if len(good) == n:
                break
            try:
                good.append(backend.edit(case, method).id)
            except BackendError as exc:
                if exc.code != "target_already_holds":  # a record the base model already answers so
                    raise
                continue
            cases.append(case)
            if len(good) % 20 == 0 or len(good) == n:
                typer.echo(f"good edits {len(good)}/{n}")
        edits_s = time.perf_counter() - t0
        good_pairs = [(c.prompt, " " + c.target.strip()) for c in cases]
        good_before = score(good_pairs)

        (bad_q, bad_fact), rest = known[0], known[1:]
        wrong = next(f.object for f in all_facts if f.object != bad_fact.object)
        bad = backend.request("POST", "/edits", json={
            "prompt": bad_q[0], "target": wrong, "subject": subject, "method": method, "scope": "subject"})["id"]
        after_bad = score([q for q, _ in rest])
        failing = [(q, s) for (q, _), s in zip(rest, after_bad) if not s.all_correct]
        routed_bad = sum(1 for _, s in failing if s.edit_id == bad)
        typer.echo(f"bad edit {bad}: {len(failing)} of {len(rest)} other known facts of {relation} now wrong "
                   f"({routed_bad} routed to it)")
        if not failing:
            raise typer.BadParameter("the bad edit broke nothing")

        def run(apply: bool) -> dict[str, Any]:
            body = {"failures": [{"prompt": q[0], "target": q[1].strip()} for q, _ in failing],
                    "scope": {"edits": "all", "calibrations": []}, "treatment": "revert", "apply": apply,
                    "config": {"top_k": 1}}
            rid = backend.request("POST", "/repairs", json=body)["id"]
            while True:  # until the job is over: an applied repair reads "active" before it reverts the edits
                rep = backend.request("GET", f"/repairs/{rid}")
                job = (rep.get("job") or {}).get("status")
                if rep["status"] in ("reported", "active", "failed") and job in (None, "succeeded", "failed"):
                    return rep
                time.sleep(0.5)

        t1 = time.perf_counter()
        report = run(False)
        report_s = time.perf_counter() - t1
        if report["status"] == "failed":
            raise RuntimeError(f"repair failed: {report['result']}")
        causes = report["result"]["causes"]
        rank = next((i + 1 for i, c in enumerate(causes) if c.get("id") == bad), None)
        applied = run(True)
        fixed = score([q for q, _ in failing])
        good_after = score(good_pairs)
        backend.request("POST", f"/admin/repairs/{applied['id']}/revert")
        again = score([q for q, _ in failing])
        result = {
            "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": backend.model_id(), "method": method, "good_edits": len(good), "relation": relation, "subject": subject,
            "bad_edit": {"prompt": bad_q[0], "target": wrong, "scope": "subject"},
            "screened": len(facts), "known": len(known), "failures": len(failing), "failures_routed_to_bad": routed_bad,
            "bad_rank": rank, "top_causes": causes[:5],
            "after_revert_by_repair": {"failures_fixed": sum(s.all_correct for s in fixed),
                                       "good_edits_holding_before": sum(s.all_correct for s in good_before),
                                       "good_edits_holding_after": sum(s.all_correct for s in good_after)},
            "after_repair_reverted": {"failures_wrong_again": sum(not s.all_correct for s in again)},
            "seconds": {"good_edits": round(edits_s, 1), "repair_report": round(report_s, 1),
                        "repair_job": report["result"].get("seconds"), "total": round(time.perf_counter() - t_start, 1)},
        }
    finally:
        backend.close()
    _write(out, result, edits_markdown(result))


def edits_markdown(r: dict[str, Any]) -> str:
    a = r["after_revert_by_repair"]
    lines = [
        f"# repair-eval-edits: a bad edit among {r['good_edits']} good ones ({r['model']}, `{r['method']}`)", "",
        f"`{r['command']}` ({r['date']})", "",
        f"Bad edit: `{r['bad_edit']['prompt']}` -> `{r['bad_edit']['target']}`, subject `{r['subject']}`, scope `subject`. "
        f"It broke {r['failures']} of the {r['known'] - 1} other facts of {r['relation']} the base model knew "
        f"({r['failures_routed_to_bad']} of them routed to it).", "",
        "| measure | value |", "|---|---|",
        f"| rank of the bad edit among {r['good_edits'] + 1} edits (repair, leave-one-out) | {r['bad_rank']} |",
        f"| failures fixed once the repair is applied (the bad edit reverted) | {a['failures_fixed']}/{r['failures']} |",
        f"| good edits holding (greedy, their prompt) before / after | {a['good_edits_holding_before']} / {a['good_edits_holding_after']} |",
        f"| failures wrong again once the repair is reverted (the bad edit reinstated) | {r['after_repair_reverted']['failures_wrong_again']}/{r['failures']} |",
        f"| seconds: {r['good_edits']} good edits / repair report | {r['seconds']['good_edits']} / {r['seconds']['repair_report']} |",
        "", "Top causes: " + "; ".join(f"{c.get('kind')} {c.get('id', '')[:8]} {c.get('score', 0):.2f}" for c in r["top_causes"]),
    ]
    return "\n".join(lines) + "\n"
