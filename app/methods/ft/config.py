"""Settings of the `ft` method: plain fine-tuning of chosen weight matrices, kept as a dense delta."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from app.methods.base import ConfigError, MethodConfig


class FtConfig(MethodConfig):
    """Fine-tune the chosen MLP matrices until the target holds (the papers' FT baselines)."""

    layers: Literal["first", "all"] | int = Field(
        default=-8,
        description="Blocks whose matrices are tuned: `first` (the first block), `all` (every block: a delta "
        "as large as those matrices of the whole model), or one block index (negative counts from the top).",
    )
    linears: Literal["out", "all"] = Field(
        default="out",
        description="Which MLP projections of those blocks are tuned: `out` (the MLP's output projection) or "
        "`all` (every MLP projection).",
    )
    lr: float = Field(default=1e-3, gt=0, le=1.0, description="Adam learning rate of the weight difference.")
    max_steps: int = Field(default=40, ge=1, le=1000, description="Most optimiser steps before giving up.")
    chat: bool = Field(
        default=True,
        description="Also train the prompt's chat form, when the model has a chat template: without it a "
        "fine-tuned edit never leads a chat answer (the service's default form). False: completion form "
        "only, as in the papers.",
    )
    routed: bool = Field(
        default=True,
        description="Serve the edit behind the selector (only queries routed to it see the delta); false: the "
        "delta applies to every query, as in the papers.",
    )

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, int) and abs(v) > 10_000:
            raise ValueError("layers must be `first`, `all` or a block index within the model's depth")
        return v

    def check(self, lm) -> None:
        if isinstance(self.layers, int):
            n = lm.arch.num_layers
            if not -n <= self.layers < n:
                raise ConfigError(
                    f"layers: block index {self.layers} is out of range for a model of {n} blocks (0..{n - 1}, "
                    f"or -{n}..-1)"
                )
