"""KE's edit-time hyperparameters: :class:`KEConfig` (``method="ke"``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...editors.editing import NetworkEditConfig

__all__ = ["KEConfig"]


@dataclass(frozen=True)
class KEConfig(NetworkEditConfig):
    """Edit with a trained KE editor network (see :class:`~hf_edit.editors.KENetwork`).

    The edit of one request: one forward and one backward pass of the mean NLL of its target tokens give the
    gradient factors (x_t, g_t) of each edited matrix; the network encodes the edit sentence (prompt + target) and
    predicts a mask and an offset, ΔW = lr_scale · s (Σ_t (β⊙g_t)(α⊙x_t)ᵀ + δγᵀ), stored as an exact LoRA of rank
    T + 1.  Several requests in one call: each is computed on the model as it was before the call and the updates
    are added (ranks add up), since KE conditions on one edit at a time.

    The other fields are those of :class:`~hf_edit.editors.editing.NetworkEditConfig`.

    Args:
        editor: the trained KE network: a folder written by ``EditorNetwork.save_pretrained`` (e.g. the
            ``output_dir`` of ``hf_edit.editors.train_editor("ke", ...)``) or a Hub model repo id; required.
        lr_scale: multiplies every update (applied; the reference's KE wrapper ignores it, which equals the default
            1.0).
    """

    method: ClassVar[str] = "ke"
    label: ClassVar[str] = "KE"
    description: ClassVar[str] = (
        "KE (De Cao et al., 2021; MEND repository re-implementation): a trained hypernetwork conditioned on the edit "
        "sentence masks and offsets the fact's gradient at the last layers' MLP matrices (one forward and one "
        "backward pass); stored as an exact LoRA of rank = contributing tokens + 1 per matrix.")
