"""Layer-wise values: EMMET's equality-constrained update with a value optimised at every edited layer (hf_edit's
own method), registered as ``method="layerwise"``."""

from ..registry import register_method
from .config import LayerwiseConfig
from .editor import LayerwiseEditor

__all__ = ["LayerwiseConfig", "LayerwiseEditor"]

register_method(LayerwiseConfig, LayerwiseEditor)
