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

Run from the repository root, e.g. ``python scripts/pnp_experiments.py routing --split tune``.
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

DATA = Path("/work/shared/data")
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


@dataclass
class Group:
    label: str
    cases: list[Case]
    key_texts: list[str]
    key_edit: np.ndarray
    in_queries: list[tuple[str, int, str]]  # (text, edit index, kind)
    out_queries: list[str]


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
    return Group(label, cases, key_texts, np.array(key_edit), in_q, out_q)


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
    res["out"] = {"none": float(np.mean(d_out < 0)), "routed": float(np.mean(d_out >= 0))}
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
    thresholds = np.round(np.arange(0.0, 1.0001, 0.025), 3)
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
            opens = thresholds if rule == "subject+open" else [np.inf]
            rows = []
            for t in thresholds:
                for t_open in opens:
                    if rule == "subject+open" and t_open < t:
                        continue
                    per = [confusion(g, *m, rule, t, t_open) for g, m in zip(groups, mats)]
                    rows.append((float(t), float(t_open), per))
            results[(spec, rule)] = rows
            best = pick(rows, args.max_out_routed)
            t, t_open, per = best
            print(f"\n== {spec} / {rule}: t={t} t_open={t_open} (encode {enc_s:.1f}s)")
            for g, r in zip(groups, per):
                print(f"  {g.label:18s} {fmt(r)}")
    if args.fixed:
        spec, rule, t, t_open = args.fixed.split(",")
        rows = results[(spec, rule)]
        for tt, to, per in rows:
            if abs(tt - float(t)) < 1e-6 and (rule != "subject+open" or abs(to - float(t_open)) < 1e-6):
                print(f"\n== fixed {spec} / {rule}: t={tt} t_open={to}")
                for g, r in zip(groups, per):
                    print(f"  {g.label:18s} {fmt(r)}")


def pick(rows, max_out_routed: float):
    """The setting with the best mean rephrase accuracy among those keeping every group's
    out-of-scope routed rate <= max_out_routed (ties: the larger margin, i.e. higher t)."""
    ok = [r for r in rows if all(p["out"]["routed"] <= max_out_routed for p in r[2])] or rows
    return max(ok, key=lambda r: (round(statistics.mean(p["rephrase"]["correct"] for p in r[2]), 4),
                                  round(statistics.mean(p["prompt"]["correct"] for p in r[2]), 4), r[0]))


def fmt(r: dict) -> str:
    p, q, o = r["prompt"], r["rephrase"], r["out"]
    return (f"prompt ok {p['correct']:.3f} wrong {p['wrong']:.3f} none {p['none']:.3f} | "
            f"rephrase ok {q['correct']:.3f} wrong {q['wrong']:.3f} none {q['none']:.3f} | "
            f"out none {o['none']:.3f} routed {o['routed']:.3f}")


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

    lm = load_lm(args.threads)
    method = get("pnp")
    config = method.parse_config(json.loads(args.config))
    cases = cf_cases(CF_TRAIN, args.start, args.n) if args.dataset == "cf" else zsre_cases(500 + args.start, args.n)
    rows = []
    for case in cases:
        res = fit_case(lm, case, config)
        d = [res.delta]
        s = lm.score([case.prompt, case.rephrase], [case.target] * 2, mode="completion", deltas=d)
        base_loc = lm.generate([case.loc_prompt], max_new_tokens=8, mode="completion")[0].token_ids
        edit_loc = lm.generate([case.loc_prompt], max_new_tokens=8, mode="completion", deltas=d)[0].token_ids
        row = {
            "ms": res.train_ms, "steps": res.steps, "conv": res.info["converged"],
            "rel": s[0].all_correct, "gen": s[1].all_correct,
            "rel_gen": gen_match(lm, case.prompt, case.target, d), "gen_gen": gen_match(lm, case.rephrase, case.target, d),
            "loc_raw": base_loc == edit_loc,
        }
        rows.append(row)
        if args.verbose:
            print(json.dumps(row), case.prompt, "->", case.target, "|", case.rephrase, flush=True)
    summarise_fit(rows, args.config)


def summarise_fit(rows: list[dict], label: str) -> None:
    ms = sorted(r["ms"] for r in rows)
    mean = lambda k: statistics.mean(float(r[k]) for r in rows)  # noqa: E731
    print(f"{label}: n={len(rows)} fit p50 {ms[len(ms)//2]:.0f} ms p95 {ms[int(len(ms)*0.95)]:.0f} ms "
          f"steps {mean('steps'):.1f} converged {mean('conv'):.2f} | rel {mean('rel'):.3f} gen {mean('gen'):.3f} "
          f"| greedy rel {mean('rel_gen'):.3f} gen {mean('gen_gen'):.3f} | adapter-alone locality {mean('loc_raw'):.3f}",
          flush=True)


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
    r.add_argument("--max-out-routed", type=float, default=0.02)
    r.add_argument("--fixed", default=None, help="also print encoder,rule,t,t_open")
    r.add_argument("--threads", type=int, default=1)
    r.set_defaults(func=cmd_routing)
    f = sub.add_parser("fit")
    f.add_argument("--dataset", choices=["cf", "zsre"], default="cf")
    f.add_argument("--start", type=int, default=0)
    f.add_argument("--n", type=int, default=30)
    f.add_argument("--config", default="{}", help="PnPConfig overrides as JSON")
    f.add_argument("--verbose", action="store_true")
    f.add_argument("--threads", type=int, default=1)
    f.set_defaults(func=cmd_fit)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
