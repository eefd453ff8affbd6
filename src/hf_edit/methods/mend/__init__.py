"""MEND: model editor networks with gradient decomposition (Mitchell et al., ICLR 2022), registered as
``method="mend"``.  Edits need a trained editor network (``hf_edit.editors.train_editor("mend", ...)``)."""

from ..registry import register_method
from .config import MENDConfig
from .editor import MENDEditor

__all__ = ["MENDConfig", "MENDEditor"]

register_method(MENDConfig, MENDEditor)
