"""KE: Knowledge Editor (De Cao et al., EMNLP 2021; the MEND repository's re-implementation), registered as
``method="ke"``.  Edits need a trained editor network (``hf_edit.editors.train_editor("ke", ...)``)."""

from ..registry import register_method
from .config import KEConfig
from .editor import KEEditor

__all__ = ["KEConfig", "KEEditor"]

register_method(KEConfig, KEEditor)
