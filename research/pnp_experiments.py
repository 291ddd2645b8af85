"""Measurements behind the `pnp` method and the selector defaults (see docs/pnp-notes.md).

Sub-commands:

``routing``
    Selector confusion with N edits in memory, for several encoders (MiniLM, the base model's
    pooled hidden states at several layers, raw or centred) and rules (similarity alone,
    subject named + similarity). Tune on CounterFact train / zsRE 500-999, report on
    CounterFact val / zsRE 0-199 with the tuned values.
``lookup``
    Lookup latency at 10,000 edits x 3 keys (query embedding excluded).
``e2e``
    The service simulated in-process: fit every edit with `pnp`, add its keys, keep all active,
    then route prompt / rephrase / locality prompt and score with the routed edit's delta.

Run from the repository root, e.g. ``python research/pnp_experiments.py routing --split tune``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
CF_TRAIN = DATA / "counterfact" / "counterfact_train.json"
CF_VAL = DATA / "counterfact" / "counterfact_val.json"
ZSRE = DATA / "zsre" / "zsre_train_1k.json"


@dataclass
class Case:
    dataset: str
    prompt: str
    target: str
    subject: str
    rephrase: str
    loc_prompt: str


def cf_cases(path: Path, start: int, n: int) -> list[Case]:
    records = json.loads(path.read_text())[start : start + n]
    return [
        Case("counterfact", r["prompt"], r["target_new"], r["subject"], r["rephrase_prompt"], r["locality_prompt"])
        for r in records
    ]


def zsre_cases(start: int, n: int) -> list[Case]:
    """zsRE records [start, start+n); records with an empty target are skipped, not fixed."""
    records = json.loads(ZSRE.read_text())[start : start + n]
    out = []
    for r in records:
        if not r["alt"].strip():
            continue
        loc = r["loc"].removeprefix("nq question: ").strip()
        out.append(Case("zsre", r["src"], r["alt"], r["subject"], r["rephrase"], loc))
    return out


SPLITS = {
    # name: list of (label, loader) groups; each group is one memory of N edits
    "tune": lambda n: [
        ("cf-train[0:n]", cf_cases(CF_TRAIN, 0, n)),
        ("cf-train[2000:+n]", cf_cases(CF_TRAIN, 2000, n)),
        ("cf-train[5000:+n]", cf_cases(CF_TRAIN, 5000, n)),
        ("zsre[500:+n]", zsre_cases(500, n)),
        ("zsre[750:+n]", zsre_cases(750, n)),
    ],
    "heldout": lambda n: [
        ("cf-val[0:n]", cf_cases(CF_VAL, 0, n)),
        ("zsre[0:n]", zsre_cases(0, n)),
    ],
}


def load_lm(threads: int):
    from app.lm import LM

    torch.set_num_threads(threads)
    return LM.load("embedded:smollm2-135m-instruct", Path("~/.factpatch").expanduser())


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------
def all_layer_states(lm, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Mean-pooled hidden states after every block: [layers, n, d] (one forward per batch)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            ids = [lm.tokenizer(t, add_special_tokens=True).input_ids for t in texts[start : start + batch_size]]
            input_ids, attn = lm._pad(ids, left=False)
            hs = lm.model(input_ids=input_ids, attention_mask=attn, output_hidden_states=True).hidden_states[1:]
            mask = attn.unsqueeze(-1).float()
            out.append(torch.stack([(h.float() * mask).sum(1) / mask.sum(1) for h in hs]).numpy())
    return np.concatenate(out, axis=1)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


PARAREL = DATA / "pararel" / "pararel_patterns_all.jsonl"


def pararel_templates() -> dict[str, list[str]]:
    """relation -> prompt templates ("[X] was born in") of ParaRel patterns that end in [Y]."""
    import re

    out: dict[str, list[str]] = {}
    for line in PARAREL.read_text().splitlines():
        rec = json.loads(line)
        pat = rec["pattern"].strip()
        if re.search(r"\[Y\]\s*\.?$", pat) and "[X]" in pat:
            out.setdefault(rec["relation"], []).append(re.sub(r"\s*\[Y\]\s*\.?$", "", pat))
    return out


def same_subject_queries(cases: list[Case], seed: int = 0) -> list[tuple[str, int]]:
    """Out-of-scope queries that name an edit's subject with another relation: for each
    CounterFact prompt that is a ParaRel template of relation R, one template of a relation
    other than R with the edit's subject filled in. (query, edit index) pairs."""
    import random

    templates = pararel_templates()
    by_text = {t.lower(): rel for rel, ts in templates.items() for t in ts}
    rels = sorted(templates)
    rng = random.Random(seed)
    out = []
    for i, c in enumerate(cases):
        rel = by_text.get(c.prompt.replace(c.subject, "[X]").strip().lower())
        if rel is None:
            continue
        other = rng.choice([r for r in rels if r != rel])
        out.append((rng.choice(templates[other]).replace("[X]", c.subject), i))
    return out


@dataclass
class Group:
    label: str
    cases: list[Case]
    key_texts: list[str]
    key_edit: np.ndarray
    in_queries: list[tuple[str, int, str]]  # (text, edit index, kind)
    out_queries: list[str]
    n_loc: int  # out_queries[:n_loc] are locality prompts, the rest same-subject other-relation


def make_group(label: str, cases: list[Case], subject_key: bool) -> Group:
    key_texts, key_edit = [], []
    for i, c in enumerate(cases):
        key_texts.append(c.prompt)
        key_edit.append(i)
        if subject_key:
            key_texts.append(c.subject)
            key_edit.append(i)
    in_q = [(c.prompt, i, "prompt") for i, c in enumerate(cases)] + [
        (c.rephrase, i, "rephrase") for i, c in enumerate(cases)
    ]
    out_q = [c.loc_prompt for c in cases]
    same = [q for q, _ in same_subject_queries(cases)] if cases[0].dataset == "counterfact" else []
    return Group(label, cases, key_texts, np.array(key_edit), in_q, out_q + same, len(out_q))


def named_mask(cases: list[Case], queries: list[str]) -> np.ndarray:
    from app.selector.router import subject_in

    return np.array([[subject_in(c.subject, q) for c in cases] for q in queries], dtype=bool)


def edit_scores(qv: np.ndarray, kv: np.ndarray, key_edit: np.ndarray, n_edits: int) -> np.ndarray:
    """[queries, edits]: best key similarity per edit."""
    sims = qv @ kv.T
    out = np.full((len(qv), n_edits), -np.inf, dtype=np.float32)
    for k, e in enumerate(key_edit):
        out[:, e] = np.maximum(out[:, e], sims[:, k])
    return out


def decide(scores: np.ndarray, named: np.ndarray, rule: str, t: float, t_open: float) -> np.ndarray:
    """Chosen edit per query (-1: none). rule: similarity | subject | subject+open."""
    if rule == "similarity":
        thr = np.full_like(scores, t)
    elif rule == "subject":
        thr = np.where(named, t, np.inf)
    else:
        thr = np.where(named, t, t_open)
    masked = np.where(scores >= thr, scores, -np.inf)
    best = masked.argmax(1)
    return np.where(np.isfinite(masked.max(1)), best, -1)


def confusion(group: Group, scores_in, named_in, scores_out, named_out, rule, t, t_open) -> dict:
    d_in = decide(scores_in, named_in, rule, t, t_open)
    d_out = decide(scores_out, named_out, rule, t, t_open)
    truth = np.array([e for _, e, _ in group.in_queries])
    kinds = np.array([k for _, _, k in group.in_queries])
    res = {}
    for kind in ("prompt", "rephrase"):
        sel = kinds == kind
        res[kind] = {
            "correct": float(np.mean(d_in[sel] == truth[sel])),
            "wrong": float(np.mean((d_in[sel] != truth[sel]) & (d_in[sel] >= 0))),
            "none": float(np.mean(d_in[sel] < 0)),
        }
    loc, same = d_out[: group.n_loc], d_out[group.n_loc :]
    res["out"] = {"none": float(np.mean(loc < 0)), "routed": float(np.mean(loc >= 0))}
    if same.size:
        res["same"] = {"none": float(np.mean(same < 0)), "routed": float(np.mean(same >= 0)), "n": int(same.size)}
    return res


def encoder_vectors(spec: str, lm, texts: list[str], cache: dict) -> np.ndarray:
    """Vectors for ``texts`` under an encoder spec: minilm | hidden:<layer> | hiddenc:<layer>."""
    if spec == "minilm":
        from app.selector.encoders import MiniLMEncoder

        return MiniLMEncoder().encode(texts)
    kind, layer = spec.split(":")
    layer = int(layer)
    key = tuple(texts)
    if key not in cache:
        cache[key] = all_layer_states(lm, texts)
    states = cache[key][layer]
    if kind == "hiddenc":
        if "center" not in cache:
            from app.selector.pool import locality_pool

            cache["center"] = all_layer_states(lm, locality_pool()).mean(1)
        states = states - cache["center"][layer]
    return unit(states)


def cmd_routing(args) -> None:
    lm = load_lm(args.threads) if any(s != "minilm" for s in args.encoders) else None
    groups = [make_group(label, cases, args.subject_key) for label, cases in SPLITS[args.split](args.n)]
    cache: dict = {}
    thresholds = np.round(np.arange(0.0, 1.0001, 0.01), 3)
    opens_grid = np.round(np.arange(0.6, 1.0001, 0.02), 3)
    results = {}
    for spec in args.encoders:
        t0 = time.perf_counter()
        mats = []
        for g in groups:
            texts = g.key_texts + [q for q, _, _ in g.in_queries] + g.out_queries
            vec = encoder_vectors(spec, lm, texts, cache)
            nk, ni = len(g.key_texts), len(g.in_queries)
            kv, qi, qo = vec[:nk], vec[nk : nk + ni], vec[nk + ni :]
            n = len(g.cases)
            mats.append((
                edit_scores(qi, kv, g.key_edit, n), named_mask(g.cases, [q for q, _, _ in g.in_queries]),
                edit_scores(qo, kv, g.key_edit, n), named_mask(g.cases, g.out_queries),
            ))
        enc_s = time.perf_counter() - t0
        for rule in args.rules:
            opens = opens_grid if rule == "subject+open" else [np.inf]
            rows = []
            for t in thresholds:
                for t_open in opens:
                    if rule == "subject+open" and t_open < t:
                        continue
                    per = [confusion(g, *m, rule, t, t_open) for g, m in zip(groups, mats)]
                    rows.append((float(t), float(t_open), per))
            results[(spec, rule)] = rows
            if args.fixed:
                continue  # report only the given settings (held-out use): no picking here
            best = pick(rows, args.same_weight)
            t, t_open, per = best
            print(f"\n== {spec} / {rule}: t={t} t_open={t_open} objective {objective(per, args.same_weight):.4f}"
                  f" (encode {enc_s:.1f}s)")
            for g, r in zip(groups, per):
                print(f"  {g.label:18s} {fmt(r)}")
            if args.curve and rule in ("subject", "similarity"):
                for tt, _, pp in rows[::5]:
                    print(f"    t={tt:.2f} objective {objective(pp, args.same_weight):.4f} rephrase "
                          f"{statistics.mean(p['rephrase']['correct'] for p in pp):.3f} loc-none "
                          f"{statistics.mean(p['out']['none'] for p in pp):.3f} same-none "
                          f"{statistics.mean(p['same']['none'] for p in pp if 'same' in p) if any('same' in p for p in pp) else float('nan'):.3f}")
    for fixed in args.fixed or []:
        spec, rule, t, t_open = fixed.split(",")
        rows = results[(spec, rule)]
        for tt, to, per in rows:
            if abs(tt - float(t)) < 1e-6 and (rule != "subject+open" or abs(to - float(t_open)) < 1e-6):
                print(f"\n== fixed {spec} / {rule}: t={tt} t_open={to}")
                for g, r in zip(groups, per):
                    print(f"  {g.label:18s} {fmt(r)}")


def objective(per: list[dict], same_weight: float) -> float:
    """Mean over groups of in-scope accuracy (prompt and rephrase) plus out-of-scope rejection
    (locality prompts, and same-subject other-relation queries weighted by ``same_weight``)."""
    vals = []
    for p in per:
        v = p["prompt"]["correct"] + p["rephrase"]["correct"] + p["out"]["none"]
        if "same" in p:
            v += same_weight * p["same"]["none"]
        vals.append(v)
    return statistics.mean(vals)


def pick(rows, same_weight: float):
    """The best setting by ``objective`` (ties: the higher threshold, the larger margin)."""
    return max(rows, key=lambda r: (round(objective(r[2], same_weight), 4), r[0], r[1]))


def fmt(r: dict) -> str:
    p, q, o = r["prompt"], r["rephrase"], r["out"]
    return (f"prompt ok {p['correct']:.3f} wrong {p['wrong']:.3f} none {p['none']:.3f} | "
            f"rephrase ok {q['correct']:.3f} wrong {q['wrong']:.3f} none {q['none']:.3f} | "
            f"loc none {o['none']:.3f} routed {o['routed']:.3f}"
            + (f" | same-subj none {r['same']['none']:.3f} (n={r['same']['n']})" if "same" in r else ""))


# ---------------------------------------------------------------------------------------------
# fit: the adapter alone (no selector), on tuning cases
# ---------------------------------------------------------------------------------------------
def fit_case(lm, case: Case, config, with_paraphrase: bool = False):
    from app.methods import EditRequest, get

    method = get("pnp")
    req = EditRequest(case.prompt, case.target, subject=case.subject,
                      paraphrases=[case.rephrase] if with_paraphrase else [])
    return method.fit(lm, req, config)


def gen_match(lm, prompt: str, target: str, deltas) -> bool:
    """Greedy continuation starts with the target's tokens (completion form)."""
    want = lm.target_ids(prompt, target, "completion")
    got = lm.generate([prompt], max_new_tokens=len(want), mode="completion", deltas=deltas)[0].token_ids
    return got[: len(want)] == want


def cmd_fit(args) -> None:
    from app.methods import get
    from app.selector.scope import from_subject_sentence

    lm = load_lm(args.threads)
    method = get("pnp")
    config = method.parse_config(json.loads(args.config))
    if args.context_only:  # rephrases with a sentence of context before the one naming the subject
        pool = cf_cases(CF_TRAIN, args.start, 100_000) if args.dataset == "cf" else zsre_cases(500 + args.start, 100_000)
        cases = [c for c in pool if from_subject_sentence(c.rephrase, c.subject) != c.rephrase][: args.n]
    else:
        cases = cf_cases(CF_TRAIN, args.start, args.n) if args.dataset == "cf" else zsre_cases(500 + args.start, args.n)
    rows = []
    for case in cases:
        c0 = time.process_time()
        res = fit_case(lm, case, config)
        cpu_ms = (time.process_time() - c0) * 1000
        d = [res.delta]
        s = lm.score([case.prompt, case.rephrase], [case.target] * 2, mode="completion", deltas=d)
        base_loc = lm.generate([case.loc_prompt], max_new_tokens=8, mode="completion")[0].token_ids
        edit_loc = lm.generate([case.loc_prompt], max_new_tokens=8, mode="completion", deltas=d)[0].token_ids
        row = {
            "ms": res.train_ms, "cpu_ms": cpu_ms, "steps": res.steps, "conv": res.info["converged"],
            "rel": s[0].all_correct, "gen": s[1].all_correct,
            "rel_gen": gen_match(lm, case.prompt, case.target, d), "gen_gen": gen_match(lm, case.rephrase, case.target, d),
            # what the answer path's adapter reads: the rephrase from the sentence naming the subject
            "gen_cut": gen_match(lm, from_subject_sentence(case.rephrase, case.subject), case.target, d),
            "loc_raw": base_loc == edit_loc,
        }
        rows.append(row)
        if args.verbose:
            print(json.dumps(row), case.prompt, "->", case.target, "|", case.rephrase, flush=True)
    summarise_fit(rows, args.config)


def summarise_fit(rows: list[dict], label: str) -> None:
    ms = sorted(r["ms"] for r in rows)
    cpu = sorted(r["cpu_ms"] for r in rows)
    mean = lambda k: statistics.mean(float(r[k]) for r in rows)  # noqa: E731
    print(f"{label}: n={len(rows)} fit wall p50 {ms[len(ms)//2]:.0f} ms p95 {ms[int(len(ms)*0.95)]:.0f} ms, "
          f"cpu p50 {cpu[len(cpu)//2]:.0f} ms p95 {cpu[int(len(cpu)*0.95)]:.0f} ms "
          f"steps {mean('steps'):.1f} converged {mean('conv'):.2f} | rel {mean('rel'):.3f} gen {mean('gen'):.3f} "
          f"| greedy rel {mean('rel_gen'):.3f} gen {mean('gen_gen'):.3f} gen from the subject's sentence "
          f"{mean('gen_cut') if all('gen_cut' in r for r in rows) else float('nan'):.3f} | adapter-alone locality {mean('loc_raw'):.3f}",
          flush=True)


# ---------------------------------------------------------------------------------------------
# leak: what an edit does to another fact of its subject (a query the selector routes to it)
# ---------------------------------------------------------------------------------------------
def cmd_leak(args) -> None:
    """For CounterFact tuning records whose prompt is a ParaRel template, one query of another
    relation with the same subject: how often the edit changes its greedy answer, and how
    often that answer then contains the edit's target."""
    from app.methods import get

    lm = load_lm(args.threads)
    method = get("pnp")
    config = method.parse_config(json.loads(args.config))
    cases = cf_cases(CF_VAL if args.val else CF_TRAIN, args.start, args.n)
    changed = leaked = total = rephrased = 0
    steps, ms = [], []
    for query, i in same_subject_queries(cases)[: args.queries]:
        case = cases[i]
        res = fit_case(lm, case, config)
        steps.append(res.steps)
        ms.append(res.train_ms)
        base = lm.generate([query], max_new_tokens=8, mode="completion")[0]
        edited = lm.generate([query], max_new_tokens=8, mode="completion", deltas=[res.delta])[0]
        total += 1
        changed += base.token_ids != edited.token_ids
        leaked += case.target.lower() in edited.text.lower() and case.target.lower() not in base.text.lower()
        rephrased += gen_match(lm, case.rephrase, case.target, [res.delta])
        if args.verbose:
            print(json.dumps({"query": query, "target": case.target, "base": base.text, "edited": edited.text}), flush=True)
    ms.sort()
    print(f"{args.config}: n={total} same-subject other-relation queries: answer changed {changed / total:.3f}, "
          f"edit target in the answer {leaked / total:.3f} | rephrase greedy {rephrased / total:.3f} "
          f"steps {statistics.mean(steps):.1f} fit p50 {ms[len(ms) // 2]:.0f} ms", flush=True)


# ---------------------------------------------------------------------------------------------
# lookup latency
# ---------------------------------------------------------------------------------------------
def cmd_lookup(args) -> None:
    """route_vector latency with ``--edits`` edits of 3 random unit keys each (no encoding)."""
    from app.selector.router import KeyRecord, Selector

    class Fixed:
        name, dim = "fixed", args.dim

        def encode(self, texts):  # never called: queries are given as vectors
            raise AssertionError

    rng = np.random.default_rng(0)
    records = [
        KeyRecord(f"e{i}", unit(rng.standard_normal((3, args.dim))), ["k1", "k2", "k3"], f"Person{i} Surname{i}")
        for i in range(args.edits)
    ]
    settings = [
        ("subject rule (default)", dict()),
        ("subject + open threshold 0.9 (centroid prefilter)", dict(open_threshold=0.9)),
        ("similarity alone, centroid prefilter", dict(threshold=0.5, open_threshold=0.5)),
        ("similarity alone, exact scan", dict(threshold=0.5, open_threshold=0.5, exact_limit=10**9)),
    ]
    for label, kw in settings:
        sel = Selector(Fixed(), **kw)
        t0 = time.perf_counter()
        sel.replace_all(records)
        build_ms = (time.perf_counter() - t0) * 1000
        times = []
        for q in range(args.queries):
            i = int(rng.integers(args.edits))
            text = f"What is the occupation of Person{i} Surname{i} these days?"
            vec = unit(records[i].vectors[0] + 0.5 / np.sqrt(args.dim) * rng.standard_normal(args.dim))
            t0 = time.perf_counter()
            route = sel.route_vector(vec, text)
            times.append((time.perf_counter() - t0) * 1000)
            assert route is not None and route.edit_id == f"e{i}", (label, route)
        times.sort()
        print(f"{label}: {args.edits} edits x 3 keys, d={args.dim}: p50 {times[len(times)//2]:.3f} ms "
              f"p95 {times[int(len(times)*0.95)]:.3f} ms (replace_all {build_ms:.0f} ms)")


# ---------------------------------------------------------------------------------------------
# e2e: fit every edit, keep all active, route and score
# ---------------------------------------------------------------------------------------------
def cmd_e2e(args) -> None:
    from app.methods import EditRequest, get
    from app.selector.router import build_selector

    lm = load_lm(args.threads)
    method = get("pnp")
    config = method.parse_config(json.loads(args.config))
    if args.dataset == "cf":
        cases = cf_cases(CF_VAL, args.start, args.n)
    else:
        cases = zsre_cases(args.start, args.n)
    kw = json.loads(args.selector)
    selector = build_selector(lm, kw.pop("encoder", "minilm"), **kw)
    deltas, fit_ms, steps, conv = {}, [], [], []
    t_all = time.perf_counter()
    cpu_ms = []
    for i, c in enumerate(cases):
        c0 = time.process_time()
        res = method.fit(lm, EditRequest(c.prompt, c.target, subject=c.subject), config)
        cpu_ms.append((time.process_time() - c0) * 1000)
        rec = selector.keys_for(c.prompt, [], c.subject)
        rec.edit_id = str(i)
        selector.add(rec)
        deltas[str(i)] = res.delta
        fit_ms.append(res.train_ms)
        steps.append(res.steps)
        conv.append(res.info["converged"])
        if args.verbose or (i + 1) % 25 == 0:
            print(f"  fitted {i + 1}/{len(cases)}: {res.train_ms:.0f} ms, {res.steps} steps", flush=True)
    fit_wall = time.perf_counter() - t_all
    routes = {kind: selector.route_many([getattr(c, attr) for c in cases])
              for kind, attr in (("prompt", "prompt"), ("rephrase", "rephrase"), ("loc", "loc_prompt"))}
    rows = []
    for i, c in enumerate(cases):
        row: dict = {}
        for kind in ("prompt", "rephrase"):
            r = routes[kind][i]
            d = [deltas[r.edit_id]] if r else []
            row[f"{kind}_route"] = "own" if r and r.edit_id == str(i) else ("wrong" if r else "none")
            row[f"{kind}_tf"] = lm.score([getattr(c, kind)], [c.target], mode="completion", deltas=d)[0].all_correct
            row[f"{kind}_greedy"] = gen_match(lm, getattr(c, kind), c.target, d)
        r = routes["loc"][i]
        row["loc_route"] = "routed" if r else "none"
        if r:
            base = lm.generate([c.loc_prompt], max_new_tokens=args.loc_tokens, mode="completion")[0].token_ids
            edit = lm.generate([c.loc_prompt], max_new_tokens=args.loc_tokens, mode="completion",
                               deltas=[deltas[r.edit_id]])[0].token_ids
            row["loc_same"] = base == edit
        else:
            row["loc_same"] = True
        rows.append(row)
    mean = lambda k: statistics.mean(float(r[k]) for r in rows)  # noqa: E731
    frac = lambda k, v: statistics.mean(float(r[k] == v) for r in rows)  # noqa: E731
    ms = sorted(fit_ms)
    summary = {
        "dataset": args.dataset, "n": len(cases), "start": args.start, "config": json.loads(args.config),
        "selector": {"encoder": selector.encoder.name, "threshold": selector.threshold,
                     "subjectless_threshold": selector.subjectless_threshold,
                     "unnamed_threshold": selector.unnamed_threshold, "rule": selector.rule},
        "reliability_tf": mean("prompt_tf"), "generalization_tf": mean("rephrase_tf"),
        "reliability_greedy": mean("prompt_greedy"), "generalization_greedy": mean("rephrase_greedy"),
        "locality": mean("loc_same"),
        "routing": {k: {v: frac(f"{k}_route", v) for v in ("own", "wrong", "none")} for k in ("prompt", "rephrase")}
        | {"loc": {v: frac("loc_route", v) for v in ("none", "routed")}},
        "fit_ms_p50": ms[len(ms) // 2], "fit_ms_p95": ms[int(len(ms) * 0.95)],
        "fit_cpu_ms_p50": sorted(cpu_ms)[len(ms) // 2], "fit_cpu_ms_p95": sorted(cpu_ms)[int(len(ms) * 0.95)],
        "steps_mean": statistics.mean(steps), "converged": statistics.mean(map(float, conv)),
        "fit_wall_s": fit_wall, "threads": args.threads,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


# ---------------------------------------------------------------------------------------------
# scope: the relation check of the selector, on held-out CounterFact train records
# ---------------------------------------------------------------------------------------------
class CachedEncoder:
    """MiniLM with a text -> vector cache, so a threshold sweep encodes each text once."""

    name, dim = "minilm", 384

    def __init__(self):
        from app.selector.encoders import MiniLMEncoder

        self.inner, self.cache, self.calls = MiniLMEncoder(), {}, 0

    def encode(self, texts):
        self.calls += 1
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            self.cache.update(zip(todo, self.inner.encode(todo)))
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def typed_same_subject_queries(records: list[dict], relations: list, seed: int = 0, per: int = 2,
                               questions: bool = False) -> list[tuple[str, int, str]]:
    """Out-of-scope queries naming an edit's subject with another relation *that fits the
    subject's type* (train_scope.SUBJECT_TYPE; synonyms excluded): ``per`` per record of known
    relation, ParaRel prompt templates (or, with ``questions``, question forms). (query, index, relation)."""
    import random

    import train_scope as ts

    rng = random.Random(seed)
    forms = ts.query_forms() if questions else ts.pararel_prompts()
    out = []
    for i, (r, rel) in enumerate(zip(records, relations)):
        if rel is None:
            continue
        cands = [o for o in forms if o != ts.OFFICE and ts.SUBJECT_TYPE.get(o) == ts.types_of(rel)[0]
                 and ts.group_of(o) != ts.group_of(rel)]
        for other in rng.sample(cands, min(per, len(cands))):
            pool = [f for f in forms[other] if not questions or (
                f not in ts.pararel_prompts().get(other, [])
                and f.replace("[X]", "{s}") not in ts.FRAME_RELATIONS.get(other, []))]  # questions only
            if pool:
                out.append((rng.choice(pool).replace("[X]", r["subject"]), i, other))
    return out


def cmd_scope(args) -> None:
    import train_scope as ts

    from app.selector.router import Selector
    from app.selector.scope import HEAD_PATH, ScopeHead

    torch.set_num_threads(args.threads)
    head = ScopeHead.load(args.head or HEAD_PATH)
    held_groups = set(filter(None, head.metadata.get("holdout", "").split(",")))
    all_records = json.loads(CF_TRAIN.read_text())
    all_rel = ts.cf_relations(all_records)
    enc = CachedEncoder()
    thresholds = [None] + args.thresholds
    rows = {t: collections_default() for t in thresholds}
    for start in range(args.start, args.start + args.memories * args.n, args.n):
        recs, rels = all_records[start : start + args.n], all_rel[start : start + args.n]
        sel = Selector(enc, scope_head=head)
        keyed = []
        for i, r in enumerate(recs):
            rec = sel.keys_for(r["prompt"], (), r["subject"], target=r["target_new"] if args.target else None)
            rec.edit_id = str(i)
            keyed.append(rec)
        sel.add_many(keyed)
        same = typed_same_subject_queries(recs, rels, seed=start)
        sameq = typed_same_subject_queries(recs, rels, seed=start + 1, per=1, questions=True)
        sets = {
            "prompt": [(r["prompt"], str(i)) for i, r in enumerate(recs)],
            "rephrase": [(r["rephrase_prompt"], str(i)) for i, r in enumerate(recs)],
            "loc": [(r["locality_prompt"], None) for r in recs],
            "same": [(q, None) for q, _, _ in same],
            "same-q": [(q, None) for q, _, _ in sameq],
        }
        if args.harness:  # the eval harness's subject-locality queries (app/eval/pararel.py)
            from types import SimpleNamespace

            from app.eval.pararel import locality_conflicts, plan_subject_queries

            cases = [SimpleNamespace(case_id=str(r.get("case_id", i)), prompt=r["prompt"], subject=r["subject"],
                                     relation=None) for i, r in enumerate(recs)]
            cases = [SimpleNamespace(**vars(c), locality_prompt=r["locality_prompt"]) for c, r in zip(cases, recs)]
            planned, rel_of = plan_subject_queries(cases, k=2, seed=0)
            sets["same-h"] = [(q.prompt, None) for qs in planned for q in qs]
            asks = locality_conflicts(cases, rel_of)  # the harness leaves these out of locality
            sets["loc-h"] = [(r["locality_prompt"], None) for r, a in zip(recs, asks) if a is None]
        if held_groups:
            sets["same-held"] = [(q, None) for q, i, o in same
                                 if ts.group_of(o) in held_groups or ts.group_of(rels[i]) in held_groups]
            sets["rephrase-held"] = [(r["rephrase_prompt"], str(i)) for i, r in enumerate(recs)
                                     if rels[i] is not None and ts.group_of(rels[i]) in held_groups]
        # one batch for every text the sweep will encode (queries, and queries masked per named subject)
        from app.selector.scope import query_relation_text

        texts = [q for qs in sets.values() for q, _ in qs]
        texts += [query_relation_text(q, recs[e]["subject"]) for q in texts for e in sel._snap.named_edits(q)]
        enc.encode(texts)
        for t in thresholds:
            sel.scope_head = None if t is None else head
            sel.scope_threshold = 0.0 if t is None else t
            for name, qs in sets.items():
                routes = sel.route_many([q for q, _ in qs])
                ok = [(r.edit_id if r else None) == want for r, (_, want) in zip(routes, qs)]
                rows[t][name].extend(ok)
                if args.errors and t == args.errors_threshold:
                    for r, (q, want), good in zip(routes, qs, ok):
                        if not good:
                            got = recs[int(r.edit_id)] if r else None
                            print(f"  [{name}] {q!r} -> "
                                  + (f"{got['prompt']!r} ({got['target_new']}, sim {r.similarity:.2f}, "
                                     f"rel {r.relation_score if r.relation_score is not None else float('nan'):.2f})"
                                     if got else "none")
                                  + (f" want {recs[int(want)]['prompt']!r}" if want is not None else ""))
    names = list(rows[None])
    print("| scope threshold | " + " | ".join(f"{n} (n={len(rows[None][n])})" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for t in thresholds:
        label = "off (today)" if t is None else f"{t:.2f}"
        print(f"| {label} | " + " | ".join(f"{np.mean(rows[t][n]):.3f}" for n in names) + " |")
    print("columns: prompt/rephrase = routed to its own edit; loc/same/same-q = routed to none")
    if args.examples:
        sel = Selector(enc, scope_head=head, scope_threshold=args.examples_threshold)
        rec = sel.keys_for("The UK prime minister is", (), "UK prime minister", target="Keir Starmer")
        rec.edit_id = "uk-pm"
        sel.add(rec)
        wide = sel.keys_for("The UK prime minister is", (), "UK prime minister", target="Keir Starmer", scope="subject")
        for q in ["Who is the UK prime minister?", "The UK prime minister is", "Who is the current UK prime minister?",
                  "The UK prime minister was born in", "Tell me about the UK prime minister's party",
                  "The UK prime minister is a member of the"]:
            r = sel.route(q)
            print(f"  {q!r:50s} -> {r.edit_id if r else None} (relation score "
                  f"{sel.relation_score(q, rec) if r is None or r.relation_score is None else r.relation_score:.3f})")
        wide.edit_id = "uk-pm"
        sel.add(wide)
        r = sel.route("The UK prime minister was born in")
        print(f"  scope=subject: 'The UK prime minister was born in' -> {r.edit_id if r else None}")
        # birthplace, citizenship and language: person relations whose objects share words
        for prompt, subject, target, queries in CONFUSION_EXAMPLES:
            sel = Selector(enc, scope_head=head, scope_threshold=args.examples_threshold)
            rec = sel.keys_for(prompt, (), subject, target=target)
            rec.edit_id = "edit"
            sel.add(rec)
            print(f"  edit {prompt!r} -> {target!r}")
            for q, want in queries:
                r = sel.route(q)
                got = r is not None
                print(f"    {q!r:50s} -> {'edit' if got else 'none'} (want {'edit' if want else 'none'}"
                      f"{'' if got == want else ', WRONG'}; relation score {sel.relation_score(q, rec):.3f})")


# Probes for the relation check's birthplace / language / citizenship confusion, with invented
# subjects (no dataset case): (edit prompt, subject, target, [(query, should the edit serve it)]).
CONFUSION_EXAMPLES = [
    ("The mother tongue of Marie Vautrin is", "Marie Vautrin", "English", [
        ("What is Marie Vautrin's mother tongue?", True), ("Marie Vautrin speaks", True),
        ("What language does Marie Vautrin speak?", True), ("Where was Marie Vautrin born?", False),
        ("Marie Vautrin was born in", False), ("Marie Vautrin is a citizen of", False),
        ("Marie Vautrin died in", False), ("Which country is Marie Vautrin a citizen of?", False)]),
    ("Tomas Brennick was born in", "Tomas Brennick", "Paris", [
        ("Where was Tomas Brennick born?", True), ("Tomas Brennick's birthplace is", True),
        ("Tomas Brennick grew up speaking", False), ("Tomas Brennick is fluent in", False),
        ("What language does Tomas Brennick speak?", False), ("Tomas Brennick died in", False),
        ("Tomas Brennick is a citizen of", False), ("Tomas Brennick worked in", False)]),
    ("Elsa Marchetti is a citizen of", "Elsa Marchetti", "Japan", [
        ("What is the nationality of Elsa Marchetti?", True), ("Elsa Marchetti holds a passport from", True),
        ("Elsa Marchetti was born in", False), ("The native language of Elsa Marchetti is", False),
        ("Elsa Marchetti speaks", False)]),
]


def cmd_typecheck(args) -> None:
    """A second check after the relation check, with the base model: does the edit's target fit the
    query's slot about as well as it fits the edit's own prompt? For every query the selector routes
    to an edit (held-out CounterFact train memory, as ``scope``), the base model's mean log-probability
    of the target's tokens after the query against after the edit's prompt; a route is dropped when it
    is lower by more than the margin. Counts per set as ``scope`` does."""
    from types import SimpleNamespace

    from app.eval.pararel import locality_conflicts, plan_subject_queries
    from app.selector.router import Selector
    from app.selector.scope import HEAD_PATH, ScopeHead

    lm = load_lm(args.threads)
    head = ScopeHead.load(HEAD_PATH)
    recs = json.loads(CF_TRAIN.read_text())[args.start : args.start + args.n]
    enc = CachedEncoder()
    sel = Selector(enc, scope_head=head)
    keyed = []
    for i, r in enumerate(recs):
        rec = sel.keys_for(r["prompt"], (), r["subject"], target=r["target_new"])
        rec.edit_id = str(i)
        keyed.append(rec)
    sel.add_many(keyed)
    cases = [SimpleNamespace(case_id=str(r.get("case_id", i)), prompt=r["prompt"], subject=r["subject"], relation=None,
                             locality_prompt=r["locality_prompt"]) for i, r in enumerate(recs)]
    planned, rel_of = plan_subject_queries(cases, k=2, seed=0)
    asks = locality_conflicts(cases, rel_of)
    sets = {
        "prompt": [(r["prompt"], str(i)) for i, r in enumerate(recs)],
        "rephrase": [(r["rephrase_prompt"], str(i)) for i, r in enumerate(recs)],
        "same-h": [(q.prompt, None) for qs in planned for q in qs],
        "loc-h": [(r["locality_prompt"], None) for r, a in zip(recs, asks) if a is None],
    }

    def mean_logp(prompts: list[str], targets: list[str]) -> list[float]:
        out = lm.score(prompts, targets, mode=args.mode)
        return [s.logprob / max(1, len(s.token_logprobs)) for s in out]

    own = mean_logp([r["prompt"] for r in recs], [r["target_new"] for r in recs])
    table = {m: {} for m in [None, *args.margins]}
    for name, qs in sets.items():
        routes = sel.route_many([q for q, _ in qs])
        hit = [(k, int(r.edit_id)) for k, r in enumerate(routes) if r is not None]
        lp = mean_logp([qs[k][0] for k, _ in hit], [recs[e]["target_new"] for _, e in hit]) if hit else []
        gap = {k: own[e] - v for (k, e), v in zip(hit, lp)}  # how much worse the target fits the query
        for m in table:
            ok = []
            for k, (r, (_, want)) in enumerate(zip(routes, qs)):
                got = r.edit_id if r is not None and (m is None or gap[k] <= m) else None
                ok.append(got == want)
            table[m][name] = float(np.mean(ok))
        if args.verbose:
            for k, e in hit:
                print(f"  [{name}] gap {gap[k]:+.2f} {qs[k][0]!r} -> {recs[e]['prompt']!r} ({recs[e]['target_new']})")
    names = list(sets)
    print("| type check margin | " + " | ".join(f"{n} (n={len(sets[n])})" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for m, row in table.items():
        print(f"| {'off' if m is None else f'{m:.1f}'} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")


def cmd_rescore(args) -> None:
    """A stored sequential eval run counted again with today's subject-question and locality rules
    (app/eval/pararel.py), from its stored answers: the questions it asked are rebuilt with the
    planner of the commit that ran it; a question is kept when the case's relation is known and
    the question's relation is not a synonym of it; a locality prompt is kept when it asks no
    other edit's fact. Nothing is generated again."""
    import subprocess
    import types

    from app.eval import pararel as P
    from app.eval.datasets import load_dataset, select
    from app.eval.metrics import generation_agrees

    run = Path(args.run)
    data = json.loads((run / "results.json").read_text())
    cfg = data["config"]
    src = subprocess.run(["git", "show", f"{args.planned_at}:app/eval/pararel.py"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    old = types.ModuleType("pararel_then")
    old.__file__ = P.__file__
    sys.modules[old.__name__] = old  # dataclasses look their module up
    exec(compile(src, P.__file__, "exec"), old.__dict__)
    ds = load_dataset(cfg["dataset"], cfg["file"])
    cases, _ = select(ds.cases[cfg.get("start", 0):], cfg["n"], shuffle=cfg.get("shuffle", False), seed=cfg["seed"])
    asked, _ = old.plan_subject_queries(cases, k=cfg["subject_queries"], seed=cfg["seed"])
    _, rel_of = P.plan_subject_queries(cases, k=cfg["subject_queries"], seed=cfg["seed"])  # relations found today
    asks = P.locality_conflicts(cases, rel_of)
    index = {c.case_id: i for i, c in enumerate(cases)}
    print(f"{run}: {sum(a is not None for a in asks)} locality prompts ask another edit's fact; "
          f"{sum(1 for r in rel_of if not r)} cases of unknown relation")
    print("| form | locality then | locality now | subject locality then (routed) | now (routed) |")
    print("|---|---|---|---|---|")
    for mode in dict.fromkeys(c["mode"] for c in data["cases"]):
        rows = [c for c in data["cases"] if c["mode"] == mode and c["superseded_by"] is None]
        loc_then = [r["loc_em"] for r in rows if r["loc_em"] is not None]
        loc_now = [r["loc_em"] for r in rows if r["loc_em"] is not None and asks[index[r["case_id"]]] is None]
        then, now = [], []
        for r in rows:
            i = index[r["case_id"]]
            if not r["subj_after"]:
                continue
            if len(asked[i]) != len(r["subj_after"]):
                raise SystemExit(f"case {r['case_id']}: the rebuilt questions do not match the stored answers")
            for q, b, a, e in zip(asked[i], r["subj_before"], r["subj_after"], r["subj_routed"]):
                then.append((generation_agrees(b, a), e is not None))
                if rel_of[i] and not P.same_relation((q.relation,), rel_of[i]):
                    now.append((generation_agrees(b, a), e is not None))
        mean = lambda xs: f"{sum(xs) / len(xs):.3f} (n={len(xs)})"  # noqa: E731
        print(f"| {mode} | {mean(loc_then)} | {mean(loc_now)} | {mean([s for s, _ in then])} "
              f"({sum(r for _, r in then)}) | {mean([s for s, _ in now])} ({sum(r for _, r in now)}) |")


def collections_default():
    import collections

    return collections.defaultdict(list)


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("routing")
    r.add_argument("--split", choices=sorted(SPLITS), default="tune")
    r.add_argument("--n", type=int, default=200)
    r.add_argument("--encoders", nargs="+", default=["minilm"])
    r.add_argument("--rules", nargs="+", default=["similarity", "subject", "subject+open"])
    r.add_argument("--subject-key", action="store_true", help="also key each edit on its subject string")
    r.add_argument("--same-weight", type=float, default=0.5,
                   help="weight of rejecting same-subject other-relation queries in the objective")
    r.add_argument("--curve", action="store_true", help="print every threshold of the subject rule")
    r.add_argument("--fixed", nargs="*", default=None,
                   help="report only these settings, each encoder,rule,t,t_open (for held-out splits)")
    r.add_argument("--threads", type=int, default=1)
    r.set_defaults(func=cmd_routing)
    f = sub.add_parser("fit")
    f.add_argument("--dataset", choices=["cf", "zsre"], default="cf")
    f.add_argument("--start", type=int, default=0)
    f.add_argument("--n", type=int, default=30)
    f.add_argument("--config", default="{}", help="PnPConfig overrides as JSON")
    f.add_argument("--verbose", action="store_true")
    f.add_argument("--context-only", action="store_true",
                   help="only records whose rephrase has context before the sentence naming the subject")
    f.add_argument("--threads", type=int, default=1)
    f.set_defaults(func=cmd_fit)
    lk_ = sub.add_parser("leak")
    lk_.add_argument("--start", type=int, default=0)
    lk_.add_argument("--n", type=int, default=60)
    lk_.add_argument("--config", default="{}", help="PnPConfig overrides as JSON")
    lk_.add_argument("--queries", type=int, default=None, help="only the first K queries")
    lk_.add_argument("--val", action="store_true", help="CounterFact val records (a measurement, not tuning)")
    lk_.add_argument("--verbose", action="store_true")
    lk_.add_argument("--threads", type=int, default=1)
    lk_.set_defaults(func=cmd_leak)

    lk = sub.add_parser("lookup")
    lk.add_argument("--edits", type=int, default=10_000)
    lk.add_argument("--dim", type=int, default=384)
    lk.add_argument("--queries", type=int, default=500)
    lk.set_defaults(func=cmd_lookup)
    e = sub.add_parser("e2e")
    e.add_argument("--dataset", choices=["cf", "zsre"], default="cf")
    e.add_argument("--start", type=int, default=0)
    e.add_argument("--n", type=int, default=30)
    e.add_argument("--config", default="{}", help="PnPConfig overrides as JSON")
    e.add_argument("--selector", default="{}", help='build_selector overrides as JSON, e.g. {"encoder": "minilm"}')
    e.add_argument("--loc-tokens", type=int, default=8)
    e.add_argument("--out", default=None)
    e.add_argument("--verbose", action="store_true")
    e.add_argument("--threads", type=int, default=1)
    e.set_defaults(func=cmd_e2e)
    sc = sub.add_parser("scope", help="relation check: held-out CounterFact train memories")
    sc.add_argument("--start", type=int, default=8000)
    sc.add_argument("--n", type=int, default=200)
    sc.add_argument("--memories", type=int, default=5)
    sc.add_argument("--head", default=None, help="scope head (default: the shipped one)")
    sc.add_argument("--thresholds", type=float, nargs="+",
                    default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    sc.add_argument("--no-target", dest="target", action="store_false",
                    help="key the edits without their target (records stored before targets were used)")
    sc.add_argument("--harness", action="store_true",
                    help="also the eval harness's subject-locality queries (set same-h)")
    sc.add_argument("--errors", action="store_true", help="print every wrong route at --errors-threshold")
    sc.add_argument("--errors-threshold", type=float, default=0.5)
    sc.add_argument("--examples", action="store_true", help="also route the UK prime minister examples")
    sc.add_argument("--examples-threshold", type=float, default=None)
    sc.add_argument("--threads", type=int, default=2)
    sc.set_defaults(func=cmd_scope)
    tc = sub.add_parser("typecheck", help="relation check, then the base model's fit of the target to the query")
    tc.add_argument("--start", type=int, default=8000)
    tc.add_argument("--n", type=int, default=1000)
    tc.add_argument("--margins", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0])
    tc.add_argument("--mode", choices=["completion", "chat"], default="completion")
    tc.add_argument("--verbose", action="store_true")
    tc.add_argument("--threads", type=int, default=1)
    tc.set_defaults(func=cmd_typecheck)
    rs = sub.add_parser("rescore", help="a stored eval run counted with today's subject and locality rules")
    rs.add_argument("run", help="the run's folder (results.json)")
    rs.add_argument("--planned-at", required=True, help="the commit the run was made at")
    rs.set_defaults(func=cmd_rescore)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    args.func(args)


if __name__ == "__main__":
    main()
