"""Configuration of a repair (Tanno et al., 2022): which causes to look for, how to erase them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.methods.base import MAX_SEED, MethodConfig

STEP_GRID = tuple(4.0**k for k in range(-8, 4))  # 1.5e-5 ... 16


class RepairConfig(MethodConfig):
    identify: Literal["influence", "ewc"] = Field(
        default="ewc",
        description="Cause identification: `influence` (linear influence with the diagonal Fisher, "
        "-∇log p(F)ᵀ F̂⁻¹ ∇log p(z) / |D|) or `ewc` (log p(z|θ̂) - log p(z|θ*), θ* fitted to F with the Fisher penalty).",
    )
    treatment: Literal["newton", "ewc", "finetune", "revert"] = Field(
        default="finetune",
        description="Treatment of the top-k causes: Newton update removal, EWC deletion, fine-tuning on the "
        "corrected data (the query failures and the remaining training data), or `revert` (only the edits among "
        "the causes are switched off). Edits among the causes are always switched off.",
    )
    top_k: int = Field(default=10, ge=1, le=1000, description="Causes treated (those with a positive score among the k best).")
    step_size: float | None = Field(
        default=None, gt=0.0, le=1000.0,
        description="γ of the Newton removal (1: the Newton step with the damped diagonal Fisher). Unset: the "
        "smallest step of a fixed grid (4^-8 ... 4^3, stopped at the first step beyond the limits) that fixes the most query failures while generic perplexity "
        "(fit half) rises by at most `max_ppl_increase` and the accuracy on a sample of the kept training rows "
        "drops by at most `max_kept_drop`.",
    )
    max_kept_drop: float = Field(
        default=0.02, ge=0.0, le=1.0,
        description="Largest drop of greedy accuracy on the training rows of the facts not treated that the automatic step may cause.",
    )
    guard_rows: int = Field(default=128, ge=0, le=100000, description="Kept training rows sampled for that check.")
    guard_sentences: int = Field(default=24, ge=1, le=1000, description="Generic sentences (fit half) of the perplexity check.")
    max_ppl_increase: float = Field(
        default=0.01, ge=0.0, le=10.0,
        description="Largest relative rise of generic perplexity (fit sentences) the automatic step may cause.",
    )
    damping: float = Field(
        default=1.0, gt=0.0, le=1e6,
        description="Added to the Fisher's diagonal, as a fraction of its mean (keeps H⁻¹ bounded on unused parameters).",
    )
    curvature: Literal["diagonal", "empirical"] = Field(
        default="diagonal",
        description="H of the influence scores and of the Newton removal: `diagonal` (the diagonal of the empirical "
        "Fisher over the training rows; measured better at 500 facts, docs/repair-notes.md) or `empirical` (the "
        "empirical Fisher Σ_z ∇log p(z) ∇log p(z)ᵀ over the calibration's facts, exact, inverted through the "
        "Woodbury identity; it has the rank of the number of facts). Both are damped by `damping` × the mean of "
        "their diagonal.",
    )
    parameters: Literal["KV", "V"] = Field(
        default="KV", description="Trained tensors of the calibration slots the repair reads and changes: keys and values, or values only.",
    )
    max_templates_per_fact: int = Field(
        default=8, ge=1, le=64, description="Training templates of a calibration fact used as its datum z (the first ones).",
    )
    steps: int = Field(default=20, ge=1, le=1000, description="Optimiser steps of EWC (identification or deletion) and fine-tuning.")
    lr: float = Field(default=2e-2, gt=0.0, le=1.0, description="Adam learning rate of those steps.")
    l2: float = Field(default=1e-3, ge=0.0, le=1e6, description="λ of the plain L2 term beside the Fisher penalty.")
    kl_weight: float = Field(
        default=10.0, ge=0.0, le=1e6,
        description="`finetune`: weight of KL(served || repaired) of the next-token distributions over generic "
        "sentences (the fit half, `kl_sentences` a step), which keeps the repair off unrelated text.",
    )
    kl_sentences: int = Field(default=4, ge=1, le=64, description="Generic sentences per fine-tuning step for that term.")
    batch_size: int = Field(default=16, ge=1, le=256, description="Sequences per forward pass.")
    max_causes_reported: int = Field(default=50, ge=1, le=1000, description="Ranked causes kept in the report.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the query/held-out split and of sampling.")
