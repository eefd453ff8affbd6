"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025), registered as
``method="alphaedit"``."""

from ..registry import register_method
from .config import ALPHAEDIT_PRESETS, AlphaEditConfig
from .editor import AlphaEditEditor

__all__ = ["ALPHAEDIT_PRESETS", "AlphaEditConfig", "AlphaEditEditor"]

register_method(AlphaEditConfig, AlphaEditEditor)
