"""EMMET's hyperparameters: :class:`EMMETConfig` and the reference's shipped presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import ConfigError
from ..memit.config import MassEditConfig, _finite

__all__ = ["EMMET_PRESETS", "EMMETConfig"]

_COMMON = dict(fact_token="subject_last", v_lr=0.5, kl_factor=0.0625, emmet_lambda=0.1, update_norm_lambda=0.0)

#: Shipped hyperparameters of the reference (scalable-model-editing/unified-model-editing ``hparams/EMMET``).
EMMET_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-xl": dict(_COMMON, layers=(17,), mom2_update_weight=1000.0, clamp_norm_factor=0.75, v_num_grad_steps=20,
                    v_loss_layer=47, v_weight_decay=0.5),
    "EleutherAI/gpt-j-6B": dict(_COMMON, layers=(5,), mom2_update_weight=1.0, clamp_norm_factor=0.75,
                                v_num_grad_steps=25, v_loss_layer=27, v_weight_decay=0.5),
    "meta-llama/Llama-2-7b-hf": dict(_COMMON, layers=(5,), mom2_update_weight=1.0, clamp_norm_factor=4.0,
                                     v_num_grad_steps=25, v_loss_layer=31, v_weight_decay=1e-3),
}


@dataclass(frozen=True)
class EMMETConfig(MassEditConfig):
    """Hyperparameters of EMMET (Gupta et al., 2024: equality-constrained mass model editing), with the reference
    implementation's names.  Everything but the closed form is MEMIT's (see :class:`~hf_edit.MEMITConfig`).

    The hyperparameter defaults are the reference's GPT-2 XL values; only the layer window is hf_edit's for
    models without a preset (:func:`~hf_edit.methods.memit.config.default_layer_window`);
    the presets and ``EMMETConfig.from_json(reference file)`` give the reference's
    values.

    Args:
        mom2_update_weight: λ_C, the scale of C in C' = λ_C C + μI.  Without the ridge (λ_E = 0) the update does not
            depend on it; with the ridge, EMMET(λ_C, λ_E) equals unscaled EMMET with ridge λ_C·λ_E.
        emmet_lambda: λ_E ≥ 0, the ridge added to D = KᵀC'⁻¹K when the batch has more than one key (0: the exact
            equality-constrained solution, ΔW K = R).
        update_norm_lambda: μ ≥ 0 added to the diagonal of C' (0 in every reference file).
    """

    method: ClassVar[str] = "emmet"
    label: ClassVar[str] = "EMMET"
    description: ClassVar[str] = (
        "EMMET (Gupta et al., 2024): MEMIT's batched editing with the memorisation written as an equality "
        "constraint, ΔW = R (KᵀC⁻¹K + λI)⁻¹ KᵀC⁻¹; one rank-n LoRA factor pair per layer.")
    presets: ClassVar[dict[str, dict[str, Any]]] = EMMET_PRESETS

    mom2_update_weight: float = 1000.0
    emmet_lambda: float = 0.1
    update_norm_lambda: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not _finite(self.mom2_update_weight) or not self.mom2_update_weight > 0:
            raise ConfigError(f"mom2_update_weight (λ_C) must be a positive number, got {self.mom2_update_weight!r}.")
        for name in ("emmet_lambda", "update_norm_lambda"):
            if not _finite(getattr(self, name)) or not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be a non-negative number, got {getattr(self, name)!r}.")
