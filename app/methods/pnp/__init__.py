"""`pnp`: Plug-and-Play adaptation, one LoRA adapter per edit served behind the selector."""

from app.methods.pnp.config import PnPConfig
from app.methods.pnp.method import PnP

__all__ = ["PnP", "PnPConfig"]
