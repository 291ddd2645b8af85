"""Plug-and-Play adaptation (Lee et al., Findings of ACL 2022): one LoRA adapter per edit.

The adapter is a low-rank delta on MLP projections of a few middle blocks, trained until the
target is the greedy continuation of the prompt (and of each paraphrase), in completion form
and, when the model has one, chat form. The selector in front of the model applies an edit's
adapter only to queries routed to it, so the adapter itself may be specific to its fact; a
light KL term on unrelated prompts still keeps it from disturbing what it should not.

Training reads the frozen model through the delta's forward hooks (``lm.active``): gradients
flow only into the adapter tensors, base weights are never written, and other threads never
see the adapter.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.delta import Delta
from app.lm.arch import linear_dims
from app.lm.engine import LM, Mode
from app.methods.augment import (
    CONTEXT_PREFIXES,
    CONTEXT_SENTENCES,
    SUBJECT_TEMPLATES,
    own_prompts,
    relation_phrasings,
)
from app.methods.base import EditRequest, FitResult, Method, ProgressFn, register
from app.methods.pnp.config import PnPConfig

@dataclass
class _Group:
    """One padded forward batch: training rows (targets) and locality rows (last position)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    keep: torch.Tensor  # [B, L] bool: positions whose logits are needed
    is_target: torch.Tensor  # [n_keep] bool: this kept position predicts a target token
    targets: torch.Tensor  # [n_target] token ids
    target_row: torch.Tensor  # [n_target] training example index (for per-example mean)
    is_boundary: torch.Tensor  # [n_keep] bool: this kept position follows a whole target
    boundary_row: torch.Tensor  # [n_boundary] training example index of each boundary position
    is_negative: torch.Tensor  # [n_keep] bool: predicts a token of the base answer to an other-fact prompt
    negative_prompts: int = 0  # other-fact prompts in this batch (each trained form carries the same ones)


def adapted_layers(lm: LM, config: PnPConfig) -> list[int]:
    """Block indices that get an adapter."""
    if isinstance(config.layers, int):
        n = lm.arch.num_layers
        count = min(config.layers, n)
        start = round(config.depth * (n - 1) - (count - 1) / 2)
        start = max(0, min(start, n - count))
        return list(range(start, start + count))
    return sorted({lm.arch.resolve_layer(i) for i in config.layers})


def adapted_modules(lm: LM, config: PnPConfig) -> list[str]:
    """Module paths that get an adapter, from the model's structure (never from its family)."""
    paths = []
    for i in adapted_layers(lm, config):
        block = lm.arch.blocks[i]
        if config.linears == "out":
            paths.append(block.mlp_out)
        elif config.linears == "in":
            paths.extend(p for p in block.mlp_linears if p != block.mlp_out)
        else:
            paths.extend(block.mlp_linears)
    return paths


def init_delta(lm: LM, config: PnPConfig) -> Delta:
    """A LoRA delta with random A and zero B: a no-op until trained."""
    gen = torch.Generator().manual_seed(config.seed)
    tensors = {}
    for path in adapted_modules(lm, config):
        d_in, d_out = linear_dims(lm.arch.module(path))
        a = torch.randn(config.rank, d_in, generator=gen) * config.init_std
        tensors[f"{path}::A"] = a.to(lm.device)
        tensors[f"{path}::B"] = torch.zeros(d_out, config.rank, device=lm.device)
    meta = {
        "scale": repr(float(config.scale)),
        "method": "pnp",
        "rank": str(config.rank),
    }
    return Delta("lora", tensors, meta)


def relation_prompts(request: EditRequest, config: PnPConfig) -> list[str]:
    """Up to ``relation_frames`` built-in phrasings of the edited relation (``relation_phrasings``)."""
    return relation_phrasings(request, config.relation_frames)


def training_prompts(request: EditRequest, config: PnPConfig, augment: bool = True,
                     relation: list[str] | None = None) -> list[str]:
    """The prompt and its paraphrases, and with ``augment`` the prompt after generic lead-ins
    (``context_prefixes``, ``context_sentences``), the ``relation`` phrasings (``relation_prompts``)
    and the subject in generic frames (``subject_templates``)."""
    prompts: list[str] = []
    for p in [request.prompt, *request.paraphrases]:
        if p.strip() and p not in prompts:
            prompts.append(p)
    if not augment:
        return prompts
    for prefix in CONTEXT_PREFIXES[: config.context_prefixes] + CONTEXT_SENTENCES[: config.context_sentences]:
        prompts.append(f"{prefix} {request.prompt.lstrip()}")
    prompts.extend(p for p in relation or [] if p not in prompts)
    if request.subject and request.subject.strip():
        for frame in SUBJECT_TEMPLATES[: config.subject_templates]:
            prompts.append(frame.format(s=request.subject.strip()))
    return prompts


def training_modes(lm: LM, request: EditRequest, config: PnPConfig) -> tuple[Mode, ...]:
    if request.modes:
        modes = tuple(request.modes)
        if "chat" in modes and not lm.has_chat_template:
            modes = tuple(m for m in modes if m != "chat")
        return modes or ("completion",)
    return ("completion", "chat") if (config.chat and lm.has_chat_template) else ("completion",)


def locality_texts(request: EditRequest, config: PnPConfig) -> list[str]:
    """The request's unrelated prompts, else a seeded draw from the built-in pool."""
    if config.kl_weight <= 0 or config.locality_prompts == 0:
        return []
    if request.locality_prompts:
        return [p for p in request.locality_prompts if p.strip()][: config.locality_prompts]
    from app.selector.pool import sample_locality

    seed = config.seed * 1_000_003 + zlib.crc32(request.prompt.encode("utf-8"))
    return sample_locality(config.locality_prompts, seed, exclude=request.subject)


def _build_group(
    lm: LM,
    examples: list[tuple[list[int], list[int]]],
    locality: list[list[int]],
    first_example: int,
    boundary: bool = False,
    negatives: list[tuple[list[int], list[int]]] | None = None,
) -> _Group:
    """Right-padded batch; kept positions are the target-predicting ones, with ``boundary`` the
    position after each whole target, each locality prompt's last position and each other-fact
    prompt's positions that predict the base model's answer to it (its first token at least), in
    row-major order (the order ``logits[keep]`` returns them)."""
    negatives = negatives or []
    rows = [p + t for p, t in examples] + locality + [p + c[:-1] for p, c in negatives]
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    target_at: dict[tuple[int, int], tuple[int, int]] = {}
    boundary_at: dict[tuple[int, int], int] = {}
    for r, seq in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[r, : len(seq)] = 1
    for r, (p, t) in enumerate(examples):
        for j, tok in enumerate(t):
            keep[r, len(p) - 1 + j] = True
            target_at[(r, len(p) - 1 + j)] = (tok, first_example + r)
        if boundary:
            keep[r, len(p) + len(t) - 1] = True
            boundary_at[(r, len(p) + len(t) - 1)] = first_example + r
    for k, seq in enumerate(locality):
        keep[len(examples) + k, len(seq) - 1] = True
    for k, (p, c) in enumerate(negatives):
        keep[len(examples) + len(locality) + k, len(p) - 1 : len(p) + max(len(c), 1) - 1] = True
    first_negative = len(examples) + len(locality)
    is_target, targets, target_row, is_boundary, boundary_row, is_negative = [], [], [], [], [], []
    for r, c in keep.nonzero().tolist():
        is_negative.append(r >= first_negative)
        hit = target_at.get((r, c))
        is_target.append(hit is not None)
        if hit is not None:
            targets.append(hit[0])
            target_row.append(hit[1])
        row = boundary_at.get((r, c))
        is_boundary.append(row is not None)
        if row is not None:
            boundary_row.append(row)
    dev = lm.device

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=dev)

    return _Group(
        ids.to(dev), attn.to(dev), keep.to(dev), tensor(is_target, torch.bool), tensor(targets, torch.long),
        tensor(target_row, torch.long), tensor(is_boundary, torch.bool), tensor(boundary_row, torch.long),
        tensor(is_negative, torch.bool), len(negatives),
    )


def boundary_tokens(lm: LM) -> torch.Tensor:
    """[vocab] bool: tokens that cannot continue a word (``LM.word_boundary_mask``)."""
    return lm.word_boundary_mask()


class TailForward:
    """Logits at a batch's kept positions; after the first call the blocks below the lowest
    adapted one are replayed (``LM.prefix``), so later steps run only the blocks from there up.
    Nothing below that block depends on the adapter: the result is a full forward's."""

    def __init__(self, lm: LM, group: _Group, start: int):
        self.lm, self.group = lm, group
        self.prefix = lm.prefix(start)

    def __call__(self) -> torch.Tensor:
        with self.prefix.use():
            return kept_logits(self.lm, self.group)


def kept_logits(lm: LM, group: _Group) -> torch.Tensor:
    """Logits at the group's kept positions only ([n_keep, vocab])."""
    return lm.kept_logits(group.input_ids, group.attention_mask, group.keep)


def negative_texts(request: EditRequest, config: PnPConfig) -> list[str]:
    """The other-fact prompts the adapter must leave alone (none without their weight): the
    request's, else, when it names a subject, built-in frames of other relations of that subject
    that the relation check tells apart from the edited one (``other_relation_prompts``)."""
    if config.negative_weight <= 0 or config.negative_prompts == 0:
        return []
    own = own_prompts(request)
    given = [n.strip() for n in request.negatives]
    if not any(given) and (request.subject or "").strip():
        from app.methods.frames import OTHER_FACT_FRAMES, other_relation_prompts
        from app.selector.scope import PLACEHOLDER, same_relation_scores

        scored = same_relation_scores([request.prompt], request.subject, request.target,
                                      tuple(f.format(s=PLACEHOLDER) for _, _, f in OTHER_FACT_FRAMES))
        if scored is not None:
            given = other_relation_prompts(request.subject, scored[0], scored[1], config.negative_prompts)
    return [p for p in dict.fromkeys(given) if p and p not in own][: config.negative_prompts]


def build_groups(lm: LM, request: EditRequest, config: PnPConfig) -> tuple[list[_Group], int, int]:
    """One forward batch per text form (similar lengths pad little); the locality and other-fact
    prompts ride with the completion batch. Returns (groups, training examples, locality prompts)."""
    loc = [lm.prompt_ids(p, "completion") for p in locality_texts(request, config)]
    negative = negative_texts(request, config)

    def answered(mode: Mode) -> list[tuple[list[int], list[int]]]:
        """The other-fact prompts in ``mode``'s form with the base model's first
        ``negative_tokens`` answer tokens (the answer the adapter must leave as it is)."""
        if not negative:
            return []
        gens = lm.generate(negative, max_new_tokens=config.negative_tokens, mode=mode)
        return [(lm.prompt_ids(p, mode), list(g.token_ids)) for p, g in zip(negative, gens)]

    neg = answered("completion")
    n_loc = len(loc)
    groups, n_examples = [], 0
    # "Paris" must not come out as "Parisian": after a target that ends in a letter or digit,
    # the next token has to start a new word (or end the text).
    boundary = config.end_boundary and request.target.strip()[-1:].isalnum()
    relation = relation_prompts(request, config)
    for mode in training_modes(lm, request, config):
        # The generic augmentations are short completion-form prompts; the chat form (a long
        # template around each prompt) is trained on the request's own prompts only.
        prompts = training_prompts(request, config, augment=(mode == "completion"), relation=relation)
        examples = [(lm.prompt_ids(p, mode), lm.target_ids(p, request.target, mode)) for p in prompts]
        examples = [(p, t) for p, t in examples if t]
        if not examples:
            continue
        # The other-fact prompts are asked in every form trained (a routed chat question of another
        # relation must keep its answer too); the unrelated prompts ride with the completion batch.
        carried = (loc, neg) if mode == "completion" else ([], answered(mode))
        groups.append(_build_group(lm, examples, carried[0], n_examples, boundary, carried[1]))
        if mode == "completion":
            loc, neg = [], []
        n_examples += len(examples)
    if not groups:
        raise ValueError("the target encodes to no tokens")
    if loc or neg:  # no completion batch carried them
        groups.append(_build_group(lm, [], loc, n_examples, negatives=neg))
    return groups, n_examples, n_loc


@register("pnp")
class PnP(Method[PnPConfig]):
    """Per-edit LoRA adapter; see the module docstring."""

    config_class = PnPConfig
    reports_base_holds = True

    def fit(self, lm: LM, request: EditRequest, config: PnPConfig, progress: ProgressFn | None = None) -> FitResult:
        t0 = time.perf_counter()
        if not request.prompt.strip() or not request.target.strip():
            raise ValueError("an edit needs a non-empty prompt and target")
        delta = init_delta(lm, config)
        groups, n_examples, n_loc = build_groups(lm, request, config)
        params = [t.requires_grad_(True) for t in delta.tensors.values()]
        opt = torch.optim.Adam(params, lr=config.lr)
        counts = _token_counts(groups, n_examples, lm.device)
        start = adapted_layers(lm, config)[0]
        forwards = [TailForward(lm, g, start) for g in groups]
        base_logp: list[torch.Tensor | None] = [None] * len(groups)
        steps, converged, ce_value, kl_value, neg_value = 0, False, math.nan, 0.0, 0.0
        # Example 0 is the prompt in completion form when that form is trained (training_prompts).
        first_is_prompt = training_modes(lm, request, config)[0] == "completion"
        base_holds: bool | None = None
        with torch.enable_grad(), lm.active([delta]):
            while True:
                ce, kl, neg, ok, held = self._objective(lm, groups, forwards, base_logp, counts, config.min_prob)
                if steps == 0 and first_is_prompt:
                    base_holds = bool(held[0])  # B is still zero: the unedited model
                ce_value, kl_value, neg_value = float(ce.detach()), float(kl.detach()), float(neg.detach())
                if ok:
                    converged = True
                    break
                if steps >= config.max_steps:
                    break
                loss = ce + config.kl_weight * kl + config.negative_weight * neg
                opt.zero_grad(set_to_none=True)
                loss.backward(inputs=params)
                opt.step()
                steps += 1
                if progress is not None:
                    progress(steps, config.max_steps, float(loss.detach()))
        for p in params:
            p.requires_grad_(False)
        # The answer path writes the target with the adapter, then lets the base model go on.
        meta = {**delta.meta, "target": request.target.strip()}
        final = Delta("lora", {k: v.detach() for k, v in delta.tensors.items()}, meta)
        train_ms = (time.perf_counter() - t0) * 1000.0
        info = {
            "converged": converged, "loss": ce_value, "locality_kl": kl_value, "negative_kl": neg_value,
            "examples": n_examples, "locality_prompts": n_loc, "negative_prompts": max((g.negative_prompts for g in groups), default=0),
            "modules": final.modules(),
        }
        return FitResult(final, steps, train_ms, info, base_holds=base_holds)

    @staticmethod
    def _objective(
        lm: LM,
        groups: list[_Group],
        forwards: list["TailForward"],
        base_logp: list[torch.Tensor | None],
        counts: torch.Tensor,
        min_prob: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, torch.Tensor]:
        """(mean per-example target NLL, mean locality KL, mean other-fact KL, is every target token
        the argmax with at least ``min_prob`` and every other-fact prompt's top token the base
        model's, [examples] bool: every target token of the example is the argmax). The first call, with B still zero, records the base model's distributions at the
        locality and other-fact positions that the KL terms compare against."""
        nll = torch.zeros(len(counts), device=lm.device)
        misses = torch.zeros(len(counts), device=lm.device)
        kl_terms, neg_terms, ok = [], [], True
        for g, group in enumerate(groups):
            logp = torch.log_softmax(forwards[g](), dim=-1)
            if group.targets.numel():
                t_all = logp[group.is_target]
                t_logp = t_all.gather(-1, group.targets[:, None]).squeeze(-1)
                hit = t_all.detach().argmax(-1).eq(group.targets)
                misses = misses.index_add(0, group.target_row, (~hit).float())
                ok = ok and bool(hit.all())
                ok = ok and bool(t_logp.detach().exp().min() >= min_prob)
                nll = nll.index_add(0, group.target_row, -t_logp)
            if group.boundary_row.numel():
                # The target ends where it ends: the next token is one that starts a new word.
                mask = boundary_tokens(lm)
                b_all = logp[group.is_boundary]
                b_logp = torch.logsumexp(b_all.masked_fill(~mask, float("-inf")), dim=-1)
                ok = ok and bool(mask[b_all.argmax(-1)].all())
                ok = ok and bool(b_logp.detach().exp().min() >= min_prob)
                nll = nll.index_add(0, group.boundary_row, -b_logp)
            rest = ~(group.is_target | group.is_boundary)
            ref_logp = logp[rest]
            if ref_logp.numel():
                if base_logp[g] is None:
                    base_logp[g] = ref_logp.detach()
                negative = group.is_negative[rest]
                kl_each = F.kl_div(ref_logp, base_logp[g], log_target=True, reduction="none").sum(-1)
                if bool((~negative).any()):
                    kl_terms.append(kl_each[~negative].mean())
                if bool(negative.any()):
                    neg_terms.append(kl_each[negative].mean())
                    kept = ref_logp[negative].argmax(-1).eq(base_logp[g][negative].argmax(-1))
                    ok = ok and bool(kept.all())
        ce = (nll / counts).mean()
        zero = torch.zeros((), device=lm.device)
        kl = torch.stack(kl_terms).mean() if kl_terms else zero
        neg = torch.stack(neg_terms).mean() if neg_terms else zero
        return ce, kl, neg, ok, misses.eq(0)


def _token_counts(groups: list[_Group], n_examples: int, device: torch.device) -> torch.Tensor:
    """Target tokens (and the boundary after them) per training example, so that every example
    weighs the same in the loss."""
    counts = torch.zeros(n_examples, device=device)
    for group in groups:
        for rows in (group.target_row, group.boundary_row):
            if rows.numel():
                counts = counts.index_add(0, rows, torch.ones_like(rows, dtype=counts.dtype))
    return counts.clamp(min=1)
