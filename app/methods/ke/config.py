"""Settings of the `ke` method (KnowledgeEditor): how the trained editor's update is applied."""

from __future__ import annotations

from pydantic import Field

from app.methods.base import MethodConfig


ROUTED_SCALE = 2.0  # the unset `scale` of a routed edit (docs/ke-notes.md, "Scale")


class KeConfig(MethodConfig):
    """The editor itself is trained beforehand (``factpatch train-editor``); an edit is one pass of it."""

    loop: int = Field(
        default=3, ge=1, le=20,
        description="The `+loop` variant: apply the editor again (on the gradient at the edited weights) while "
        "the target is not yet the argmax on the prompt, at most this many passes in all (1: the plain editor).",
    )
    scale: float | None = Field(
        default=None, gt=0, le=100.0,
        description="Multiplier of the gradient the editor reads (1: as trained). Unset: 2 for a routed edit, "
        "which the selector keeps from other queries, so a stronger update reaches more paraphrases; 1 for a "
        "global one (the paper's). Measured in docs/ke-notes.md.",
    )
    chat: bool = Field(
        default=True,
        description="Also take the prompt's chat form into the gradient and the `loop` stop rule, when the model "
        "has a chat template. Without it an edit seldom reaches chat answers (the service's default form): the "
        "editor is trained on completion form (docs/ke-notes.md).",
    )
    context_sentences: int = Field(
        default=0, ge=0, le=8,
        description="Also take the prompt after this many unrelated lead-in sentences into the gradient "
        "(completion form, not in the stop rule).",
    )
    relation_frames: int = Field(
        default=2, ge=0, le=8,
        description="Also take this many built-in phrasings of the edited relation, filled with the subject "
        "(those the selector's relation check ranks first), into the gradient: completion form, not in the "
        "stop rule; needs the edit's subject. Statement prompts only (\"X was born in\"), unless "
        "`frames_on_questions`: carries CounterFact edits to many more completion-form rephrasings, and "
        "costs a question's own answers (docs/ke-notes.md, 'Relation phrasings in the gradient').",
    )
    frames_on_questions: bool = Field(
        default=False,
        description="Also use `relation_frames` when the prompt is a question (ends with '?', as zsRE's): the "
        "phrasings are statements, and their gradient competes with the question's.",
    )
    extra_weight: float = Field(
        default=1.0, ge=0.0, le=10.0,
        description="The weight of the `context_sentences` and `relation_frames` prompts in the loss, together, "
        "beside the request's own prompts' mean (weight 1).",
    )
    routed: bool = Field(
        default=True,
        description="Serve the edit behind the selector (only queries routed to it see the update); false: the "
        "update applies to every query, as in the paper.",
    )

    def effective_scale(self) -> float:
        """The multiplier an edit uses: ``scale``, or by default 2 routed and 1 global."""
        return self.scale if self.scale is not None else (ROUTED_SCALE if self.routed else 1.0)
