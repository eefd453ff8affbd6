"""MEMIT: mass-editing memory in a transformer (Meng et al., ICLR 2023), registered as ``method="memit"``.

The package also holds what EMMET and AlphaEdit reuse: the grouped context templates, the keys (``compute_ks``),
the batched z optimisation (:mod:`.values`, also usable for ROME's v*), the closed forms (:mod:`.solve`) and the
layer loop (:class:`MassEditor`).
"""

from ...values import LogitLens, ValueProblem, ValueResult, ValueSettings, optimise_values
from ..registry import register_method
from .config import MEMIT_PRESETS, MEMIT_SEED_WORDS, MassEditConfig, MEMITConfig, default_layer_window
from .editor import MassEditor, MEMITEditor

__all__ = [
           "MEMIT_PRESETS",
           "MEMIT_SEED_WORDS",
           "LogitLens",
           "MEMITConfig",
           "MEMITEditor",
           "MassEditConfig",
           "MassEditor",
           "ValueProblem",
           "ValueResult",
           "ValueSettings",
           "default_layer_window",
           "optimise_values",
]

register_method(MEMITConfig, MEMITEditor)
