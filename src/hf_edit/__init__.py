"""hf_edit: knowledge editing for any Hugging Face causal LM, each edit a PEFT adapter.

Quick start::

    from hf_edit import EditedModel, EditRequest

    request = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
    model = EditedModel.from_pretrained("gpt2-xl", edits=[request])
    model.save_pretrained("eiffel-rome")
"""

from .architecture import EditTarget, ModelLayout, find_layout, resolve_target
from .attribution import integrated_gradients
from .edited_model import Edit, EditedModel
from .errors import HfEditError
from .methods import (
    AlphaEditConfig,
    EditConfig,
    Editor,
    EMMETConfig,
    FTConfig,
    FTLConfig,
    KEConfig,
    KNConfig,
    LayerwiseConfig,
    MEMITConfig,
    MENDConfig,
    ROMEConfig,
    Update,
    available_methods,
    register_method,
)
from .requests import EditRequest
from .stats import SecondMomentStats
from .version import __version__

__all__ = [
    "EditedModel",
    "Edit",
    "EditRequest",
    "ROMEConfig",
    "FTConfig",
    "FTLConfig",
    "KNConfig",
    "integrated_gradients",
    "MEMITConfig",
    "EMMETConfig",
    "LayerwiseConfig",
    "AlphaEditConfig",
    "MENDConfig",
    "KEConfig",
    "EditConfig",
    "Editor",
    "Update",
    "register_method",
    "available_methods",
    "SecondMomentStats",
    "EditTarget",
    "ModelLayout",
    "find_layout",
    "resolve_target",
    "HfEditError",
    "__version__",
]
