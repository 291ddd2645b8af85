"""Configuration of CaliNet calibration; defaults were measured on the embedded model
(docs/calinet-notes.md) and scale with the number of facts."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from app.methods.base import MAX_SEED, ConfigError, MethodConfig


class CaliNetConfig(MethodConfig):
    layer: int | None = Field(
        default=None, ge=-10_000, le=10_000,
        description="Decoder block whose MLP gets the extra slots (negative counts from the end). "
        "Unset: `default_layer_fraction` of the depth.",
    )
    default_layer_fraction: float = Field(
        default=0.48, ge=0.0, le=1.0,
        description="Where the slots go when `layer` is unset, as a fraction of the depth (0: first block, 1: last).",
    )
    slots: int | None = Field(
        default=None, ge=1, le=65536,
        description="Number of extra FFN slots. Unset: `slots_per_fact` x facts, at least `min_slots`, "
        "capped by `max_param_fraction`.",
    )
    slots_per_fact: float = Field(default=0.5, gt=0.0, le=64.0, description="Slots per fact when `slots` is unset.")
    min_slots: int = Field(default=16, ge=1, le=65536, description="Fewest slots when `slots` is unset.")
    max_param_fraction: float = Field(
        default=0.01, gt=0.0, le=0.1,
        description="Cap on the slots' parameters as a fraction of the model's parameters.",
    )
    act: Literal["gelu", "relu", "silu"] = Field(default="gelu", description="Activation of the slots (CaliNet: GELU).")
    epochs: float = Field(
        default=12.0, gt=0.0, le=100.0,
        description="Passes over the facts; one pass shows every fact once, with one of its train templates drawn at random.",
    )
    steps: int | None = Field(default=None, ge=1, le=100000, description="Optimiser steps. Unset: from `epochs`.")
    batch_size: int = Field(default=32, ge=1, le=512, description="Training examples per step.")
    lr: float = Field(default=2e-2, gt=0.0, le=1.0, description="Adam learning rate of the slots.")
    init_std: float = Field(
        default=0.02, ge=0.0, le=1.0, description="Std of the random key init; values start at zero, so the delta starts as a no-op.",
    )
    key_init: Literal["random", "data"] = Field(
        default="random",
        description="Key init: `random` (normal, `init_std`) or `data` (each slot keyed on the centred MLP input at "
        "the last prompt token of one fact, so it fires on that fact from the first step).",
    )
    key_scale: float = Field(default=1.0, gt=0.0, le=100.0, description="Activation a `data` key gives its own prompt.")
    locality_weight: float = Field(
        default=10.0, ge=0.0, le=1e6,
        description="Weight of the penalty on the slots' output over generic text (relative to the MLP's own output), "
        "which keeps perplexity on unrelated text.",
    )
    kl_weight: float = Field(
        default=2.0, ge=0.0, le=1e6,
        description="Weight of KL(base || calibrated) of the next-token distributions over generic sentences "
        "(a few per step); the direct guard on perplexity, at the price of two extra small forwards per step.",
    )
    kl_sentences: int = Field(default=4, ge=1, le=64, description="Generic sentences per step for the KL term.")
    eval_every: int = Field(default=50, ge=1, le=100000, description="Steps between validation-loss checks (early stopping).")
    patience: int = Field(default=3, ge=1, le=1000, description="Validation checks without improvement before stopping.")
    max_val_examples: int = Field(default=256, ge=1, le=100000, description="Validation examples per check (a fixed sample).")
    max_facts: int = Field(default=1000, ge=1, le=5000, description="Most facts one calibration accepts.")
    evaluate: bool = Field(
        default=True, description="Measure before/after metrics on the test templates (costs about as much as training)."
    )
    threshold: float | None = Field(
        default=None, gt=0.0, le=1000.0, description="CKA threshold for the false rate. Unset: the detector's default."
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the key init and of the template draws.")

    def check(self, lm) -> None:
        try:
            self.resolve_layer(lm.arch.num_layers)
        except ValueError as exc:
            raise ConfigError(f"layer: {exc}") from None

    def resolve_slots(self, n_facts: int, model_params: int, slot_params: int) -> int:
        """Slot count for ``n_facts`` within the parameter budget."""
        budget = max(1, int(self.max_param_fraction * model_params) // slot_params)
        if self.slots is not None:
            if self.slots > budget:
                raise ValueError(
                    f"{self.slots} slots exceed the budget of {budget} (max_param_fraction={self.max_param_fraction})"
                )
            return self.slots
        return max(1, min(max(self.min_slots, math.ceil(self.slots_per_fact * n_facts)), budget))

    def resolve_layer(self, num_layers: int) -> int:
        if self.layer is not None:
            idx = self.layer + num_layers if self.layer < 0 else self.layer
            if not 0 <= idx < num_layers:
                raise ValueError(f"layer {self.layer} out of range for a model of {num_layers} layers")
            return idx
        return min(num_layers - 1, round(self.default_layer_fraction * (num_layers - 1)))
