"""KnowledgeEditor (De Cao, Aziz, Titov, EMNLP 2021): an edit is one forward pass of a trained
hypernetwork that turns the gradient of the new answer's loss into a low-rank weight update.

``fit``: the loss of the target after the prompt (and the request's paraphrases), in completion
form, gives ∇W at each edited matrix; the editor, conditioned on (prompt, current first answer
token, target), predicts ΔW (see :mod:`app.methods.ke.editor`). With ``loop`` > 1 (`+loop`) the
editor is applied again, on the gradient at the edited weights, while the target is not yet the
argmax, and the updates add up. The result is a ``lora`` delta, stored, routed and reverted like
every edit. The editor is trained once per model by ``factpatch train-editor``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from app.delta import Delta
from app.lm.engine import LM
from app.methods.augment import CONTEXT_SENTENCES, is_question, relation_phrasings
from app.methods.base import EditRequest, FitResult, Method, MethodUnavailable, ProgressFn, register
from app.methods.ke import editor as E
from app.methods.ke.config import KeConfig

log = logging.getLogger(__name__)


def train_command(lm: LM) -> str:
    return f"factpatch train-editor --model {lm.name}"


def apply_editor(lm: LM, ef: E.EditorFile, request: EditRequest, loop: int = 1, scale: float = 1.0,
                 chat: bool = False, check: bool = True, extra: Sequence[str] = (), extra_weight: float = 1.0
                 ) -> tuple[Delta, int, bool | None, bool, dict[str, bool]]:
    """(delta, passes, the target holds on every prompt, the unedited model already wrote it after
    the prompt, per form whether the target holds on the prompt with the returned delta) for
    ``request``; with ``chat`` (and a chat template) the prompt's chat form joins the gradient and
    the stop rule. ``extra`` prompts (completion form) join the gradient only, their mean loss
    weighing ``extra_weight`` beside the mean of the request's own prompts; they are a batch of their
    own (a short prompt is not padded to the chat form's length) and never part of the stop rule.
    Without ``check`` the last pass is not verified by another forward (None, and no forms, when the
    loop did not see it hold): the service measures the stored edit through the served path anyway."""
    editor = ef.editor
    prompts = [p for p in dict.fromkeys([request.prompt, *request.paraphrases]) if p.strip()]
    modes = ["completion"] + (["chat"] if chat and lm.has_chat_template else [])
    rows = [(p, m, lm.prompt_ids(p, m), lm.target_ids(p, request.target, m))
            for m in modes for p in (prompts if m == "completion" else prompts[:1])]
    rows = [r for r in rows if r[3]]
    if not rows:
        raise ValueError("the target encodes to no tokens")
    prompt_rows = {m: i for i, (p, m, _, _) in enumerate(rows) if p == request.prompt}
    batch = E.make_batch(lm, [(ids, t) for _, _, ids, t in rows])
    more = [(ids, t) for ids, t in ((lm.prompt_ids(p, "completion"), lm.target_ids(p, request.target, "completion"))
                                    for p in dict.fromkeys(extra) if p.strip() and p not in prompts) if t]
    more_batch = E.make_batch(lm, more) if more and extra_weight > 0 else None
    delta: Delta | None = None
    passes, holds, base_holds = 0, False, False
    embeds = None

    forms: dict[str, bool] = {}
    # The update sits at the edited blocks: the blocks below them are run once for each batch.
    first_block = min(lm.arch.block_of(p) for p in editor.paths)
    prefix = lm.prefix(first_block)
    more_prefix = lm.prefix(first_block)

    def held_by(update: Delta) -> bool:  # a forward without gradients: is every target the argmax?
        with torch.no_grad(), lm.active([update]), prefix.use():
            per_row = E.target_nll(E.batch_logits(lm, batch), batch)[1]
        forms.clear()
        forms.update({m: bool(per_row[i]) for m, i in prompt_rows.items()})
        return bool(per_row.all())

    while passes < loop:
        if delta is not None and held_by(delta):  # the update holds already: no further gradient
            holds = True
            break
        active = [delta] if delta is not None else []
        factors, held, first = E.edit_gradients(lm, editor.paths, batch, active, prefix)
        if more_batch is not None:  # the summed loss's factors: the two batches' positions side by side
            added, _, _ = E.edit_gradients(lm, editor.paths, more_batch, active, more_prefix)
            factors = {p: E.Factors(torch.cat([f.x, added[p].x]), torch.cat([f.g, added[p].g * extra_weight]))
                       for p, f in factors.items()}
        if delta is None:
            base_holds = bool(held[0])  # row 0: the prompt in completion form, before any update
        if embeds is None:
            current = lm.tokenizer.decode([int(first[0])])
            embeds = E.condition_embeds(lm, request.prompt, current, request.target)
        with torch.no_grad():
            if scale != 1.0:
                factors = {p: E.Factors(f.x, f.g * scale) for p, f in factors.items()}
            delta = E.editor_delta(editor, embeds, factors, delta)
        passes += 1
    if not holds:
        if not check:
            return delta, passes, None, base_holds, {}
        holds = held_by(delta)
    return delta, passes, holds, base_holds, dict(forms)


def extra_prompts(request: EditRequest, config: KeConfig) -> list[str]:
    """The prompt after ``context_sentences`` lead-in sentences and up to ``relation_frames`` phrasings of
    the edited relation (those the selector's relation check ranks first; for a statement prompt, or a
    question with ``frames_on_questions``), for the gradient."""
    out = [f"{s} {request.prompt.lstrip()}" for s in CONTEXT_SENTENCES[: config.context_sentences]]
    frames = config.relation_frames if config.frames_on_questions or not is_question(request.prompt) else 0
    return out + relation_phrasings(request, frames)


@register("ke")
class KnowledgeEditorMethod(Method[KeConfig]):
    """One pass (or a few, with `loop`) of the trained editor; see the module docstring."""

    config_class = KeConfig
    reports_base_holds = True

    def prepare(self, lm: LM, home) -> None:
        try:
            path = E.load_for(lm, home)
        except E.EditorError as exc:  # a bad file must not stop the service; `ke` edits get the 409
            log.warning("KnowledgeEditor not loaded: %s", exc)
            return
        if path is not None:
            log.info("KnowledgeEditor for %s loaded from %s%s", lm.name, path,
                     " (and one for global edits)" if E.attached(lm, "global") is not E.attached(lm) else "")

    def check(self, lm: LM, config: KeConfig) -> None:
        super().check(lm, config)
        if E.attached(lm) is None:
            where = E.expected_path(lm)
            raise MethodUnavailable(
                f"no KnowledgeEditor is trained for model {lm.name} (weights {E.model_hash(lm)[:16]}); train one "
                f"with `{train_command(lm)}`" + (f" (it is installed as {where})" if where else "")
                + ", then restart the service",
                code="editor_not_trained",
            )

    def fit(self, lm: LM, request: EditRequest, config: KeConfig, progress: ProgressFn | None = None) -> FitResult:
        t0 = time.perf_counter()
        if not request.prompt.strip() or not request.target.strip():
            raise ValueError("an edit needs a non-empty prompt and target")
        self.check(lm, config)
        scope = "routed" if config.routed else "global"
        ef = E.attached(lm, scope)
        delta, passes, holds, base_holds, prompt_holds = apply_editor(
            lm, ef, request, config.loop, config.effective_scale(), config.chat, check=False,
            extra=extra_prompts(request, config), extra_weight=config.extra_weight)
        meta = {"scale": "1.0", "method": "ke", "target": request.target.strip(),
                "routed": "true" if config.routed else "false", "editor": ef.meta.get("model_hash", "")[:16],
                "editor_scope": "routed" if ef is E.attached(lm) else "global"}
        final = Delta("lora", {k: v.detach().contiguous() for k, v in delta.tensors.items()}, meta)
        if progress is not None:
            progress(passes, config.loop, 0.0)
        info = {"converged": holds, "passes": passes, "modules": final.modules(),
                "rank": int(final.get(final.modules()[0], "A").shape[0])}
        return FitResult(final, passes, (time.perf_counter() - t0) * 1000.0, info, base_holds=base_holds,
                         prompt_holds=prompt_holds)
