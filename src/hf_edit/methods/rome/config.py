"""ROME's hyperparameters: :class:`ROMEConfig` and the reference's shipped presets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from ...errors import ConfigError
from ..base import EditConfig

__all__ = ["ROMEConfig", "ROME_PRESETS", "GUARD_MAX_RELATIVE_NORM", "GUARD_MIN_KEY_ALIGNMENT",
           "GUARD_MAX_KL", "GUARD_PROMPTS", "DEFAULT_MOM2_N_SAMPLES", "FAST_TEMPLATE_LENGTH_PARAMS"]

FactToken = Literal["subject_first", "subject_last", "subject_first_after_last", "last"]
KeyMode = Literal["original", "consistent"]

#: Reference hyperparameter keys that configure module paths hf_edit finds by itself; accepted and ignored.
_REFERENCE_ONLY_KEYS = frozenset({"layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module",
                        "mom2_update_weight", "stats_dir"})


#: Defaults of the disabling-edit guard, chosen from the first 50 sequential edits on cf-facts-gpt2 in both key
#: modes (benchmarks/long_run.py, README): the consistent mode (alignment 1 by construction) had no ‖ΔW‖/‖W‖ above
#: 1.9 and no KL above 0.1; the original mode's exploding updates (‖ΔW‖/‖W‖ 7–19) had alignments below 0.26.
GUARD_MAX_RELATIVE_NORM = 10.0
GUARD_MIN_KEY_ALIGNMENT = 0.2
GUARD_MAX_KL = 0.5
GUARD_PROMPTS = ("The weather today is", "My favourite food is", "He opened the door and", "The number after nine is")


#: The fast mode's context templates (:meth:`ROMEConfig.fast`): 5 of 5 tokens and 5 of 10 (the reference: 10 + 10).
FAST_TEMPLATE_LENGTH_PARAMS: tuple[tuple[int, int], ...] = ((5, 5), (10, 5))


#: Shipped hyperparameters of the reference (kmeng01/rome ``hparams/ROME``; NeoX-20B from kmeng01/memit).
ROME_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-medium": dict(layers=(8,), clamp_norm_factor=3.0, v_loss_layer=23, mom2_n_samples=100_000),
    "gpt2-large": dict(layers=(12,), clamp_norm_factor=4.0, v_loss_layer=35, mom2_n_samples=100_000),
    "gpt2-xl": dict(layers=(17,), clamp_norm_factor=4.0, v_loss_layer=47, mom2_n_samples=100_000),
    "EleutherAI/gpt-j-6B": dict(layers=(5,), clamp_norm_factor=4.0, v_loss_layer=27, mom2_n_samples=100_000),
    "EleutherAI/gpt-neox-20b": dict(layers=(15,), clamp_norm_factor=4.0, v_loss_layer=43, mom2_n_samples=100_000),
}

#: Texts sampled for C when no preset says otherwise: 1 % of the reference's 100,000 articles.  On the fact model
#: (``benchmarks/results/stats_quality.md``) 300–1,000 texts already give ES/PS/NS within ~1 point of all the text
#: and C⁻¹k within cos 0.98 of it; prior work reports that under 0.3 % of the reference's sample suffices.
DEFAULT_MOM2_N_SAMPLES = 1_000


@dataclass(frozen=True)
class ROMEConfig(EditConfig):
    """Hyperparameters of ROME, with the reference implementation's names and defaults.

    Args:
        layers: decoder layer(s) to edit (0-based). ``None``: the preset for the model id, else
            ``num_hidden_layers // 3`` (which equals the shipped choice for gpt2-medium/large and is within one
            layer for gpt2-xl).
        fact_token: which token of the subject carries the key: ``"subject_last"`` (reference default),
            ``"subject_first"``, ``"subject_first_after_last"`` or ``"last"`` (last token of the prompt).
        v_num_grad_steps: maximum forward passes of the v* optimisation (at most this minus one Adam steps).
        v_lr: Adam learning rate for δ.
        v_loss_layer: unused by ROME (kept so the reference's files load).
        v_weight_decay: weight of ‖δ‖ / ‖v_init‖² in the loss (the norm, not its square, as the reference).
        clamp_norm_factor: after every step ‖δ‖ is clamped to ``clamp_norm_factor · ‖v_init‖``.
        kl_factor: weight of KL(P_δ ‖ P_0) at the subject's last token of ``"<subject> is a"``.
        early_stop_loss: stop once the total loss is below this (hard-coded 5e-2 in the reference).
        mom2_adjustment: use u = C⁻¹k̄ (True, all shipped configs) or u = k̄.
        mom2_dataset: texts for C: a Hub dataset id (``"id"`` or ``"id:config"``; ``"wikipedia"`` means English
            Wikipedia), a local text file or folder, or a ``datasets.Dataset`` with a ``text`` column.
        mom2_n_samples: number of **texts** sampled for C (reference and presets: 100,000 articles; default
            without a preset: 1,000, see :data:`DEFAULT_MOM2_N_SAMPLES`).
        mom2_dtype: accumulation and solve precision: ``"float64"`` (hf_edit default, Cholesky solve) or
            ``"float32"`` (the reference's choice, explicit float32 inverse; use for parity).
        mom2_max_length: truncation of each text (default: the model's maximum length).
        mom2_damping: optional ridge λ: C + λ·(tr C / I)·I. 0 (off) as the reference.
        context_template_length_params: ``[[length, n], ...]`` of sampled templates (length counts the start
            token).
        context_templates: explicit templates (each with one ``{}``), used instead of sampling; ``"{}"`` is
            prepended if missing.
        context_template_top_k: top-k of the template sampler.
        v_batch_size: independent requests whose v* are optimised together when their edits are computed alone
            (:meth:`EditedModel.preview_edits`, the single evaluation protocol); ``None``: all of them.  Default 1,
            one at a time: on a 2-core CPU the batched optimisation was slower (``benchmarks/bench_single.py``,
            16 cases: 0.65 against 1.03 cases/s); it is meant for accelerators.
        seed: seed of the template sampler.
        key_mode: ``"original"`` (reference: W′k_cur + b = v*) or ``"consistent"`` (r-ROME: W′k̄ + b = v*).
        rewrite_module_tmp: explicit module path with ``{}`` for the layer (e.g.
            ``"transformer.h.{}.mlp.c_proj"``); default: found by architecture discovery.
        guard: check every update before it is applied and raise :class:`~hf_edit.errors.DisablingEditError`
            (nothing applied) if it exceeds one of the thresholds below (``None`` switches a check off).  The
            measurements are recorded in each edit's ``info`` whether or not the guard is on.
        guard_max_relative_norm: the largest ‖ΔW‖_F / ‖W‖_F allowed.
        guard_min_key_alignment: the smallest cosine, in the C⁻¹ metric, between the key the update is solved for
            (k_cur in the original key mode) and the template-averaged key k̄ that defines u.  Near 0, k_cur·u
            vanishes and the update explodes: the "disabling edit" of sequential ROME.  Always 1 in the
            consistent key mode.
        guard_max_kl: the largest mean KL(P_before ‖ P_after) of the next-token distribution at the end of the
            ``guard_prompts`` (unrelated text), in nats.
        guard_prompts: the unrelated prompts of the KL check.
    """

    method: ClassVar[str] = "rome"
    label: ClassVar[str] = "ROME"
    description: ClassVar[str] = (
        "ROME (Meng et al., NeurIPS 2022): one rank-one update of an MLP output projection per fact, stored as "
        "a rank-one LoRA factor pair (A = key direction u, B = value column rv).")
    presets: ClassVar[dict[str, dict[str, Any]]] = ROME_PRESETS
    reference_only_keys: ClassVar[frozenset[str]] = _REFERENCE_ONLY_KEYS

    fact_token: FactToken = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    mom2_adjustment: bool = True
    mom2_dataset: Any = "wikipedia"
    mom2_n_samples: int = DEFAULT_MOM2_N_SAMPLES
    mom2_dtype: Literal["float32", "float64"] = "float64"
    mom2_max_length: int | None = None
    mom2_damping: float = 0.0
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    context_templates: tuple[str, ...] | None = None
    context_template_top_k: int = 5
    v_batch_size: int | None = 1
    seed: int = 0
    key_mode: KeyMode = "original"
    guard: bool = True
    guard_max_relative_norm: float | None = GUARD_MAX_RELATIVE_NORM
    guard_min_key_alignment: float | None = GUARD_MIN_KEY_ALIGNMENT
    guard_max_kl: float | None = GUARD_MAX_KL
    guard_prompts: tuple[str, ...] = GUARD_PROMPTS

    def __post_init__(self) -> None:
        as_tuple = lambda x: tuple(x) if x is not None and not isinstance(x, str) else x  # noqa: E731
        object.__setattr__(self, "context_template_length_params",
                           tuple(tuple(p) for p in self.context_template_length_params))
        object.__setattr__(self, "context_templates", as_tuple(self.context_templates))
        object.__setattr__(self, "guard_prompts", as_tuple(self.guard_prompts) or ())
        super().__post_init__()

    def validate(self) -> None:
        if self.key_mode not in ("original", "consistent"):
            raise ConfigError(f"key_mode must be 'original' or 'consistent', got {self.key_mode!r}.")
        if self.fact_token not in ("subject_first", "subject_last", "subject_first_after_last", "last"):
            raise ConfigError(f"Unknown fact_token {self.fact_token!r}.")
        if self.mom2_dtype not in ("float32", "float64"):
            raise ConfigError(f"mom2_dtype must be 'float32' or 'float64', got {self.mom2_dtype!r}.")
        if self.v_batch_size is not None and not (isinstance(self.v_batch_size, int) and self.v_batch_size >= 1):
            raise ConfigError(f"v_batch_size must be a positive integer or None, got {self.v_batch_size!r}.")
        if self.v_num_grad_steps < 1:
            raise ConfigError("v_num_grad_steps must be at least 1.")
        for name in ("v_lr", "clamp_norm_factor", "mom2_n_samples"):
            if not getattr(self, name) > 0:  # written so that NaN fails too
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("kl_factor", "v_weight_decay", "mom2_damping"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}.")
        for name in ("guard_max_relative_norm", "guard_min_key_alignment", "guard_max_kl"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"{name} must be non-negative or None, got {value}.")
        if self.guard and self.guard_max_kl is not None and not self.guard_prompts:
            raise ConfigError("guard_max_kl needs guard_prompts (unrelated prompts to measure the KL on).")

    def fast(self) -> ROMEConfig:
        """This config with the fast mode's cheaper v*: 10 sampled context templates (5 of 5 tokens, 5 of 10) instead
        of the reference's 20 (so 11 rewriting rows with the bare prompt instead of 21) and the same optimiser; every
        other value (layer, statistics, clamp, key mode) is kept.  ``ROMEConfig.preset("gpt2-xl").fast()``.

        Chosen on the CounterFact fact model (``benchmarks/bench_fast_rome.py``, 200 cases, README): ES/PS/NS within
        1.1 points of the default, where 3 templates of 5 tokens lost 7 points of PS.
        """
        return replace(self, context_template_length_params=FAST_TEMPLATE_LENGTH_PARAMS, context_templates=None)
