"""Settings of `ft_constrained` (Zhu et al. 2020): fine-tuning with the update kept in an L∞ box."""

from __future__ import annotations

from pydantic import Field

from app.methods.ft.config import FtConfig


class FtConstrainedConfig(FtConfig):
    """`ft` with every entry of ΔW kept within ±`radius` of the original weight."""

    radius: float = Field(
        default=1e-2, gt=0, le=10.0,
        description="δ of the L∞ constraint: |ΔW_ij| <= δ for every entry of every tuned matrix.",
    )
    lr: float = Field(default=2e-3, gt=0, le=1.0, description="Adam learning rate of the weight difference.")
    max_steps: int = Field(default=40, ge=1, le=1000, description="Most optimiser steps before giving up.")
