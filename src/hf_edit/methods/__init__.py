"""Editing methods behind one plugin contract.

* :mod:`hf_edit.methods.base`: the contract (:class:`EditConfig`, :class:`Editor`, :class:`EditContext`,
  :class:`Update`, :class:`StatisticsProvider`);
* :mod:`hf_edit.methods.registry`: :func:`register_method`, :func:`available_methods`, :func:`get_method`, and
  plugin discovery through the ``hf_edit.methods`` entry-point group;
* one folder per built-in method (config, editor, presets), each registering itself on import.
"""

from .base import EditConfig, EditContext, Editor, StatisticsProvider, Update, match_preset
from .registry import (
    DEFAULT_METHOD,
    ENTRY_POINT_GROUP,
    NO_PRESET_METHOD,
    MethodEntry,
    available_methods,
    config_from_dict,
    default_method,
    get_method,
    register_method,
    resolve_config,
)

# Built-in methods (each registers itself).
from . import alphaedit, emmet, ft, ke, kn, layerwise, memit, mend, rome  # noqa: E402,F401  isort: skip
from .alphaedit import AlphaEditConfig, AlphaEditEditor  # noqa: E402
from .emmet import EMMETConfig, EMMETEditor  # noqa: E402
from .ft import FTConfig, FTEditor, FTLConfig  # noqa: E402
from .ke import KEConfig, KEEditor  # noqa: E402
from .kn import KNConfig, KNEditor  # noqa: E402
from .layerwise import LayerwiseConfig, LayerwiseEditor  # noqa: E402
from .memit import MEMITConfig, MEMITEditor  # noqa: E402
from .mend import MENDConfig, MENDEditor  # noqa: E402
from .rome import ROMEConfig, ROMEEditor  # noqa: E402

__all__ = ["EditConfig", "Editor", "EditContext", "Update", "StatisticsProvider", "match_preset", "register_method",
           "available_methods", "get_method", "resolve_config", "config_from_dict", "MethodEntry", "DEFAULT_METHOD", "NO_PRESET_METHOD", "default_method",
           "ENTRY_POINT_GROUP", "ROMEConfig", "ROMEEditor", "FTConfig", "FTLConfig", "FTEditor", "MEMITConfig", "MEMITEditor", "EMMETConfig",
           "EMMETEditor", "LayerwiseConfig", "LayerwiseEditor", "AlphaEditConfig", "AlphaEditEditor", "KNConfig", "KNEditor",
           "MENDConfig", "MENDEditor", "KEConfig", "KEEditor"]
