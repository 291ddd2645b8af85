"""Constrained fine-tuning (Zhu et al. 2020, "Modifying Memories in Transformer Models"): the
`ft` loop with ΔW projected back into the L∞ ball of radius δ after every step, so no weight
moves by more than δ."""

from __future__ import annotations

from app.lm.engine import LM
from app.methods.base import EditRequest, FitResult, Method, ProgressFn, register
from app.methods.ft.method import fine_tune
from app.methods.ft_constrained.config import FtConstrainedConfig


@register("ft_constrained")
class ConstrainedFineTune(Method[FtConstrainedConfig]):
    config_class = FtConstrainedConfig
    reports_base_holds = True

    def fit(self, lm: LM, request: EditRequest, config: FtConstrainedConfig,
            progress: ProgressFn | None = None) -> FitResult:
        return fine_tune(lm, request, config, method="ft_constrained", radius=config.radius, progress=progress)
