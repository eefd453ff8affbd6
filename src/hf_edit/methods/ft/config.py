"""FT and FT+L hyperparameters: :class:`FTConfig` (``method="ft"``), :class:`FTLConfig` (``method="ft+l"``) and
the reference's shipped presets."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from torch import nn

from ...architecture import num_layers, unwrap_model
from ...errors import ConfigError
from ..base import EditConfig, match_preset, model_id_of

__all__ = ["FTConfig", "FTLConfig", "FT_PRESETS", "FTL_PRESETS", "DEFAULT_FTL_LAYER", "DEFAULT_FTL_EPSILON"]

logger = logging.getLogger(__name__)

FTLoss = Literal["prompt_last", "autoregressive"]

#: Reference hyperparameter keys naming modules that hf_edit finds by itself; accepted and ignored.
_REFERENCE_ONLY_KEYS = frozenset({"layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
                                  "lm_head_module"})

#: Layer of FT+L when neither ``layers`` nor a preset is given: every shipped FT+L config edits layer 0.
DEFAULT_FTL_LAYER = 0
#: ε of FT+L on a model without a preset (the gpt2-xl value).
DEFAULT_FTL_EPSILON = 5e-4


def _default_layer(n_layers: int, constrained: bool) -> int:
    """The documented default layer: 0 for FT+L (all shipped FT+L configs), ``n // 3`` for FT.

    The shipped unconstrained choices disagree (gpt2-xl: layer 1 of 48, GPT-J: 21 of 28), so for FT hf_edit
    uses the same rule as ROME's default, the early-middle MLP where causal tracing locates factual recall.
    """
    return DEFAULT_FTL_LAYER if constrained else n_layers // 3


def _parse_norm_constraint(value: Any, *, reference: bool) -> float | None:
    """``norm_constraint`` as ε or ``None``.

    ``None``/``False`` mean no constraint.  With ``reference=True`` (values from a reference JSON file) an
    integer or ``True`` also means no constraint, as in the reference's ``type(x) is float`` test, with a
    warning.
    """
    if value is None or value is False:
        return None
    if isinstance(value, numbers.Integral):  # includes True
        if reference:
            logger.warning(
                "norm_constraint=%r is not a float: the reference implementation treats it as "
                "'no constraint' (type(x) is float), and so does FTConfig.from_dict. Write %r for an "
                "L-infinity constraint.",
                value, float(value))
            return None
        raise ConfigError(
            f"norm_constraint must be a float ε > 0 (FT+L) or None/False (FT), got {type(value).__name__} "
            f"{value!r}. The reference ignores non-float values; write {float(value)!r} for a constraint or "
            "None for none.")
    if not isinstance(value, numbers.Real):
        raise ConfigError(f"norm_constraint must be a float ε > 0 or None, got {value!r}.")
    value = float(value)
    if not value > 0:  # written so that NaN fails too
        raise ConfigError(f"norm_constraint ε must be positive, got {value}. Use None for unconstrained FT.")
    return value


#: Shipped FT+L configs of the reference (kmeng01/rome ``hparams/FT/*_constr.json``): lr 5e-4, 25 epochs.
FTL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-medium": dict(layers=(0,), norm_constraint=2e-3),
    "gpt2-large": dict(layers=(0,), norm_constraint=1e-3),
    "gpt2-xl": dict(layers=(0,), norm_constraint=5e-4),
    "EleutherAI/gpt-j-6B": dict(layers=(0,), norm_constraint=5e-5),
}

#: Unconstrained FT (kmeng01/rome ``hparams/FT/*_unconstr.json``): lr 5e-4, 25 epochs.  The reference ships no
#: unconstrained file for gpt2-medium/large: hf_edit uses gpt2-xl's layer 1.  Scaled by depth (1 of 48 layers)
#: it rounds to layer 0 or 1 of 24/36; layer 1 is kept so that FT stays one block above FT+L's layer 0.
FT_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-medium": dict(layers=(1,)),
    "gpt2-large": dict(layers=(1,)),
    "gpt2-xl": dict(layers=(1,)),
    "EleutherAI/gpt-j-6B": dict(layers=(21,)),
}


@dataclass(frozen=True)
class FTConfig(EditConfig):
    """Hyperparameters of FT / FT+L, with the reference implementation's names and defaults.

    Args:
        layers: decoder layer(s) whose projection is trained (0-based; all jointly).  ``None``: the preset for
            the model id (``model.config.name_or_path``) if there is one, else layer 0 for FT+L
            (``norm_constraint`` set; every shipped FT+L config) and ``num_hidden_layers // 3`` for FT (as
            ROME's default).
        rewrite_module_tmp: module path with ``{}`` for the layer (e.g. ``"transformer.h.{}.attn.c_attn"``);
            any ``nn.Linear`` or ``Conv1D``.  Default: the MLP output projection found by architecture
            discovery.
        lr: Adam learning rate.
        num_steps: number of epochs over the requests.
        batch_size: requests per optimiser step (chunks, in order).
        norm_constraint: ε of FT+L: after every chunk each trained tensor is clamped element-wise to
            [w₀ − ε, w₀ + ε].  ``None`` or ``False``: unconstrained FT.  Must be a float > 0;
            :meth:`from_dict` follows the reference and treats an integer as "no constraint" (with a warning).
        weight_decay: Adam's (coupled, L2) weight decay.
        loss: ``"prompt_last"`` (reference: every target token scored at the prompt's last position) or
            ``"autoregressive"`` (hf_edit's option, not the paper's: teacher-forced next-token NLL over the
            target).
        early_stop_loss: skip the step of a chunk whose loss is below this; stop after an epoch whose mean
            loss is below it (hard-coded 1e-2 in the reference).
        kl_factor: present in the reference's files but unused there; must be 0.
    """

    method: ClassVar[str] = "ft"
    label: ClassVar[str] = "FT"
    description: ClassVar[str] = (
        "FT: fine-tuning of the weight and bias of one MLP projection on the requests (trained jointly), stored as a "
        "dense full-rank LoRA (B = identity, A = ΔW, lora_B.bias = Δb).")
    presets: ClassVar[dict[str, dict[str, Any]]] = FT_PRESETS
    reference_only_keys: ClassVar[frozenset[str]] = _REFERENCE_ONLY_KEYS


    lr: float = 5e-4
    num_steps: int = 25
    batch_size: int = 128
    norm_constraint: float | None = None
    weight_decay: float = 0.0
    loss: FTLoss = "prompt_last"
    early_stop_loss: float = 1e-2
    kl_factor: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm_constraint", _parse_norm_constraint(self.norm_constraint, reference=False))
        super().__post_init__()

    def validate(self) -> None:
        if self.loss not in ("prompt_last", "autoregressive"):
            raise ConfigError(f"loss must be 'prompt_last' or 'autoregressive', got {self.loss!r}.")
        for name in ("num_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if not (isinstance(self.lr, numbers.Real) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}.")
        if not (isinstance(self.weight_decay, numbers.Real) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be non-negative, got {self.weight_decay!r}.")
        if not isinstance(self.early_stop_loss, numbers.Real) or math.isnan(self.early_stop_loss):
            raise ConfigError(f"early_stop_loss must be a number, got {self.early_stop_loss!r}.")
        if self.kl_factor != 0:
            raise ConfigError(f"kl_factor={self.kl_factor!r}: the reference's FT has no KL term; only 0 "
                              "is accepted (the key exists so that the reference's files load).")

    @property
    def constrained(self) -> bool:
        """``True`` for FT+L (an ε is set)."""
        return self.norm_constraint is not None

    @property
    def name(self) -> str:
        """``"ft+l"`` when an ε is set, else ``"ft"``."""
        return FTLConfig.method if self.constrained else FTConfig.method

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FTConfig:
        """Build from a dict, e.g. the reference's ``hparams/FT/*.json`` (its module-path keys other than
        ``rewrite_module_tmp`` are ignored; ``wd_power_law`` of kmeng01/memit is not supported; an integer
        ``norm_constraint`` means "no constraint", as in the reference, with a warning)."""
        values = dict(values)
        if "wd_power_law" in values:
            raise ConfigError(
                "wd_power_law (kmeng01/memit's GPT-J_wd: weight decay scaled with the number of edits) is "
                "not supported; set weight_decay explicitly instead.")
        if "norm_constraint" in values:
            values["norm_constraint"] = _parse_norm_constraint(values["norm_constraint"], reference=True)
        return super().from_dict(values)

    def resolved_for(self, model: nn.Module) -> FTConfig:
        """This config with ``layers`` filled in: the FT (or, with an ε, FT+L) preset for the model's id, else
        layer 0 with an ε and ``num_hidden_layers // 3`` without."""
        if self.layers is not None and self.layers != "auto":
            return self
        if self.layers == "auto":
            return super().resolved_for(model)  # explains how "auto" is resolved
        preset = match_preset(FTL_PRESETS if self.constrained else FT_PRESETS, model_id_of(model))
        if preset is not None:
            return replace(self, layers=tuple(preset["layers"]))
        return replace(self, layers=(_default_layer(num_layers(unwrap_model(model)), self.constrained),))


@dataclass(frozen=True)
class FTLConfig(FTConfig):
    """FT+L: :class:`FTConfig` with the L∞ constraint required (default ε = 5e-4, the gpt2-xl value, and layer 0,
    as every shipped FT+L config), and the reference's FT+L presets."""

    method: ClassVar[str] = "ft+l"
    label: ClassVar[str] = "FT+L"
    description: ClassVar[str] = (
        "FT+L: FT with an L∞ constraint (every weight and bias element stays within ε of its original value), "
        "stored as a dense full-rank LoRA.")
    presets: ClassVar[dict[str, dict[str, Any]]] = FTL_PRESETS

    norm_constraint: float | None = DEFAULT_FTL_EPSILON

    def validate(self) -> None:
        super().validate()
        if self.norm_constraint is None:
            raise ConfigError("FT+L needs an ε (norm_constraint > 0); use method 'ft' for unconstrained FT.")
