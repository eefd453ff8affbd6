"""Editing methods. Each computes updates on a model; :mod:`hf_edit.edited_model` stores them as adapters."""

from .ft import FT_PRESETS, FTL_PRESETS, DenseUpdate, FTConfig, FTEditor, ft_preset_for
from .rome import ROME_PRESETS, RankOneUpdate, ROMEConfig, ROMEEditor, rome_preset_for

__all__ = ["ROMEConfig", "ROME_PRESETS", "ROMEEditor", "RankOneUpdate", "rome_preset_for",
           "FTConfig", "FT_PRESETS", "FTL_PRESETS", "FTEditor", "DenseUpdate", "ft_preset_for"]
