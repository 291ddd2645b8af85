"""`ft`: fine-tuning of chosen weight matrices until the target holds, kept as a dense delta."""

from app.methods.ft.config import FtConfig
from app.methods.ft.method import FineTune

__all__ = ["FineTune", "FtConfig"]
