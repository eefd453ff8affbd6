"""Hyperparameters of the MEMIT family: :class:`MassEditConfig` (what MEMIT, EMMET and AlphaEdit share) and
:class:`MEMITConfig` with the reference's shipped presets."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from ...architecture import num_layers, unwrap_model
from ...errors import ConfigError
from ..base import EditConfig
from .templates import normalise_grouped_templates

__all__ = [
    "MEMIT_PRESETS",
    "MEMIT_SEED_WORDS",
    "REFERENCE_ONLY_KEYS",
    "MEMITConfig",
    "MassEditConfig",
    "default_layer_window",
]

FactToken = Literal["subject_first", "subject_last", "subject_first_after_last", "last"]
Precision = Literal["float32", "float64"]
DuplicatePolicy = Literal["merge", "separate", "error"]

#: Keys of the reference hyperparameter files that name modules hf_edit finds by itself, or switch diagnostics
#: hf_edit does not compute; accepted by ``from_dict``/``from_json`` and ignored.
REFERENCE_ONLY_KEYS = frozenset({"model_name", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
                                 "lm_head_module", "stats_dir", "calculate_objective_value", "prob_cutoff",
                                 "norm_control"})

#: The words MEMIT's context templates are generated from (``memit/compute_z.py::get_context_templates``).
MEMIT_SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


def default_layer_window(n_layers: int) -> tuple[int, ...]:
    """The layers MEMIT, EMMET and AlphaEdit edit on a model with no preset: ``0 … n_layers // 3``.

    How it was chosen (benchmarks/bench_memit.py on cf-facts-gpt2, README of the benchmark): the window must end
    where causal tracing puts factual recall at the subject's last token (``n // 3``, ROME's default layer, which is
    layer 17 of 48 in GPT-2 XL and the end of MEMIT's 13–17 window), and on a small model the facts sit in the first
    MLPs (cf-facts-gpt2's MLP trace peaks at layer 0), so the window starts at layer 0 for models of up to 15 layers.
    For deeper models it is the reference's width: the last ``max(1, round(n / 10))`` layers up to ``n // 3`` (5 of
    48 for GPT-2 XL: 12–16, next to the shipped 13–17; 3 of 28 for GPT-J: 7–9 against the shipped 3–8).
    """
    if n_layers < 1:
        raise ConfigError(f"A model needs at least one layer, got {n_layers}.")
    end = n_layers // 3
    width = end + 1 if n_layers <= 15 else max(1, round(n_layers / 10))
    return tuple(range(max(0, end - width + 1), end + 1))


def _as_length_params(value: Any) -> tuple[tuple[int, int], ...]:
    try:
        params = tuple((int(length), int(n)) for length, n in value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"context_template_length_params must be [[length, n], ...], got {value!r}.") from err
    return params


@dataclass(frozen=True)
class MassEditConfig(EditConfig):
    """Hyperparameters every method of the MEMIT family shares (keys, target values z, layer loop, statistics).

    Not registered itself: :class:`MEMITConfig`, :class:`~hf_edit.methods.emmet.EMMETConfig` and
    :class:`~hf_edit.methods.alphaedit.AlphaEditConfig` add the closed form's own hyperparameters.

    Args:
        layers: decoder layers whose MLP output projection is edited (0-based).  z is optimised at the output of
            the last one's decoder block.  ``None``: the preset for the model id, else :func:`default_layer_window`.
        layer_selection: kept so that the reference's files load; unused (as in the reference).
        fact_token: the token whose key is edited: ``"subject_last"`` (the reference), ``"subject_first"``,
            ``"subject_first_after_last"`` or ``"last"`` (the prompt's last token).
        v_num_grad_steps: forward passes of the z optimisation per request (at most this minus one Adam steps).
        v_lr: Adam learning rate of δ.
        v_loss_layer: the layer whose output the target NLL is read from (through the final norm and the LM head);
            ``max(v_loss_layer, last edited layer)`` is used.  ``None``: the last layer (every shipped config).
        v_weight_decay: weight of ‖δ‖ / ‖h‖² in the z loss (the norm, not its square, as the reference).
        clamp_norm_factor: after every Adam step ‖δ‖ is clamped to ``clamp_norm_factor · ‖h‖``, h the block output
            at the subject's last token of the bare prompt.
        kl_factor: weight of KL(P_δ ‖ P_0) of the next-token distribution after the subject in "<subject> is a".
        early_stop_loss: a request's z optimisation stops once its loss is below this (5e-2 in the reference).
        z_batch_size: requests whose z are optimised together in one batched forward pass (``None``: all of the
            batch at once).  Every request keeps its own δ, clamp and early stop, so this only trades memory for
            speed.
        mom2_adjustment: kept so that the reference's files load; unused (as in the reference).
        mom2_dataset: texts for the second moment C: a Hub dataset id (``"wikipedia"`` means English Wikipedia),
            a local text file or folder, or a ``datasets.Dataset`` with a ``text`` column.
        mom2_n_samples: number of texts sampled for C (reference: 100,000 articles).
        mom2_dtype: accumulation precision of C.  ``"float64"`` (hf_edit default): the closed forms are solved in
            their low-rank forms through a cached Cholesky factor of C (n × n systems, exact to float64 rounding).
            ``"float32"`` (the reference's files): the reference's numerics, i.e. the dense d_ff × d_ff systems
            solved as the reference solves them, in ``solve_dtype``.
        mom2_max_length: truncation of each text for C (default: the model's maximum length).
        solve_dtype: precision of the closed-form solve: ``"float64"`` (default; MEMIT's and EMMET's reference) or
            ``"float32"`` (AlphaEdit's reference; use with ``mom2_dtype="float32"`` for parity).
        context_templates: explicit templates, in the reference's grouped form (``[["{}"], ["A. {}", ...]]``) or
            flat (``["{}", "A. {}", ...]``, read as ``[["{}"], [the others]]``).  Keys average within each group, then
            over the groups; z uses every template once.
        context_template_length_params: ``[[length, n], ...]`` of sampled templates (MEMIT: ``[[10, 5]]``; the
            length counts the seed word's tokens).
        context_template_seeds: words each sampled template starts from (MEMIT's "The", "Therefore", "Because",
            "I", "You"; ``n`` templates of each length are shared out among them).  ``None``: sample from the
            tokenizer's BOS/EOS token as ROME does (:func:`hf_edit.templates.sample_context_templates`).
        context_template_top_k: top-k of the template sampler.
        seed: seed of the template sampler.
        prompt_preservation: μ ≥ 0, hf_edit's extension (0 = the reference): the keys of every other token of each
            request's own prompt (the subject's other tokens, the prompt's other words) are added to the preserved
            keys, weighted by μ (λC + μ K_o K_oᵀ in MEMIT; likewise in EMMET's C and AlphaEdit's cache term), so
            that the update moves only the fact token's hidden state and leaves the rest of the prompt as it was.
            On cf-facts-gpt2 with clamp 4 and λ 200 (``benchmarks/results/memit_quality.md``) μ = 1 raised ES from
            43.5 to 62.5 and NS from 79.8 to 85.0 on 200 cases edited in one call; off by default.
        duplicate_subjects: requests of one batch whose keys are identical (same subject after the same prompt
            prefix): ``"merge"`` (MEMIT-Merge: one key column and one z optimised for the union of their prompts
            and targets; the default), ``"separate"`` (the reference: one column each, so the solve averages their
            residuals) or ``"error"``.  Requests with the same prompt and subject but different targets are
            always an error.
        rewrite_module_tmp: module path with ``{}`` for the layer; default: the MLP output projection found by
            architecture discovery.
    """

    reference_only_keys: ClassVar[frozenset[str]] = REFERENCE_ONLY_KEYS

    layer_selection: Literal["all", "random"] = "all"
    fact_token: FactToken = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    z_batch_size: int | None = 32
    mom2_adjustment: bool = True
    mom2_dataset: Any = "wikipedia"
    mom2_n_samples: int = 100_000
    mom2_dtype: Precision = "float64"
    mom2_max_length: int | None = None
    solve_dtype: Precision = "float64"
    context_templates: tuple[tuple[str, ...], ...] | tuple[str, ...] | None = None  # stored grouped
    context_template_length_params: tuple[tuple[int, int], ...] = ((10, 5),)
    context_template_seeds: tuple[str, ...] | None = MEMIT_SEED_WORDS
    context_template_top_k: int = 5
    seed: int = 0
    prompt_preservation: float = 0.0
    duplicate_subjects: DuplicatePolicy = "merge"

    def __post_init__(self) -> None:
        if self.context_templates is not None:
            object.__setattr__(self, "context_templates", normalise_grouped_templates(self.context_templates))
        object.__setattr__(self, "context_template_length_params",
                           _as_length_params(self.context_template_length_params))
        if self.context_template_seeds is not None:
            seeds = self.context_template_seeds
            if isinstance(seeds, str) or not isinstance(seeds, Sequence):
                raise ConfigError(f"context_template_seeds must be a list of words or None, got {seeds!r}.")
            object.__setattr__(self, "context_template_seeds", tuple(seeds))
        super().__post_init__()

    def validate(self) -> None:
        if self.fact_token not in ("subject_first", "subject_last", "subject_first_after_last", "last"):
            raise ConfigError(f"Unknown fact_token {self.fact_token!r}.")
        if self.layer_selection not in ("all", "random"):
            raise ConfigError(f"layer_selection must be 'all' or 'random', got {self.layer_selection!r}.")
        for name in ("mom2_dtype", "solve_dtype"):
            if getattr(self, name) not in ("float32", "float64"):
                raise ConfigError(f"{name} must be 'float32' or 'float64', got {getattr(self, name)!r}.")
        if self.duplicate_subjects not in ("merge", "separate", "error"):
            raise ConfigError(f"duplicate_subjects must be 'merge', 'separate' or 'error', got "
                              f"{self.duplicate_subjects!r}.")
        for name in ("v_num_grad_steps", "mom2_n_samples", "context_template_top_k"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Integral) and value >= 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.z_batch_size is not None and not (isinstance(self.z_batch_size, numbers.Integral)
                                                  and self.z_batch_size >= 1):
            raise ConfigError(f"z_batch_size must be a positive integer or None, got {self.z_batch_size!r}.")
        for name in ("v_lr", "clamp_norm_factor"):
            if not _finite(getattr(self, name)) or not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)!r}.")
        for name in ("kl_factor", "v_weight_decay", "early_stop_loss", "prompt_preservation"):
            if not _finite(getattr(self, name)) or not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be a non-negative number, got {getattr(self, name)!r}.")
        for length, n in self.context_template_length_params:
            if length < 1 or n < 0:
                raise ConfigError(f"Invalid context_template_length_params entry {[length, n]}.")
        seeds = self.context_template_seeds
        if seeds is not None and not (seeds and all(isinstance(s, str) and s.strip() for s in seeds)):
            raise ConfigError("context_template_seeds must be non-empty words (or None to sample from BOS).")

    def default_layers(self, model: nn.Module) -> tuple[int, ...]:
        """:func:`default_layer_window` of the model's layer count."""
        return default_layer_window(num_layers(unwrap_model(model)))


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


_GPT2_XL = dict(layers=(13, 14, 15, 16, 17), fact_token="subject_last", v_num_grad_steps=20, v_lr=0.5,
                v_loss_layer=47, v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625)
_GPT_J = dict(layers=(3, 4, 5, 6, 7, 8), fact_token="subject_last", v_num_grad_steps=25, v_lr=0.5,
              v_loss_layer=27, v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625)

#: Shipped hyperparameters of the reference (kmeng01/memit ``hparams/MEMIT``).
MEMIT_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-xl": dict(_GPT2_XL, mom2_update_weight=20000.0),
    "EleutherAI/gpt-j-6B": dict(_GPT_J, mom2_update_weight=15000.0),
}


@dataclass(frozen=True)
class MEMITConfig(MassEditConfig):
    """Hyperparameters of MEMIT (Meng et al., ICLR 2023), with the reference implementation's names.

    The hyperparameter defaults are the reference's GPT-2 XL values; only the layer window is hf_edit's for
    models without a preset (:func:`~hf_edit.methods.memit.config.default_layer_window`);
    ``MEMITConfig.preset("gpt2-xl")`` and ``MEMITConfig.from_json(reference file)``
    give the reference's values.

    Args:
        mom2_update_weight: λ, the weight of the preserved keys' second moment: ΔW = R Kᵀ(λC + K Kᵀ)⁻¹.
    """

    method: ClassVar[str] = "memit"
    label: ClassVar[str] = "MEMIT"
    description: ClassVar[str] = (
        "MEMIT (Meng et al., ICLR 2023): many facts at once, spread over several MLP output projections; each "
        "layer's update is a rank-n LoRA factor pair (B = residuals, A = the solved keys).")
    presets: ClassVar[dict[str, dict[str, Any]]] = MEMIT_PRESETS

    mom2_update_weight: float = 20000.0

    def validate(self) -> None:
        super().validate()
        if not _finite(self.mom2_update_weight) or not self.mom2_update_weight > 0:
            raise ConfigError(f"mom2_update_weight (λ) must be a positive number, got {self.mom2_update_weight!r}.")
