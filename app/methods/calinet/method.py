"""CaliNet (Dong et al., 2022): calibrate many facts at once with extra FFN slots beside one
MLP block, ΔFFN(H) = act(H K̃ᵀ) Ṽ, trained while the base model stays frozen.

Each fact is rendered with the ParaRel paraphrases of its relation. The paraphrases are split
per relation (``app.knowledge.templates.split_templates``): the slots train on the train
templates, early stopping watches the validation templates, and the reported metrics use the
test templates, which training never saw. A penalty on the slots' output over generic text
(relative to the MLP's own output there) keeps the rest of the model's behaviour; values start
at zero, so an untrained delta is a no-op.

The result is a :class:`~app.delta.Delta` of kind ``ffn_slots`` (``<mlp>::K``, ``<mlp>::V``),
applied by the engine's hooks; nothing in the base model is written.
"""

from __future__ import annotations

import logging
import math
import random
import re
import string
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from app.delta import Delta
from app.knowledge.cka import (
    DEFAULT_ALPHA,
    DEFAULT_LENGTH_NORM,
    DEFAULT_SCORING,
    DEFAULT_THRESHOLD,
    ScoreItem,
    cka_value,
    encode_item,
    pack_left,
    score_items,
)
from app.knowledge.facts import Fact, prefix, resolve
from app.knowledge.templates import KnowledgeError, TemplateSplit, load_relations, split_templates, subject_first
from app.methods.base import FitResult, Method, ProgressFn, register
from app.methods.calinet.config import CaliNetConfig

log = logging.getLogger(__name__)


@dataclass
class CalibrationRequest:
    """Facts to calibrate: each names a built-in relation or carries its own template."""

    facts: list[Fact]


@dataclass
class CalibrationResult:
    delta: Delta
    metrics: dict[str, Any]
    steps: int
    train_ms: float


@dataclass(frozen=True)
class Example:
    fact: int  # index into the facts
    template: str
    prompt: tuple[int, ...]
    target: tuple[int, ...]


# -- templates per fact ------------------------------------------------------------------------


def fact_splits(facts: Sequence[Fact]) -> list[TemplateSplit]:
    """Train / val / test templates of each fact.

    A fact of a relation with enough paraphrases gets its relation's split; any other fact
    (own template, or too few paraphrases) trains on all its subject-first templates and has
    no unseen template to be tested on.
    """
    relations = load_relations()
    cache: dict[str, TemplateSplit | None] = {}
    out = []
    for f in facts:
        ft = resolve(f, relations, need_negatives=False)
        split = None
        if ft.relation is not None and not f.template:
            rid = ft.relation.relation
            if rid not in cache:
                cache[rid] = split_templates(ft.relation)
            split = cache[rid]
        if split is None:
            pool = [t for t in (ft.template, *ft.paraphrases) if subject_first(t)] or [ft.template]
            split = TemplateSplit(train=tuple(dict.fromkeys(pool)), val=(), test=())
        out.append(split)
    return out


def build_examples(lm, facts: Sequence[Fact], templates: Sequence[Sequence[str]]) -> list[Example]:
    out = []
    for i, (f, ts) in enumerate(zip(facts, templates)):
        for t in ts:
            p, o, _ = encode_item(lm, ScoreItem(t, f.subject, f.object))
            out.append(Example(i, t, tuple(p), tuple(o)))
    return out


# -- generic text (locality and perplexity) ------------------------------------------------------


def generic_sentences(part: str) -> list[str]:
    """The shipped generic sentences: even lines ("fit") regularise training, odd lines ("eval") measure it."""
    text = resources.files("app.data").joinpath("generic_text.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if part == "fit":
        return lines[0::2]
    if part == "eval":
        return lines[1::2]
    raise ValueError(part)


def start_rows(lm, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(a start-of-text token, the text's token ids) of each non-empty text: how a text is scored
    on its own."""
    tok = lm.tokenizer
    start = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    return [(start, ids) for ids in (tok(t, add_special_tokens=False).input_ids for t in texts) if ids]


def perplexity(lm, texts: Sequence[str], *, deltas=None, batch_size: int = 32) -> float:
    """exp(mean token NLL) of each text after a start-of-text token, pooled over all tokens."""
    scores = lm.score_ids(start_rows(lm, texts), deltas=deltas, batch_size=batch_size)
    total = sum(s.logprob for s in scores)
    count = sum(len(s.token_logprobs) for s in scores)
    return math.exp(-total / max(1, count))


def _capture_mlp(lm, mlp_path: str, texts: Sequence[str]) -> tuple[torch.Tensor, float]:
    """MLP inputs (tokens x d_in) at ``mlp_path`` over ``texts`` (first position left out), and
    the mean squared norm of the MLP's output there."""
    module = lm.arch.module(mlp_path)
    xs, ys = [], []

    def hook(_m, inputs, output):
        # The first position is the attention sink, whose activations are orders of magnitude
        # larger than any other token's; it would swamp the normaliser.
        xs.append(inputs[0].detach()[:, 1:])
        ys.append((output[0] if isinstance(output, tuple) else output).detach()[:, 1:])

    handle = module.register_forward_hook(hook)
    try:
        with _lock(lm), lm.active(None), torch.inference_mode():
            for text in texts:
                ids = lm.tokenizer(text, return_tensors="pt").input_ids.to(lm.device)
                lm.model(input_ids=ids)
    finally:
        handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).float()
    y = torch.cat([t.reshape(-1, t.shape[-1]) for t in ys]).float()
    return x.clone(), float(y.pow(2).sum(-1).mean())


def _data_keys(lm, mlp_path: str, examples: Sequence[Example], slots: int, mu: torch.Tensor, scale: float,
               rng: random.Random) -> torch.Tensor:
    """Keys that fire on the facts' own prompts: slot i reads the MLP input at the last prompt
    token of one training example (one fact per slot, facts in random order, cycling when there
    are more slots than facts), centred on the mean generic input so that ordinary text
    activates it less; scaled so that its own example gives ``x . k = scale``."""
    by_fact: dict[int, list[Example]] = {}
    for e in examples:
        by_fact.setdefault(e.fact, []).append(e)
    facts = list(by_fact)
    rng.shuffle(facts)
    chosen = [rng.choice(by_fact[facts[i % len(facts)]]) for i in range(slots)]
    module = lm.arch.module(mlp_path)
    rows: list[torch.Tensor] = []

    def hook(_m, inputs, _output):
        rows.append(inputs[0].detach()[:, -1].float())

    handle = module.register_forward_hook(hook)
    try:
        with lm.active(None), torch.inference_mode():
            for start in range(0, len(chosen), 64):
                ids, attn, pos = pack_left(lm, [list(e.prompt) for e in chosen[start : start + 64]])
                with _lock(lm):
                    lm.model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=1)
    finally:
        handle.remove()
    x = torch.cat(rows).cpu()
    d = x - mu.cpu()
    dot = (x * d).sum(-1, keepdim=True).clamp(min=1e-6)
    return (scale * d / dot).clone()


def _lock(lm):
    return getattr(lm, "_lock", None) or nullcontext()


# -- training ----------------------------------------------------------------------------------


def _example_loss(lm, batch: Sequence[Example], delta: Delta) -> torch.Tensor:
    """Mean over examples of the mean NLL of the object tokens (only the last positions' logits)."""
    seqs = [list(e.prompt) + list(e.target) for e in batch]
    keep = max(len(e.target) for e in batch) + 1
    ids, attn, pos = pack_left(lm, seqs)
    with lm.active([delta]):
        logits = lm.model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep).logits.float()
    losses = []
    for i, e in enumerate(batch):
        t = len(e.target)
        rows = logits[i, keep - t - 1 : keep - 1]
        losses.append(F.cross_entropy(rows, torch.tensor(e.target, device=rows.device)))
    return torch.stack(losses).mean()


def generic_kl(lm, sentences: Sequence[list[int]], new: Sequence[Delta], base: Sequence[Delta] = (),
               *, include_global: bool = True) -> torch.Tensor:
    """Mean per-token KL(with ``base`` || with ``new``) of the next-token distributions over
    ``sentences`` (token ids); differentiable through ``new``."""
    ids, attn, pos = pack_left(lm, sentences)
    with torch.no_grad(), lm.active(list(base), include_global=include_global):
        base = torch.log_softmax(lm.model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float(), -1)
    with lm.active(list(new), include_global=include_global):
        new = torch.log_softmax(lm.model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float(), -1)
    kl = (base.exp() * (base - new)).sum(-1)
    mask = attn.to(kl.dtype)
    return (kl * mask).sum() / mask.sum()


def _mean_loss(lm, examples: Sequence[Example], delta: Delta, batch_size: int) -> float:
    if not examples:
        return float("nan")
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            with _lock(lm):
                total += float(_example_loss(lm, chunk, delta)) * len(chunk)
    return total / len(examples)


def _epoch_order(n_facts_examples: dict[int, list[Example]], rng: random.Random) -> list[Example]:
    """One pass: every fact once, with one of its train templates drawn at random, in random order."""
    picks = [rng.choice(exs) for exs in n_facts_examples.values()]
    rng.shuffle(picks)
    return picks


def calibrate(
    lm, facts: Sequence[Fact], config: CaliNetConfig | None = None, progress: ProgressFn | None = None
) -> CalibrationResult:
    """Train CaliNet slots for ``facts`` and measure them; the base model is never modified.

    Raises ``KnowledgeError`` (``no_facts``, ``too_many_facts``, ``invalid_config`` or a fact's
    own code) before any training. ``progress(step, total, loss)`` is called after every step.
    """
    config = config or CaliNetConfig()
    facts = list(facts)
    if not facts:
        raise KnowledgeError("calibration needs at least one fact", "no_facts")
    if len(facts) > config.max_facts:
        raise KnowledgeError(f"at most {config.max_facts} facts per calibration (got {len(facts)})", "too_many_facts")
    for i, f in enumerate(facts):
        try:
            resolve(f, need_negatives=False)
        except KnowledgeError as exc:
            raise KnowledgeError(f"fact {i}: {exc.message}", exc.code) from None
    try:
        layer = config.resolve_layer(lm.arch.num_layers)
    except ValueError as exc:
        raise KnowledgeError(str(exc), "invalid_config") from None
    from app.lm.arch import linear_dims

    block = lm.arch.blocks[layer]
    d_in = linear_dims(lm.arch.module(block.mlp_linears[0]))[0]
    d_out = linear_dims(lm.arch.module(block.mlp_out))[1]
    model_params = lm.arch.param_count()
    try:
        slots = config.resolve_slots(len(facts), model_params, d_in + d_out)
    except ValueError as exc:
        raise KnowledgeError(str(exc), "invalid_config") from None

    splits = fact_splits(facts)
    train = build_examples(lm, facts, [s.train for s in splits])
    val = build_examples(lm, facts, [s.val for s in splits])
    rng = random.Random(config.seed)
    if len(val) > config.max_val_examples:
        val = rng.sample(val, config.max_val_examples)
    by_fact: dict[int, list[Example]] = {}
    for e in train:
        by_fact.setdefault(e.fact, []).append(e)

    gen = torch.Generator().manual_seed(config.seed)
    device = lm.device
    path = block.mlp
    fit_texts = generic_sentences("fit")
    x_generic, y_sq = _capture_mlp(lm, path, fit_texts)
    x_generic = x_generic.to(device)
    k0 = torch.randn(slots, d_in, generator=gen) * config.init_std
    if config.key_init == "data":
        k0 = _data_keys(lm, path, train, slots, x_generic.mean(0), config.key_scale, rng)
    k = k0.to(device).requires_grad_(True)
    v = torch.zeros(slots, d_out, device=device, requires_grad=True)
    delta = Delta("ffn_slots", {f"{path}::K": k, f"{path}::V": v}, {"act": config.act, "method": "calinet", "layer": str(layer)})
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[config.act]
    kl_ids = [start + ids for start, ids in start_rows(lm, fit_texts)]

    steps_per_epoch = max(1, math.ceil(len(by_fact) / config.batch_size))
    total = config.steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    opt = torch.optim.Adam([k, v], lr=config.lr)
    t0 = time.perf_counter()
    best = (float("inf"), k.detach().clone(), v.detach().clone(), 0)
    val_history: list[tuple[int, float]] = []
    stale, step, queue, last_loss = 0, 0, [], float("nan")
    stopped_early = False
    while step < total:
        if len(queue) < config.batch_size:
            queue.extend(_epoch_order(by_fact, rng))
        batch, queue = queue[: config.batch_size], queue[config.batch_size :]
        with torch.enable_grad():
            with _lock(lm):
                fit = _example_loss(lm, batch, delta)
            local = (act(x_generic @ k.T) @ v).pow(2).sum(-1).mean() / max(y_sq, 1e-12)
            loss = fit + config.locality_weight * local
            if config.kl_weight > 0:
                with _lock(lm):
                    kl = generic_kl(lm, rng.sample(kl_ids, min(config.kl_sentences, len(kl_ids))), [delta])
                loss = loss + config.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=[k, v])
            opt.step()
        step += 1
        last_loss = fit.item()
        if progress is not None:
            progress(step, total, last_loss)
        if val and (step % config.eval_every == 0 or step == total):
            vl = _mean_loss(lm, val, delta, config.batch_size * 2)
            val_history.append((step, vl))
            if vl < best[0] - 1e-4:
                best, stale = (vl, k.detach().clone(), v.detach().clone(), step), 0
            else:
                stale += 1
                if stale >= config.patience:
                    stopped_early = True
                    break
    train_ms = (time.perf_counter() - t0) * 1000
    if val and best[0] < float("inf"):
        k_final, v_final = best[1], best[2]
    else:
        k_final, v_final = k.detach().clone(), v.detach().clone()
    final = Delta("ffn_slots", {f"{path}::K": k_final.cpu(), f"{path}::V": v_final.cpu()}, dict(delta.meta))
    metrics: dict[str, Any] = {
        "n_facts": len(facts),
        "layer": layer,
        "module": path,
        "slots": slots,
        "extra_params": final.num_parameters(),
        "model_params": model_params,
        "param_fraction": final.num_parameters() / model_params,
        "steps": step,
        "total_steps": total,
        "best_step": best[3] if val else step,
        "stopped_early": stopped_early,
        "train_examples": len(train),
        "val_examples": len(val),
        "last_train_loss": last_loss,
        "val_history": val_history,
        "train_seconds": round(train_ms / 1000, 1),
    }
    if config.evaluate:
        t1 = time.perf_counter()
        metrics.update(measure(lm, facts, final, part="test", threshold=config.threshold, splits=splits))
        metrics["eval_seconds"] = round(time.perf_counter() - t1, 1)
    return CalibrationResult(delta=final, metrics=metrics, steps=step, train_ms=train_ms)


# -- evaluation --------------------------------------------------------------------------------


def measure(
    lm,
    facts: Sequence[Fact],
    delta: Delta,
    *,
    part: str = "test",
    threshold: float | None = None,
    splits: Sequence[TemplateSplit] | None = None,
    generate: bool = True,
) -> dict[str, Any]:
    """Before/after metrics on the ``part`` ("test" or "val") templates, and perplexity on the
    shipped generic sentences that training never saw."""
    splits = splits or fact_splits(facts)
    templates = [getattr(s, part) for s in splits]
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    texts = generic_sentences("eval")
    ppl_before, ppl_after = perplexity(lm, texts), perplexity(lm, texts, deltas=[delta])
    return {
        part: {
            "before": evaluate_templates(lm, facts, templates, None, threshold=threshold, generate=generate),
            "after": evaluate_templates(lm, facts, templates, delta, threshold=threshold, generate=generate),
        },
        "perplexity_generic": {"before": ppl_before, "after": ppl_after, "ratio": ppl_after / ppl_before},
    }



def _normalize_answer(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def f1_score(prediction: str, truth: str) -> float:
    """SQuAD token F1."""
    pred, gold = _normalize_answer(prediction), _normalize_answer(truth)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if not pred or not gold:
        return float(pred == gold)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> bool:
    return _normalize_answer(prediction) == _normalize_answer(truth)


_CUT = re.compile(r"[.,;:!?\n()\"]")


def cut_prediction(text: str, rest_of_template: str = "") -> str:
    """The generated object: up to the first punctuation or the start of the template's next words."""
    text = _CUT.split(text, 1)[0]
    rest = rest_of_template.strip(" .")
    if rest:
        first_word = rest.split()[0]
        text = re.split(rf"\s{re.escape(first_word)}\b|-{re.escape(first_word.lstrip('-'))}\b", text, 1)[0]
    return text.strip()


def generate_objects(lm, facts: Sequence[Fact], templates: Sequence[str], *, deltas=None, batch_size: int = 64) -> list[str]:
    """Greedy continuation after each template's prefix (completion form), cut to the object."""
    prompts = [prefix(t, f.subject) for f, t in zip(facts, templates)]
    lengths = [len(encode_item(lm, ScoreItem(t, f.subject, f.object))[1]) for f, t in zip(facts, templates)]
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        max_new = max(lengths[start : start + batch_size]) + 4
        gens = lm.generate(chunk, max_new_tokens=max_new, mode="completion", deltas=deltas)
        for g, t in zip(gens, templates[start : start + batch_size]):
            out.append(cut_prediction(g.text, t.split("[Y]", 1)[1]))
    return out


def evaluate_templates(
    lm,
    facts: Sequence[Fact],
    templates: Sequence[Sequence[str]],
    delta: Delta | None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    generate: bool = True,
) -> dict[str, Any]:
    """False rate by CKA, exact match and F1 of the greedy object, over (fact, template) pairs.

    Facts with no template in ``templates`` (or without negative templates) are left out and
    counted in ``n_skipped``. ``generate=False`` skips free generation: exact match is then
    read from teacher forcing (every object token is the argmax) and F1 is not measured.
    """
    deltas = [delta] if delta is not None else None
    pairs: list[tuple[int, str]] = []
    negatives: dict[int, tuple[str, ...]] = {}
    for i, (f, ts) in enumerate(zip(facts, templates)):
        ft = resolve(f, need_negatives=False)
        if not ts or not ft.negatives:
            continue
        negatives[i] = ft.negatives
        pairs.extend((i, t) for t in ts)
    if not pairs:
        return {"n_facts": 0, "n_pairs": 0, "n_skipped": len(facts)}
    items = [ScoreItem(t, facts[i].subject, facts[i].object) for i, t in pairs]
    neg_items = {i: [ScoreItem(t, facts[i].subject, facts[i].object) for t in negs] for i, negs in negatives.items()}
    flat_neg = [it for its in neg_items.values() for it in its]
    scores = score_items(lm, items + flat_neg, deltas=deltas, with_suffix=DEFAULT_SCORING == "sentence")
    main, neg_scores = scores[: len(items)], dict(zip(flat_neg, scores[len(items) :]))
    opts = dict(scoring=DEFAULT_SCORING, length_norm=DEFAULT_LENGTH_NORM)
    p_neg = {i: float(np.mean([neg_scores[it].prob(**opts) for it in its])) for i, its in neg_items.items()}
    cka = [cka_value(s.prob(**opts), [p_neg[i]], alpha) for s, (i, _) in zip(main, pairs)]
    golds = [facts[i].object for i, _ in pairs]
    if generate:
        preds = generate_objects(lm, [facts[i] for i, _ in pairs], [t for _, t in pairs], deltas=deltas)
    else:
        preds = [g if s.greedy else "" for g, s in zip(golds, main)]
    return {
        "n_facts": len(negatives),
        "n_pairs": len(pairs),
        "n_skipped": len(facts) - len(negatives),
        "false_rate": float(np.mean([c < threshold for c in cka])),
        "exact_match": float(np.mean([exact_match(p, g) for p, g in zip(preds, golds)])),
        "f1": float(np.mean([f1_score(p, g) for p, g in zip(preds, golds)])) if generate else float("nan"),
        "greedy_object": float(np.mean([s.greedy for s in main])),
        "mean_logprob": float(np.mean([s.logprob for s in main])),
        "examples": [
            {"subject": facts[i].subject, "object": facts[i].object, "template": t, "prediction": p, "cka": c}
            for (i, t), p, c in list(zip(pairs, preds, cka))[:5]
        ],
    }


# -- the registered method ---------------------------------------------------------------------


@register("calinet")
class CaliNet(Method[CaliNetConfig]):
    """Bulk calibration of facts; the request is a :class:`CalibrationRequest`, not an ``EditRequest``."""

    config_class = CaliNetConfig
    accepts_edits = False

    def fit(self, lm, request: CalibrationRequest, config: CaliNetConfig, progress: ProgressFn | None = None) -> FitResult:
        if not isinstance(request, CalibrationRequest):
            raise TypeError("calinet takes a CalibrationRequest (facts), not a single edit")
        result = calibrate(lm, request.facts, config, progress)
        return FitResult(delta=result.delta, steps=result.steps, train_ms=result.train_ms, info=result.metrics)


__all__ = [
    "CaliNet", "CaliNetConfig", "CalibrationRequest", "CalibrationResult", "calibrate", "evaluate_templates", "measure",
    "exact_match", "f1_score", "fact_splits", "generic_sentences", "perplexity",
]
