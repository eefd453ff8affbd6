"""AlphaEdit's hyperparameters: :class:`AlphaEditConfig` and the reference's shipped presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import ConfigError
from ..memit.config import MEMIT_PRESETS, REFERENCE_ONLY_KEYS, MassEditConfig, _finite

__all__ = ["ALPHAEDIT_PRESETS", "AlphaEditConfig"]

_NULL = dict(nullspace_threshold=2e-2, L2=10.0)
_LLAMA3 = dict(_NULL, layers=(4, 5, 6, 7, 8), fact_token="subject_last", v_num_grad_steps=25, v_lr=0.1,
               v_loss_layer=31, v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625)

#: Shipped hyperparameters of the reference (jianghoucheng/AlphaEdit ``hparams/AlphaEdit``): MEMIT's values plus the
#: null-space threshold and L2; Llama-3-8B edits ``model.layers.{4..8}.mlp.down_proj``.
ALPHAEDIT_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-xl": dict({k: v for k, v in MEMIT_PRESETS["gpt2-xl"].items() if k != "mom2_update_weight"}, **_NULL),
    "EleutherAI/gpt-j-6B": dict({k: v for k, v in MEMIT_PRESETS["EleutherAI/gpt-j-6B"].items()
                                 if k != "mom2_update_weight"}, **_NULL),
    "meta-llama/Meta-Llama-3-8B": _LLAMA3,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3,
}


@dataclass(frozen=True)
class AlphaEditConfig(MassEditConfig):
    """Hyperparameters of AlphaEdit (Fang et al., ICLR 2025: null-space constrained knowledge editing), with the
    reference implementation's names.  Everything but the closed form is MEMIT's (see
    :class:`~hf_edit.MEMITConfig`); ``mom2_update_weight`` of the reference's files is accepted and ignored (it
    does not enter AlphaEdit's update).

    The hyperparameter defaults are the reference's GPT-2 XL values; only the layer window is hf_edit's for
    models without a preset (:func:`~hf_edit.methods.memit.config.default_layer_window`);
    the presets and ``AlphaEditConfig.from_json(reference file)`` give the
    reference's values.

    Args:
        nullspace_threshold: the projector P spans the eigenvectors of C = E[kkᵀ] (unscaled) whose eigenvalue is
            below this absolute threshold; updates are confined to that span, so keys in the span of the other
            eigenvectors (what the statistics' texts use) are left unchanged.
        L2: α > 0, the ridge of the solve: ΔW = R Kᵀ P (K Kᵀ P + K_p K_pᵀ P + αI)⁻¹, K_p the keys of earlier
            AlphaEdit batches.
    """

    method: ClassVar[str] = "alphaedit"
    label: ClassVar[str] = "AlphaEdit"
    description: ClassVar[str] = (
        "AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the preserved keys' "
        "second moment, with earlier edits' keys preserved; one rank-n LoRA factor pair per layer and batch.")
    presets: ClassVar[dict[str, dict[str, Any]]] = ALPHAEDIT_PRESETS
    reference_only_keys: ClassVar[frozenset[str]] = REFERENCE_ONLY_KEYS | {"mom2_update_weight"}

    nullspace_threshold: float = 2e-2
    L2: float = 10.0

    def validate(self) -> None:
        super().validate()
        if not _finite(self.nullspace_threshold) or not self.nullspace_threshold > 0:
            raise ConfigError(f"nullspace_threshold must be a positive number, got {self.nullspace_threshold!r}.")
        if not _finite(self.L2) or not self.L2 > 0:
            raise ConfigError(f"L2 (α) must be a positive number, got {self.L2!r}.")
