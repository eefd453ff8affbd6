"""Editing methods. Each computes updates on a model; :mod:`hf_edit.edited_model` stores them as adapters."""

from .rome import ROME_PRESETS, RankOneUpdate, ROMEConfig, ROMEEditor, rome_preset_for

__all__ = ["ROMEConfig", "ROME_PRESETS", "ROMEEditor", "RankOneUpdate", "rome_preset_for"]
