"""ROME: rank-one model editing (Meng et al., NeurIPS 2022), registered as ``method="rome"``."""

from ..registry import register_method
from .config import (
           GUARD_MAX_KL,
           GUARD_MAX_RELATIVE_NORM,
           GUARD_MIN_KEY_ALIGNMENT,
           GUARD_PROMPTS,
           ROME_PRESETS,
           ROMEConfig,
)
from .editor import RankOneUpdate, ROMEEditor

__all__ = ["ROMEConfig", "ROMEEditor", "RankOneUpdate", "ROME_PRESETS", "GUARD_MAX_RELATIVE_NORM",
           "GUARD_MIN_KEY_ALIGNMENT", "GUARD_MAX_KL", "GUARD_PROMPTS"]

register_method(ROMEConfig, ROMEEditor)
