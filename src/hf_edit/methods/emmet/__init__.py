"""EMMET: equality-constrained mass model editing (Gupta et al., 2024), registered as ``method="emmet"``."""

from ..registry import register_method
from .config import EMMET_PRESETS, EMMETConfig
from .editor import EMMETEditor

__all__ = ["EMMET_PRESETS", "EMMETConfig", "EMMETEditor"]

register_method(EMMETConfig, EMMETEditor)
