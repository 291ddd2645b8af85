"""What a global (not routed) `ke` update moves, and whether a different key or strength keeps
unrelated answers (docs/ke-notes.md, "Global edits").

For each zsRE record: the editor's update from the prompt's gradient, in completion form, as
several variants; per variant, whether the target holds on the prompt and on the rephrase, whether
the record's unrelated question (NQ) gets the same 8 greedy tokens as before, and the share of 10
generic sentences whose 8-token continuation is unchanged.

Variants:
- ``full``: one pass of the editor, as trained (the paper's KnowledgeEditor);
- ``min``: the same update times the smallest of 1/32 ... 1 that still writes the target;
- ``white``: each key γ ⊙ x_t replaced by γ ⊙ C⁻¹x_t (ROME's whitening; C the damped second moment of
  the layer's inputs over generic text other than the 10 measured), rescaled to the same response
  on x_t, then ``min``;
- ``subject``: only the subject's positions as keys, applied again up to 5 passes until the target
  holds.

Run from the repository root (tune on the editor's validation records 200-299, never reported):
``.venv/bin/python research/ke_global.py --start 200 --n 20``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.delta import Delta  # noqa: E402
from app.lm.engine import LM  # noqa: E402
from app.methods.ke import editor as E  # noqa: E402

ZSRE = ROOT.parent / "shared" / "data" / "zsre" / "zsre_train_1k.json"
DATA = ROOT / "app" / "data"


def second_moments(lm: LM, paths: list[str], texts: list[str], damping: float) -> dict[str, torch.Tensor]:
    """(C + damping · mean diag C)⁻¹ of each module's input over ``texts``."""
    acc: dict[str, torch.Tensor] = {}
    count = 0

    def hook_for(path: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            acc[path] = acc[path] + x.T @ x if path in acc else x.T @ x
        return hook

    handles = [lm.arch.module(p).register_forward_hook(hook_for(p)) for p in paths]
    try:
        with torch.no_grad():
            for text in texts:
                ids = torch.tensor([lm.prompt_ids(text, "completion")], device=lm.device)
                count += ids.shape[1]
                lm.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for p, c in acc.items():
        c = c / count
        out[p] = torch.linalg.inv(c + damping * c.diagonal().mean() * torch.eye(c.shape[0], device=c.device))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--damping", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    home = Path.home() / ".factpatch"
    lm = LM.load(args.model, home)
    if E.load_for(lm, home) is None:
        sys.exit("no editor for this model")
    editor = E.attached(lm).editor
    lines = [s.strip() for s in (DATA / "generic_text.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    generic, rest = lines[:10], lines[10:]
    rest += [s.strip() for s in (DATA / "locality_pool.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    inv = second_moments(lm, editor.paths, rest, args.damping)

    def holds(prompt: str, target: str, delta: Delta) -> bool:
        return lm.score([prompt], [target], mode="completion", deltas=[delta])[0].all_correct

    def greedy(prompts: list[str], delta: Delta | None) -> list[str]:
        return [g.text for g in lm.generate(prompts, max_new_tokens=8, mode="completion",
                                            deltas=[delta] if delta is not None else [])]

    def smallest(delta: Delta, prompt: str, target: str) -> Delta:
        for c in (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0):
            scaled = Delta("lora", {k: v * c if k.endswith("::B") else v for k, v in delta.tensors.items()},
                           delta.meta)
            if holds(prompt, target, scaled):
                return scaled
        return delta

    base_generic = greedy(generic, None)
    names = ["full", "min", "white", "subject"]
    sums = {v: {"rel": 0.0, "gen": 0.0, "loc": 0.0, "generic": 0.0} for v in names}
    n = 0
    for r in json.loads(ZSRE.read_text(encoding="utf-8"))[args.start: args.start + args.n]:
        prompt, target, subject = r["src"], r.get("alt") or "", r.get("subject") or ""
        k = prompt.find(subject) if subject else -1
        if not target.strip() or not r.get("loc") or k < 0:
            continue
        n += 1
        pids = lm.prompt_ids(prompt, "completion")
        s0 = len(lm.prompt_ids(prompt[:k].rstrip(), "completion")) if k > 0 else 0
        s1 = len(lm.prompt_ids(prompt[: k + len(subject)], "completion"))
        batch = E.make_batch(lm, [(pids, lm.target_ids(prompt, target, "completion"))])
        factors, _, first = E.edit_gradients(lm, editor.paths, batch)
        embeds = E.condition_embeds(lm, prompt, lm.tokenizer.decode([int(first[0])]), target)
        with torch.no_grad():
            full = E.editor_delta(editor, embeds, factors)
            white = {}
            for p, f in factors.items():
                w = f.x @ inv[p]
                c = (f.x * f.x).sum(1, keepdim=True) / (w * f.x).sum(1, keepdim=True).clamp(min=1e-9)
                white[p] = E.Factors(w * c, f.g)
            variants = {"full": full, "min": smallest(full, prompt, target),
                        "white": smallest(E.editor_delta(editor, embeds, white), prompt, target)}
        delta = None
        for _ in range(5):
            if delta is not None and holds(prompt, target, delta):
                break
            f, _, _ = E.edit_gradients(lm, editor.paths, batch, [delta] if delta is not None else [])
            pos = torch.arange(next(iter(f.values())).x.shape[0], device=lm.device)
            keep = (pos >= s0) & (pos < s1)
            with torch.no_grad():
                delta = E.editor_delta(editor, embeds, {p: E.Factors(v.x[keep], v.g[keep]) for p, v in f.items()}, delta)
        variants["subject"] = delta
        loc_before = greedy([r["loc"]], None)[0]
        for name, d in variants.items():
            s = sums[name]
            s["rel"] += holds(prompt, target, d)
            s["gen"] += holds(r["rephrase"], target, d)
            s["loc"] += greedy([r["loc"]], d)[0] == loc_before
            s["generic"] += sum(a == b for a, b in zip(greedy(generic, d), base_generic)) / len(generic)
        print(n, {v: {m: round(x / n, 3) for m, x in s.items()} for v, s in sums.items()}, flush=True)
    print("| variant | holds on the prompt | on the rephrase | NQ answer unchanged | generic continuations unchanged |")
    print("|---|---|---|---|---|")
    for v, s in sums.items():
        print(f"| {v} | {s['rel'] / n:.2f} | {s['gen'] / n:.2f} | {s['loc'] / n:.2f} | {s['generic'] / n:.2f} |")
    print(f"({n} records from {args.start})")


if __name__ == "__main__":
    main()
