"""Settings of the `ke` method (KnowledgeEditor): how the trained editor's update is applied."""

from __future__ import annotations

from pydantic import Field

from app.methods.base import MethodConfig


class KeConfig(MethodConfig):
    """The editor itself is trained beforehand (``factpatch train-editor``); an edit is one pass of it."""

    loop: int = Field(
        default=3, ge=1, le=20,
        description="The `+loop` variant: apply the editor again (on the gradient at the edited weights) while "
        "the target is not yet the argmax on the prompt, at most this many passes in all (1: the plain editor).",
    )
    scale: float = Field(
        default=1.0, gt=0, le=100.0,
        description="Multiplier of the predicted update (1: as the editor predicts it).",
    )
    chat: bool = Field(
        default=True,
        description="Also take the prompt's chat form into the gradient and the `loop` stop rule, when the model "
        "has a chat template. Without it an edit seldom reaches chat answers (the service's default form): the "
        "editor is trained on completion form (docs/ke-notes.md).",
    )
    routed: bool = Field(
        default=True,
        description="Serve the edit behind the selector (only queries routed to it see the update); false: the "
        "update applies to every query, as in the paper.",
    )
