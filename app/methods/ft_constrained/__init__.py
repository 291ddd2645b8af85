"""`ft_constrained`: fine-tuning with the update kept in an L∞ box (Zhu et al. 2020)."""

from app.methods.ft_constrained.config import FtConstrainedConfig
from app.methods.ft_constrained.method import ConstrainedFineTune

__all__ = ["ConstrainedFineTune", "FtConstrainedConfig"]
