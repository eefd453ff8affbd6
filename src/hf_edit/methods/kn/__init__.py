"""KN: knowledge neurons (Dai et al. 2022; EleutherAI's code as wrapped by ROME), registered as ``method="kn"``."""

from ..registry import register_method
from .config import KN_PRESETS, AttributionTarget, EmbeddingSource, KNConfig
from .editor import KNEdit, KNEditor, kn_token_ids

__all__ = ["KNConfig", "KNEditor", "KNEdit", "KN_PRESETS", "kn_token_ids", "AttributionTarget", "EmbeddingSource"]

register_method(KNConfig, KNEditor)
