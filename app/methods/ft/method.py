"""Fine-tuning baselines (the `ft` method): gradient steps on chosen weight matrices until the
target is the greedy continuation of the prompt (and of each paraphrase the request gives), in
completion form and, with ``chat`` (default), in chat form.

The tuned matrices are never written: the trainable tensor is the *difference* ΔW, a ``dense``
delta applied by forward hooks (output += x ΔWᵀ), so a revert is "stop applying it". There is no
locality term: the plain baseline of the papers (``"chat": false`` trains completion form only, as
they do). ``ft_constrained`` reuses this loop with ΔW kept in an L∞ box.
"""

from __future__ import annotations

import math
import time

import torch

from app.delta import Delta
from app.lm.arch import linear_dims
from app.lm.engine import LM
from app.methods.base import EditRequest, FitResult, Method, ProgressFn, register
from app.methods.ft.config import FtConfig
from app.methods.pnp.config import PnPConfig
from app.methods.pnp.method import PnP, TailForward, _token_counts, build_groups


def tuned_blocks(lm: LM, config: FtConfig) -> list[int]:
    n = lm.arch.num_layers
    if config.layers == "first":
        return [0]
    if config.layers == "all":
        return list(range(n))
    return [lm.arch.resolve_layer(int(config.layers))]


def tuned_modules(lm: LM, config: FtConfig) -> list[str]:
    paths: list[str] = []
    for i in tuned_blocks(lm, config):
        block = lm.arch.blocks[i]
        paths.extend([block.mlp_out] if config.linears == "out" else list(block.mlp_linears))
    return paths


def zero_delta(lm: LM, modules: list[str], method: str, routed: bool) -> Delta:
    tensors = {}
    for path in modules:
        d_in, d_out = linear_dims(lm.arch.module(path))
        tensors[f"{path}::W"] = torch.zeros(d_out, d_in, device=lm.device)
    return Delta("dense", tensors, {"method": method, "routed": "true" if routed else "false"})


def _plain_groups(lm: LM, request: EditRequest, chat: bool):
    """The request's prompt and paraphrases in completion form (and in chat form with ``chat``),
    nothing added (no locality term)."""
    cfg = PnPConfig(kl_weight=0.0, locality_prompts=0, subject_templates=0, relation_frames=0, context_prefixes=0,
                    context_sentences=0, chat=chat,
                    end_boundary=False)
    plain = EditRequest(prompt=request.prompt, target=request.target, subject=request.subject,
                        paraphrases=list(request.paraphrases))
    return build_groups(lm, plain, cfg)


def fine_tune(lm: LM, request: EditRequest, config: FtConfig, *, method: str, radius: float | None,
              progress: ProgressFn | None = None) -> FitResult:
    """Adam on ΔW until every target token is the argmax on every prompt (or ``max_steps``); with
    ``radius``, ΔW is projected back into [-radius, radius] after each step."""
    t0 = time.perf_counter()
    if not request.prompt.strip() or not request.target.strip():
        raise ValueError("an edit needs a non-empty prompt and target")
    delta = zero_delta(lm, tuned_modules(lm, config), method, config.routed)
    groups, n_examples, _ = _plain_groups(lm, request, config.chat)
    params = [t.requires_grad_(True) for t in delta.tensors.values()]
    opt = torch.optim.Adam(params, lr=config.lr)
    counts = _token_counts(groups, n_examples, lm.device)
    start = min(tuned_blocks(lm, config))
    forwards = [TailForward(lm, g, start) for g in groups]
    base_logp: list = [None] * len(groups)
    steps, converged, loss_value, base_holds = 0, False, math.nan, False
    with torch.enable_grad(), lm.active([delta]):
        while True:
            ce, _, _, ok, held = PnP._objective(lm, groups, forwards, base_logp, counts, 0.0)
            if steps == 0:
                base_holds = bool(held[0])  # example 0: the prompt (completion form), ΔW still zero
            loss_value = float(ce.detach())
            if ok:
                converged = True
                break
            if steps >= config.max_steps:
                break
            opt.zero_grad(set_to_none=True)
            ce.backward(inputs=params)
            opt.step()
            if radius is not None:
                with torch.no_grad():
                    for p in params:
                        p.clamp_(-radius, radius)
            steps += 1
            if progress is not None:
                progress(steps, config.max_steps, loss_value)
    meta = {**delta.meta, "target": request.target.strip()}
    final = Delta("dense", {k: v.detach().requires_grad_(False) for k, v in delta.tensors.items()}, meta)
    info = {"converged": converged, "loss": loss_value, "examples": n_examples, "modules": final.modules(),
            "max_abs": max(float(v.abs().max()) for v in final.tensors.values())}
    return FitResult(final, steps, (time.perf_counter() - t0) * 1000.0, info, base_holds=base_holds)


@register("ft")
class FineTune(Method[FtConfig]):
    """Plain fine-tuning of chosen MLP matrices; see the module docstring."""

    config_class = FtConfig
    reports_base_holds = True

    def fit(self, lm: LM, request: EditRequest, config: FtConfig, progress: ProgressFn | None = None) -> FitResult:
        return fine_tune(lm, request, config, method="ft", radius=None, progress=progress)
