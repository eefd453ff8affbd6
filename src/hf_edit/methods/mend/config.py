"""MEND's edit-time hyperparameters: :class:`MENDConfig` (``method="mend"``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...editors.editing import NetworkEditConfig

__all__ = ["MENDConfig"]


@dataclass(frozen=True)
class MENDConfig(NetworkEditConfig):
    """Edit with a trained MEND editor network (see :class:`~hf_edit.editors.MENDNetwork`).

    The edit: one forward and one backward pass of the mean NLL of the target tokens (all requests of the call
    jointly) give the gradient factors (u_t, δ_t) of each edited matrix; the network transforms them, and
    ΔW = lr_scale · η · Σ_t δ̃_t ũ_tᵀ, stored as LoRA factors A = Ũ, B = lr_scale · η Δ̃ᵀ (rank = tokens).

    The other fields are those of :class:`~hf_edit.editors.editing.NetworkEditConfig`.

    Args:
        editor: the trained MEND network: a folder written by ``EditorNetwork.save_pretrained`` (e.g. the
            ``output_dir`` of ``hf_edit.editors.train_editor("mend", ...)``) or a Hub model repo id; required.
    """

    method: ClassVar[str] = "mend"
    label: ClassVar[str] = "MEND"
    description: ClassVar[str] = (
        "MEND (Mitchell et al., 2022): a trained editor network transforms the rank-one factors of the fact's "
        "gradient at the last layers' MLP matrices into a weight update (one forward and one backward pass); stored "
        "as an exact LoRA of rank = number of contributing tokens per matrix.")
