"""FT and FT+L: fine-tuning one projection (the ROME paper's baselines), registered as ``"ft"`` and ``"ft+l"``."""

from ..registry import register_method
from .config import DEFAULT_FTL_EPSILON, DEFAULT_FTL_LAYER, FT_PRESETS, FTL_PRESETS, FTConfig, FTLConfig
from .editor import DenseUpdate, FTEditor, autoregressive_loss, ft_loss, prompt_last_loss

__all__ = ["FTConfig", "FTLConfig", "FTEditor", "DenseUpdate", "FT_PRESETS", "FTL_PRESETS", "DEFAULT_FTL_LAYER",
           "DEFAULT_FTL_EPSILON", "ft_loss", "prompt_last_loss", "autoregressive_loss"]

register_method(FTConfig, FTEditor)
register_method(FTLConfig, FTEditor)
