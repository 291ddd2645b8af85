"""Training a KnowledgeEditor with the paper's constrained objective.

For each training record (x, a, P^x, O^x): the editor predicts ΔW from ∇W L(W; x, a); with ΔW
active, the loss is the new answer's NLL over x and, with ``paraphrases`` (the `+P^x` variant),
its paraphrases P^x, subject to C = KL(f(·; W) ‖ f(·; W + ΔW)) over the unrelated inputs O^x
staying under the margin m. The Lagrangian L = edit + λ (C − m) is minimised in φ and maximised
in λ ≥ 0 (gradient ascent on λ). The base model is frozen throughout; gradients reach only φ.

A run writes, under its folder: ``checkpoint.safetensors`` (network, optimiser state, step, λ,
every ``checkpoint_every`` steps and at the end), ``curve.jsonl`` (a validation point every
``val_every`` steps: one-pass success on the prompt and on a held paraphrase, KL on unrelated
inputs) and ``editor.safetensors`` (the final editor). ``resume`` continues from the checkpoint
with the same record order, so an interrupted run ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import random
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from app.lm.engine import LM
from app.methods.ke import editor as E


@dataclass
class Record:
    prompt: str
    target: str
    paraphrases: list[str] = field(default_factory=list)
    unrelated: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    margin: float = 1e-2  # m: the KL on unrelated inputs the edit may cost
    lambda_lr: float = 0.2  # gradient ascent step of the Lagrange multiplier
    lambda_max: float = 100.0
    paraphrases: bool = True  # the `+P^x` variant
    max_paraphrases: int = 2
    max_unrelated: int = 2
    # Tokens of the base model's greedy continuation appended to each unrelated input, so that the
    # KL also covers the positions an answer is written at (its sentence ends among them: an update
    # keyed on a question mark or full stop fires there, which the prompt's own positions never show).
    unrelated_continuation: int = 0
    max_target_tokens: int = 8
    layers: list[int] | None = None
    hidden: int = 64
    cond: int = 64
    val_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0
    gain: float | None = None  # γ scale; None: chosen by a line search on the first records
    max_seconds: float | None = None  # stop (with a checkpoint) after this long; resume continues
    init: str | None = None  # start φ from this editor file (for these weights) instead of from scratch
    lambda_init: float = 0.0  # the multiplier's start (an editor trained before carries its own λ)


ProgressFn = Callable[[int, int, dict], None]


def _examples(lm: LM, prompts: Sequence[str], target: str, cap: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for p in prompts:
        t = lm.target_ids(p, target, "completion")[:cap]
        if t and p.strip():
            out.append((lm.prompt_ids(p, "completion"), t))
    return out


# Per loaded model (two models may share a name: the key is the module itself, as for attached editors).
_CONTINUATIONS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, int], list[int]]]" = weakref.WeakKeyDictionary()


def _continuation(lm: LM, text: str, tokens: int) -> list[int]:
    """The base model's greedy continuation of ``text`` (cached: the base model is frozen)."""
    cache = _CONTINUATIONS.setdefault(lm.model, {})
    if (text, tokens) not in cache:
        if len(cache) > 50_000:
            cache.clear()
        cache[(text, tokens)] = list(lm.generate([text], max_new_tokens=tokens, mode="completion", deltas=[])[0].token_ids)
    return cache[(text, tokens)]


def _unrelated_batch(lm: LM, texts: Sequence[str], continuation: int = 0):
    rows = [lm.prompt_ids(t, "completion")[:48] + (_continuation(lm, t, continuation) if continuation else [])
            for t in texts if t.strip()]
    if not rows:
        return None
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
    return ids.to(lm.device), attn.to(lm.device)


def _unrelated_kl(lm: LM, delta, unrelated) -> torch.Tensor:
    ids, attn = unrelated
    with torch.no_grad():
        base = torch.log_softmax(lm.model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float(), -1)
    with lm.active([delta]):
        logits = lm.model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
    return E.kl_all_positions(logits, base, attn.bool())


def step_loss(lm: LM, editor: E.KnowledgeEditor, rec: Record, cfg: TrainConfig, lam: float,
              rng: random.Random) -> tuple[torch.Tensor, dict]:
    """The Lagrangian of one record (differentiable in φ) and its parts."""
    own = _examples(lm, [rec.prompt], rec.target, cfg.max_target_tokens)
    if not own:
        raise ValueError("empty target")
    factors, _, first = E.edit_gradients(lm, editor.paths, E.make_batch(lm, own))
    embeds = E.condition_embeds(lm, rec.prompt, lm.tokenizer.decode([int(first[0])]), rec.target)
    delta = E.editor_delta(editor, embeds, factors)
    para = rec.paraphrases[:]
    rng.shuffle(para)
    prompts = [rec.prompt] + (para[: cfg.max_paraphrases] if cfg.paraphrases else [])
    batch = E.make_batch(lm, _examples(lm, prompts, rec.target, cfg.max_target_tokens))
    with lm.active([delta]):
        edit_loss, holds = E.target_nll(E.batch_logits(lm, batch), batch)
    unrelated = _unrelated_batch(lm, rec.unrelated[: cfg.max_unrelated], cfg.unrelated_continuation)
    kl = _unrelated_kl(lm, delta, unrelated) if unrelated is not None else torch.zeros((), device=lm.device)
    loss = edit_loss + lam * (kl - cfg.margin)
    return loss, {"edit": float(edit_loss.detach()), "kl": float(kl.detach()), "holds": float(holds.float().mean())}


@torch.no_grad()
def validate(lm: LM, ef_editor: E.KnowledgeEditor, records: Sequence[Record], continuation: int = 0) -> dict:
    """One-pass success on the prompt, success on the first paraphrase (never trained on when the
    record is a validation record), and the mean unrelated KL."""
    from app.methods.base import EditRequest
    from app.methods.ke.method import apply_editor

    ef = E.EditorFile(ef_editor, {})
    ok, gen, gen_n, kls = 0, 0, 0, []
    for rec in records:
        delta, _, holds, _, _ = apply_editor(lm, ef, EditRequest(prompt=rec.prompt, target=rec.target), loop=1)
        ok += holds
        if rec.paraphrases:
            ex = _examples(lm, rec.paraphrases[:1], rec.target, 10_000)
            if ex:
                b = E.make_batch(lm, ex)
                with lm.active([delta]):
                    _, h = E.target_nll(E.batch_logits(lm, b), b)
                gen += int(h.all())
                gen_n += 1
        unrelated = _unrelated_batch(lm, rec.unrelated[:2], continuation)
        if unrelated is not None:
            kls.append(float(_unrelated_kl(lm, delta, unrelated)))
    n = max(1, len(records))
    return {"success": ok / n, "generalization": gen / max(1, gen_n), "unrelated_kl": sum(kls) / max(1, len(kls))}


@torch.no_grad()
def choose_gain(lm: LM, editor: E.KnowledgeEditor, records: Sequence[Record], cfg: TrainConfig) -> float:
    """The γ scale at which the untrained editor (a plain gradient step) lowers the edit loss most."""
    best, best_loss = 1.0, math.inf
    for gain in (1e0, 1e1, 1e2, 1e3, 1e4, 1e5):
        editor.gain.fill_(gain)
        losses = []
        for rec in records:
            with torch.enable_grad():
                loss, parts = step_loss(lm, editor, rec, TrainConfig(**{**asdict(cfg), "paraphrases": False}), 0.0,
                                        random.Random(0))
            losses.append(parts["edit"])
        mean = sum(losses) / len(losses)
        if mean < best_loss:
            best, best_loss = gain, mean
    editor.gain.fill_(best)
    return best


def _save_checkpoint(path: Path, editor: E.KnowledgeEditor, opt: torch.optim.Optimizer, step: int, lam: float,
                     cfg: TrainConfig, meta: dict[str, str]) -> None:
    tensors = {f"editor.{k}": v.detach().cpu().contiguous() for k, v in editor.state_dict().items()}
    state = opt.state_dict()
    for pid, st in state["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(float(v))
            tensors[f"opt.{pid}.{k}"] = t.detach().cpu().contiguous()
    info = {"step": str(step), "lambda": repr(lam), "config": json.dumps(asdict(cfg)), **meta}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=info)
    tmp.replace(path)


def _load_checkpoint(path: Path, editor: E.KnowledgeEditor, opt: torch.optim.Optimizer) -> tuple[int, float, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    tensors = load_file(str(path))
    editor.load_state_dict({k[len("editor."):]: v for k, v in tensors.items() if k.startswith("editor.")})
    state = opt.state_dict()
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    state["state"] = opt_state
    opt.load_state_dict(state)
    return int(meta["step"]), float(meta["lambda"]), meta


def _score(point: dict) -> float:
    """How a validation point ranks (the best one is kept as ``editor-best.safetensors``)."""
    return point["success"] + point["generalization"] - min(1.0, point["unrelated_kl"])


def _best_score(curve: Path) -> float:
    if not curve.exists():
        return -math.inf
    points = [json.loads(line) for line in curve.read_text(encoding="utf-8").splitlines() if line.strip()]
    return max((_score(p) for p in points), default=-math.inf)


def train_editor(lm: LM, train: Sequence[Record], val: Sequence[Record], cfg: TrainConfig, out: Path, *,
                 resume: bool = False, progress: ProgressFn | None = None,
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Train (or, with ``resume``, continue) an editor for ``lm``; returns a summary."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    layers = cfg.layers if cfg.layers is not None else E.default_layers(lm)
    editor = E.build_editor(lm, layers, cfg.hidden, cfg.cond)
    opt = torch.optim.Adam(editor.parameters(), lr=cfg.lr)
    ckpt = out / "checkpoint.safetensors"
    sha = E.model_hash(lm)
    meta = {"model_id": lm.name, "model_hash": sha}
    step, lam, elapsed_before = 0, cfg.lambda_init, 0.0
    if cfg.init and not (resume and ckpt.exists()):
        start = E.load_checked(Path(cfg.init), lm)
        if set(start.editor.dims) != set(editor.dims):
            raise E.EditorError(f"{cfg.init} edits other modules than the run's layers")
        editor = start.editor.to(lm.device)
        for prm in editor.parameters():
            prm.requires_grad_(True)
        opt = torch.optim.Adam(editor.parameters(), lr=cfg.lr)
        log(f"started from {cfg.init} (trained {start.meta.get('steps', '?')} steps)")
    if resume and ckpt.exists():
        step, lam, m = _load_checkpoint(ckpt, editor, opt)
        if m.get("model_hash") != sha:
            raise E.EditorError(f"{ckpt} belongs to other weights ({m.get('model_id')})")
        elapsed_before = float(m.get("elapsed_s", "0"))
        log(f"resumed at step {step} (λ={lam:.3g}, {elapsed_before:.0f} s trained before)")
    else:
        if (out / "curve.jsonl").exists():
            (out / "curve.jsonl").unlink()
        if cfg.gain is not None:
            editor.gain.fill_(cfg.gain)
        elif not cfg.init:  # an --init editor keeps the γ scale it was trained with
            log(f"γ gain {choose_gain(lm, editor, list(train[:8]), cfg):g}")
    best = _best_score(out / "curve.jsonl")
    if step == 0:
        editor.eval()
        point = {"step": 0, "elapsed_s": 0.0, "lambda": lam, **validate(lm, editor, val, cfg.unrelated_continuation)}
        with (out / "curve.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(point) + "\n")
        log(json.dumps(point))
        best = _score(point)
        E.save_editor(editor, out / "editor-best.safetensors", model_id=lm.name, model_sha=sha,
                      extra={"steps": "0", "variant": "+P^x" if cfg.paraphrases else "plain"})
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    t0 = time.perf_counter()
    editor.train()
    recent: list[dict] = []
    stopped_early = False
    while step < cfg.steps:
        rec = train[order[step % len(order)]]
        rng = random.Random(cfg.seed * 1_000_003 + step)
        try:
            loss, parts = step_loss(lm, editor, rec, cfg, lam, rng)
        except ValueError:
            step += 1
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), 1.0)
        opt.step()
        lam = min(cfg.lambda_max, max(0.0, lam + cfg.lambda_lr * (parts["kl"] - cfg.margin)))
        step += 1
        recent = (recent + [parts])[-50:]
        if progress is not None:
            progress(step, cfg.steps, {**parts, "lambda": lam})
        elapsed = elapsed_before + time.perf_counter() - t0
        if step % cfg.val_every == 0 or step == cfg.steps:
            editor.eval()
            point = {"step": step, "elapsed_s": round(elapsed, 1), "lambda": lam,
                     "train_edit_loss": sum(r["edit"] for r in recent) / len(recent),
                     "train_holds": sum(r["holds"] for r in recent) / len(recent),
                     **validate(lm, editor, val, cfg.unrelated_continuation)}
            editor.train()
            with (out / "curve.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(point) + "\n")
            log(json.dumps(point))
            if _score(point) > best:
                best = _score(point)
                E.save_editor(editor, out / "editor-best.safetensors", model_id=lm.name, model_sha=sha,
                              extra={"steps": str(step), "variant": "+P^x" if cfg.paraphrases else "plain"})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ckpt, editor, opt, step, lam, cfg, {**meta, "elapsed_s": repr(elapsed)})
        if cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds and step < cfg.steps:
            _save_checkpoint(ckpt, editor, opt, step, lam, cfg, {**meta, "elapsed_s": repr(elapsed)})
            stopped_early = True
            break
    editor.eval()
    elapsed = elapsed_before + time.perf_counter() - t0
    E.save_editor(editor, out / "editor.safetensors", model_id=lm.name, model_sha=sha,
                  extra={"steps": str(step), "variant": "+P^x" if cfg.paraphrases else "plain",
                         "unrelated_continuation": str(cfg.unrelated_continuation),
                         "train_seconds": f"{elapsed:.1f}", "train_records": str(len(train))})
    return {"steps": step, "finished": step >= cfg.steps and not stopped_early, "elapsed_s": elapsed,
            "lambda": lam, "editor": str(out / "editor.safetensors"), "model_hash": sha,
            "best": str(out / "editor-best.safetensors") if (out / "editor-best.safetensors").exists() else None}
