"""ROME: rank-one model editing (Meng et al., NeurIPS 2022), as the reference implementation computes it.

For a request (prompt, subject, target) at layer L, with W the MLP output projection and C = E[kkᵀ] its input's
second moment:

1. **Key** k̄: the projection's input at the subject's last token, averaged over the prompt placed after each
   context template (row 0 is the bare prompt).  u = C⁻¹k̄ / ‖C⁻¹k̄‖.
2. **Value** v* = v_init + δ: δ is added to the projection's output at the subject's last token and optimised with
   Adam so that the model predicts the target after every templated prompt (NLL), while the distribution after
   "<subject> is a" stays close to the original one (KL) and ‖δ‖ stays small (weight decay, norm clamp).
3. **Update** ΔW = rv uᵀ with rv = (v* − W k − b) / (k · u), so that W′k + b = v*.  ``key_mode="original"`` uses
   the reference's k = k_cur (bare-prompt key; reproduces published numbers), ``key_mode="consistent"`` uses
   k = k̄ (r-ROME, Gupta et al. 2024), which avoids the "disabling edits" of the original asymmetry.

The update is returned as factors (u, rv): hf_edit stores it as a rank-one LoRA with A = u, B = rv.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..architecture import EditTarget, base_layer, find_layout, num_layers, resolve_target, unwrap_model
from ..errors import (
    ConfigError,
    DisablingEditError,
    OptimizationError,
    StatisticsMismatchError,
    UnsupportedArchitectureError,
)
from ..hooks import add_at_positions, capture, frozen_eval, only_positions, replay_outputs
from ..requests import EditRequest
from ..stats import SecondMomentStats, load_or_compute_stats
from ..templates import BARE_TEMPLATE, normalise_templates, sample_context_templates
from ..tokens import Encoded, encode_with_subject, pad_batch, pad_token_id, target_ids

__all__ = ["ROMEConfig", "ROME_PRESETS", "RankOneUpdate", "ROMEEditor", "rome_preset_for"]

logger = logging.getLogger(__name__)

FactToken = Literal["subject_first", "subject_last", "subject_first_after_last", "last"]
KeyMode = Literal["original", "consistent"]

#: Reference hyperparameter keys that configure module paths hf_edit finds by itself; accepted and ignored.
_REFERENCE_ONLY_KEYS = {"layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module",
                        "mom2_update_weight", "stats_dir"}


#: Defaults of the disabling-edit guard, chosen from the first 50 sequential edits on cf-facts-gpt2 in both key
#: modes (benchmarks/long_run.py, README): the consistent mode (alignment 1 by construction) had no ‖ΔW‖/‖W‖ above
#: 1.9 and no KL above 0.1; the original mode's exploding updates (‖ΔW‖/‖W‖ 7–19) had alignments below 0.26.
GUARD_MAX_RELATIVE_NORM = 10.0
GUARD_MIN_KEY_ALIGNMENT = 0.2
GUARD_MAX_KL = 0.5
GUARD_PROMPTS = ("The weather today is", "My favourite food is", "He opened the door and", "The number after nine is")


@dataclass(frozen=True)
class ROMEConfig:
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
        mom2_n_samples: number of **texts** sampled for C (reference: 100,000 articles).
        mom2_dtype: accumulation and solve precision: ``"float64"`` (hf_edit default, Cholesky solve) or
            ``"float32"`` (the reference's choice, explicit float32 inverse; use for parity).
        mom2_max_length: truncation of each text (default: the model's maximum length).
        mom2_damping: optional ridge λ: C + λ·(tr C / I)·I. 0 (off) as the reference.
        context_template_length_params: ``[[length, n], ...]`` of sampled templates (length counts the start
            token).
        context_templates: explicit templates (each with one ``{}``), used instead of sampling; ``"{}"`` is
            prepended if missing.
        context_template_top_k: top-k of the template sampler.
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

    layers: tuple[int, ...] | None = None
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
    mom2_n_samples: int = 100_000
    mom2_dtype: Literal["float32", "float64"] = "float64"
    mom2_max_length: int | None = None
    mom2_damping: float = 0.0
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    context_templates: tuple[str, ...] | None = None
    context_template_top_k: int = 5
    seed: int = 0
    key_mode: KeyMode = "original"
    rewrite_module_tmp: str | None = None
    guard: bool = True
    guard_max_relative_norm: float | None = GUARD_MAX_RELATIVE_NORM
    guard_min_key_alignment: float | None = GUARD_MIN_KEY_ALIGNMENT
    guard_max_kl: float | None = GUARD_MAX_KL
    guard_prompts: tuple[str, ...] = GUARD_PROMPTS

    def __post_init__(self) -> None:
        as_tuple = lambda x: tuple(x) if x is not None and not isinstance(x, (str, int)) else x  # noqa: E731
        layers = (self.layers,) if isinstance(self.layers, int) else as_tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "context_template_length_params",
                           tuple(tuple(p) for p in self.context_template_length_params))
        object.__setattr__(self, "context_templates", as_tuple(self.context_templates))
        object.__setattr__(self, "guard_prompts", as_tuple(self.guard_prompts) or ())
        self._validate()

    def _validate(self) -> None:
        if self.key_mode not in ("original", "consistent"):
            raise ConfigError(f"key_mode must be 'original' or 'consistent', got {self.key_mode!r}.")
        if self.fact_token not in ("subject_first", "subject_last", "subject_first_after_last", "last"):
            raise ConfigError(f"Unknown fact_token {self.fact_token!r}.")
        if self.mom2_dtype not in ("float32", "float64"):
            raise ConfigError(f"mom2_dtype must be 'float32' or 'float64', got {self.mom2_dtype!r}.")
        if self.v_num_grad_steps < 1:
            raise ConfigError("v_num_grad_steps must be at least 1.")
        if self.layers is not None and len(self.layers) == 0:
            raise ConfigError("layers is empty.")
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

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ROMEConfig:
        """Build from a dict, e.g. the reference's ``hparams/ROME/*.json`` (its module-path keys are ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known - _REFERENCE_ONLY_KEYS
        if unknown:
            raise ConfigError(f"Unknown ROME hyperparameters: {sorted(unknown)}.")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> ROMEConfig:
        """Load a JSON hyperparameter file (hf_edit's or the reference's)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (a ``datasets.Dataset`` as ``mom2_dataset`` is recorded by fingerprint)."""
        values = asdict(self)
        if not isinstance(self.mom2_dataset, (str, type(None))):
            values["mom2_dataset"] = f"<{type(self.mom2_dataset).__name__} "\
                                     f"{getattr(self.mom2_dataset, '_fingerprint', '')}>"
        return json.loads(json.dumps(values))

    def resolved_for(self, model: nn.Module) -> ROMEConfig:
        """This config with ``layers`` filled in from the preset for the model, or the default rule."""
        if self.layers is not None:
            return self
        return replace(self, layers=(num_layers(unwrap_model(model)) // 3,))


#: Shipped hyperparameters of the reference (kmeng01/rome ``hparams/ROME``; NeoX-20B from kmeng01/memit).
ROME_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-medium": dict(layers=(8,), clamp_norm_factor=3.0, v_loss_layer=23),
    "gpt2-large": dict(layers=(12,), clamp_norm_factor=4.0, v_loss_layer=35),
    "gpt2-xl": dict(layers=(17,), clamp_norm_factor=4.0, v_loss_layer=47),
    "EleutherAI/gpt-j-6B": dict(layers=(5,), clamp_norm_factor=4.0, v_loss_layer=27),
    "EleutherAI/gpt-neox-20b": dict(layers=(15,), clamp_norm_factor=4.0, v_loss_layer=43),
}


def rome_preset_for(model_id: str | None) -> ROMEConfig:
    """The shipped ROME config for a model id (``"gpt2-xl"``, ``"openai-community/gpt2-xl"``, ...), else defaults."""
    if model_id:
        for name, values in ROME_PRESETS.items():
            if model_id == name or model_id.lower().endswith("/" + name.lower()) or model_id.lower() == name.lower():
                return ROMEConfig(**values)
    return ROMEConfig()


@dataclass
class RankOneUpdate:
    """A ROME update ΔW = v uᵀ (Linear orientation) of one module.

    Attributes:
        target: the edited module.
        u: unit key direction C⁻¹k̄ / ‖C⁻¹k̄‖, shape (in_features,), float32.
        v: the column rv, shape (out_features,), float32.
        key: the key k with W′k + b = v* (k_cur or k̄ by key_mode).
        value: v*.
        info: diagnostics (norms, k·u, steps, losses, clamp, templates, statistics fingerprint, timings).
    """

    target: EditTarget
    u: torch.Tensor
    v: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the module's own weight layout ((in, out) for Conv1D, (out, in) for Linear)."""
        outer = torch.outer(self.v, self.u)
        return outer.T if self.target.is_conv1d else outer


@dataclass
class _ValueBatch:
    """Inputs of the v* optimisation and where its loss reads the logits."""

    inputs: dict[str, torch.Tensor]
    shape: tuple[int, int]
    positions: torch.Tensor  # fact token of each row (the N rewriting rows, then the KL row)
    head_rows: torch.Tensor  # (row, position) pairs the LM head sees: every target position, then the KL token
    head_positions: torch.Tensor
    label_ids: torch.Tensor  # (N, T) target ids


def _position(encoded: Encoded, fact_token: str, prompt_length: int) -> int:
    if fact_token == "subject_last":
        return encoded.subject_last
    if fact_token == "subject_first":
        return encoded.subject_first
    if fact_token == "subject_first_after_last":
        return min(encoded.subject_last + 1, prompt_length - 1)
    return prompt_length - 1


class ROMEEditor:
    """Computes ROME updates for one model; owns the context templates and second-moment statistics.

    Templates are sampled once, from the base model, and reused for every edit this editor makes (as in the
    reference).  Statistics are taken from ``stats`` when given, else loaded from or computed into the on-disk
    cache, always on the base model.

    Args:
        model: the causal LM as edited so far (edits active), possibly with PEFT layers.
        tokenizer: its (fast) tokenizer.
        config: the ROME hyperparameters, with ``layers`` resolved.
        stats: explicit statistics: one :class:`SecondMomentStats`, or a mapping from layer index or module
            name to statistics.
        base_context: zero-argument callable giving a context manager under which ``model`` is the base model.
        progress: show progress bars when computing statistics.
        templates: context templates to reuse (e.g. those saved with earlier edits) instead of sampling.
        revision: the Hub revision the model was loaded from (part of the statistics cache key).
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: ROMEConfig, *,
                 stats: SecondMomentStats | Mapping[int | str, SecondMomentStats] | None = None,
                 base_context: Callable[[], AbstractContextManager] | None = None, progress: bool = True,
                 templates: list[str] | None = None, revision: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config.resolved_for(model)
        self.base_context = base_context or nullcontext
        self.progress = progress
        self._explicit_stats = stats
        self._stats: dict[str, SecondMomentStats] = {}
        self._templates = templates
        self.templates_prepended_bare = False
        self.revision = revision

    # -- templates and statistics -------------------------------------------------------------------------
    @property
    def templates(self) -> list[str]:
        """The context templates (row 0 is ``"{}"``), sampled on first use."""
        if self._templates is None:
            if self.config.context_templates is not None:
                self._templates, self.templates_prepended_bare = normalise_templates(self.config.context_templates)
            else:
                with self.base_context(), frozen_eval(self.model):
                    self._templates = sample_context_templates(
                        self.model, self.tokenizer, self.config.context_template_length_params,
                        top_k=self.config.context_template_top_k, seed=self.config.seed)
        return self._templates

    def stats_for(self, target: EditTarget) -> SecondMomentStats:
        """Second-moment statistics of ``target``'s input on the base model (explicit, cached or computed)."""
        if target.name not in self._stats:
            stats = self._explicit_stats_for(target)
            if stats is None:
                stats = load_or_compute_stats(
                    self.model, self.tokenizer, target, dataset=self.config.mom2_dataset,
                    n_samples=self.config.mom2_n_samples, dtype=self.config.mom2_dtype,
                    max_length=self.config.mom2_max_length, base_context=self.base_context,
                    progress=self.progress, model_revision=self.revision)
            stats.check_compatible(target)
            self._stats[target.name] = stats
        return self._stats[target.name]

    def _explicit_stats_for(self, target: EditTarget) -> SecondMomentStats | None:
        given = self._explicit_stats
        if given is None or isinstance(given, SecondMomentStats):
            return given
        for key in (target.name, target.layer):
            if key in given:
                return given[key]
        raise StatisticsMismatchError(
            f"Statistics were given for {sorted(map(str, given))} but not for {target.name} (layer {target.layer}).")

    # -- the edit -------------------------------------------------------------------------------------------
    def validate(self, request: EditRequest) -> None:
        """Fail fast, before any computation, if the request does not fit the tokenizer."""
        target_ids(self.tokenizer, request.target_new)
        self._encode(BARE_TEMPLATE, request)

    def targets(self) -> list[EditTarget]:
        """The modules this config edits, in ascending layer order."""
        return [resolve_target(self.model, layer, self.config.rewrite_module_tmp)
                for layer in sorted(self.config.layers)]

    def compute(self, request: EditRequest, target: EditTarget) -> RankOneUpdate:
        """Compute the rank-one update of ``target`` for ``request`` on the model as it is now.

        The model is not modified.

        Raises:
            SubjectNotFoundError, InvalidRequestError: the request does not fit the tokenizer.
            OptimizationError: NaN/inf in the optimisation or the update.
        """
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        templates = self.templates
        timings["templates"] = time.perf_counter() - clock
        module = unwrap_model(self.model).get_submodule(target.name)
        targets = target_ids(self.tokenizer, request.target_new)
        contexts = [self._encode(template, request) for template in templates]
        with frozen_eval(self.model):
            clock = time.perf_counter()
            keys, outputs = self._keys_and_outputs(module, contexts)
            k_mean = keys.mean(0)
            timings["key"] = time.perf_counter() - clock
            clock = time.perf_counter()
            v_star, v_init, opt_info = self._optimise_value(module, target, request, contexts, targets)
            timings["v_star"] = time.perf_counter() - clock
        clock = time.perf_counter()
        u = self._left_vector(target, k_mean)
        if self.config.key_mode == "original":
            key, current = keys[0], outputs[0]
        else:
            key, current = k_mean, outputs.mean(0)
        denominator = torch.dot(key, u)
        rv = (v_star - current) / denominator
        timings["solve"] = time.perf_counter() - clock
        if not (torch.isfinite(rv).all() and torch.isfinite(u).all()):
            raise OptimizationError(
                f"The ROME update for {request.subject!r} is not finite (k·u = {denominator.item():.3g}). Nothing "
                "was applied; check the statistics (more texts, or mom2_damping) and the request.")
        diagnostics = self._guard_diagnostics(module, target, u, rv, key, k_mean)
        if self.config.guard:
            self._check_guard(request, diagnostics)
        info = dict(opt_info, **diagnostics, key_mode=self.config.key_mode, k_dot_u=denominator.item(),
                    norm_rv=rv.norm().item(), norm_v_star=v_star.norm().item(),
                    norm_v_init=v_init.norm().item(), norm_delta=(v_star - v_init).norm().item(),
                    norm_residual=(v_star - current).norm().item(),
                    norm_update=(rv.norm() * u.norm()).item(),
                    norm_weight=base_layer(module).weight.float().norm().item(),
                    target_ids=targets, context_templates=list(templates),
                    templates_prepended_bare=self.templates_prepended_bare,
                    stats_fingerprint=self.stats_for(target).fingerprint() if self.config.mom2_adjustment else None,
                    timings=timings)
        return RankOneUpdate(target=target, u=u, v=rv, key=key, value=v_star, info=info)

    def _guard_diagnostics(self, module: nn.Module, target: EditTarget, u: torch.Tensor, rv: torch.Tensor,
                           key: torch.Tensor, k_mean: torch.Tensor) -> dict[str, float]:
        """What the disabling-edit guard checks: ‖ΔW‖/‖W‖, the key alignment and the KL on unrelated prompts."""
        weight_norm = base_layer(module).weight.float().norm()
        diagnostics = {"relative_norm": (rv.norm() * u.norm() / weight_norm).item(),
                       "key_alignment": self._key_alignment(target, key, k_mean)}
        if self.config.guard_prompts:
            diagnostics["guard_kl"] = self._unrelated_kl(module, u, rv)
        return diagnostics

    def _key_alignment(self, target: EditTarget, key: torch.Tensor, k_mean: torch.Tensor) -> float:
        """cos(k, k̄) in the C⁻¹ metric: kᵀC⁻¹k̄ / √(kᵀC⁻¹k · k̄ᵀC⁻¹k̄) (C = I without mom2_adjustment)."""
        if self.config.key_mode == "consistent":
            return 1.0
        solve = ((lambda k: self.stats_for(target).solve(k, damping=self.config.mom2_damping).to(k))
                 if self.config.mom2_adjustment else (lambda k: k))
        inv_key, inv_mean = solve(key), solve(k_mean)
        return (torch.dot(key, inv_mean) / torch.sqrt(torch.dot(key, inv_key) * torch.dot(k_mean, inv_mean))).item()

    @torch.no_grad()
    def _unrelated_kl(self, module: nn.Module, u: torch.Tensor, rv: torch.Tensor) -> float:
        """Mean KL(P_before ‖ P_after) of the next token after each guard prompt, P_after with ΔW = rv uᵀ added."""
        encoded = [self.tokenizer(p)["input_ids"] for p in self.config.guard_prompts]
        device = base_layer(module).weight.device
        batch = pad_batch(encoded, pad_token_id(self.tokenizer), device)
        rows, last = torch.arange(len(encoded)), torch.tensor([len(ids) - 1 for ids in encoded])
        head = unwrap_model(self.model).get_output_embeddings()

        def next_token_logprobs() -> torch.Tensor:
            with only_positions(head, rows, last):
                return self.model(**batch).logits[0].float().log_softmax(-1)

        def add_update(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0].float()
            return (output.float() + (x @ u.to(x.device))[..., None] * rv.to(x.device)).to(output.dtype)

        with frozen_eval(self.model):
            before = next_token_logprobs()
            handle = module.register_forward_hook(add_update)
            try:
                after = next_token_logprobs()
            finally:
                handle.remove()
        return (before.exp() * (before - after)).sum(-1).mean().item()

    def _check_guard(self, request: EditRequest, diagnostics: dict[str, float]) -> None:
        cfg, problems = self.config, []
        if cfg.guard_max_relative_norm is not None and not diagnostics["relative_norm"] <= cfg.guard_max_relative_norm:
            problems.append(f"‖ΔW‖/‖W‖ = {diagnostics['relative_norm']:.3g} > {cfg.guard_max_relative_norm}")
        if cfg.guard_min_key_alignment is not None and not (
                abs(diagnostics["key_alignment"]) >= cfg.guard_min_key_alignment):
            problems.append(f"|key alignment| = {abs(diagnostics['key_alignment']):.3g} < "
                            f"{cfg.guard_min_key_alignment} (k·u nearly vanishes)")
        if cfg.guard_max_kl is not None and "guard_kl" in diagnostics and not (
                diagnostics["guard_kl"] <= cfg.guard_max_kl):
            problems.append(f"KL on unrelated prompts = {diagnostics['guard_kl']:.3g} > {cfg.guard_max_kl}")
        if problems:
            raise DisablingEditError(
                f"The ROME update for {request.subject!r} -> {request.target_new!r} would break the model: "
                + "; ".join(problems) + ". Nothing was applied. Skip this edit, try key_mode='consistent', or "
                "relax the guard_* thresholds (guard=False turns the guard off).", diagnostics)

    def _encode(self, template: str, request: EditRequest) -> Encoded:
        """Tokenise ``template`` filled with the prompt and subject (built by concatenation, never ``format``)."""
        before, after = template.split(BARE_TEMPLATE)
        return encode_with_subject(self.tokenizer, before + request.prefix, request.subject, request.suffix + after)

    def _positions(self, contexts: list[Encoded]) -> torch.Tensor:
        return torch.tensor([_position(c, self.config.fact_token, len(c.ids)) for c in contexts])

    @torch.no_grad()
    def _keys_and_outputs(self, module: nn.Module, contexts: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """Module input and output (float32) at the fact token of every context, in one batched pass."""
        device = base_layer(module).weight.device
        batch = pad_batch([c.ids for c in contexts], pad_token_id(self.tokenizer), device)
        rows, positions = torch.arange(len(contexts)), self._positions(contexts)
        with capture(module, tuple(batch["input_ids"].shape)) as seen:
            self.model(**batch)
        return seen.inputs[rows, positions].float(), seen.outputs[rows, positions].float()

    def _left_vector(self, target: EditTarget, k_mean: torch.Tensor) -> torch.Tensor:
        """u = C⁻¹k̄ (or k̄ without mom2_adjustment), normalised to unit length."""
        if self.config.mom2_adjustment:
            u = self.stats_for(target).solve(k_mean, damping=self.config.mom2_damping).to(k_mean)
        else:
            u = k_mean
        return u / u.norm()

    def _value_batch(self, request: EditRequest, contexts: list[Encoded], targets: list[int],
                     device: torch.device) -> _ValueBatch:
        """The N rewriting rows (context + target[:-1]) and the KL row ("<subject> is a"), right-padded."""
        kl_context = encode_with_subject(self.tokenizer, "", request.subject, " is a")
        rows = [c.ids + targets[:-1] for c in contexts] + [kl_context.ids]
        inputs = pad_batch(rows, pad_token_id(self.tokenizer), device)
        positions = self._positions(contexts + [kl_context])
        # The logit at position ℓ_j − T + i scores t_i; the KL distribution is read at the KL row's fact token.
        n_rewrite, n_targets = len(contexts), len(targets)
        label_rows = torch.arange(n_rewrite).repeat_interleave(n_targets)
        label_pos = torch.cat([torch.arange(len(r) - n_targets, len(r)) for r in rows[:n_rewrite]])
        return _ValueBatch(inputs=inputs, shape=tuple(inputs["input_ids"].shape), positions=positions,
                           head_rows=torch.cat([label_rows, torch.tensor([n_rewrite])]),
                           head_positions=torch.cat([label_pos, positions[-1:]]),
                           label_ids=torch.tensor(targets, device=device).repeat(n_rewrite, 1))

    def _layers_below(self, target: EditTarget) -> list[nn.Module]:
        """Decoder layers under the edited one: their outputs do not depend on δ, so v* computes them once."""
        model = unwrap_model(self.model)
        try:
            layers = find_layout(model).layers
        except UnsupportedArchitectureError:  # a module named explicitly in an architecture we cannot map
            return []
        if target.layer is None or not target.name.startswith(f"{layers}.{target.layer}."):
            return []
        return list(model.get_submodule(layers))[: target.layer]

    def _optimise_value(self, module: nn.Module, target: EditTarget, request: EditRequest, contexts: list[Encoded],
                        targets: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Optimise δ at the fact token so the model says the target; returns (v*, v_init, diagnostics).

        Only the logits the loss reads are computed (the LM head sees those positions alone), and the decoder
        layers below the edited one run once and are replayed at later steps: neither changes the loss.
        """
        cfg = self.config
        device = base_layer(module).weight.device
        vb = self._value_batch(request, contexts, targets, device)
        n_rewrite, n_targets = vb.label_ids.shape
        head = unwrap_model(self.model).get_output_embeddings()
        delta = torch.zeros(target.out_features, dtype=torch.float32, device=device, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=cfg.v_lr)
        v_init: torch.Tensor | None = None
        log_p0: torch.Tensor | None = None
        clamped, steps = False, 0
        with replay_outputs(self._layers_below(target)):
            for it in range(cfg.v_num_grad_steps):
                optimiser.zero_grad()
                with add_at_positions(module, delta, vb.positions, vb.shape), \
                        only_positions(head, vb.head_rows, vb.head_positions), \
                        (capture(module, vb.shape) if v_init is None else nullcontext()) as seen:
                    logits = self.model(**vb.inputs, use_cache=False).logits[0].float()
                steps += 1
                if v_init is None:
                    v_init = seen.outputs[0, vb.positions[0]].float().detach()
                log_probs = torch.log_softmax(logits[:-1], dim=-1).view(n_rewrite, n_targets, -1)
                nll = -log_probs.gather(-1, vb.label_ids[..., None]).squeeze(-1).mean(1).mean()
                kl_log_probs = torch.log_softmax(logits[-1], dim=-1)
                if log_p0 is None:
                    log_p0 = kl_log_probs.detach()
                kl = cfg.kl_factor * torch.sum(kl_log_probs.exp() * (kl_log_probs - log_p0))
                weight_decay = cfg.v_weight_decay * delta.norm() / v_init.norm() ** 2
                loss = nll + kl + weight_decay
                if not torch.isfinite(loss):
                    raise OptimizationError(
                        f"The v* optimisation for {request.subject!r} produced a non-finite loss at step {it}. "
                        "Nothing was applied; try a smaller v_lr or check the model's precision.")
                if loss.item() < cfg.early_stop_loss or it == cfg.v_num_grad_steps - 1:
                    break
                (delta.grad,) = torch.autograd.grad(loss, [delta])
                optimiser.step()
                max_norm = cfg.clamp_norm_factor * v_init.norm()
                if delta.norm() > max_norm:
                    clamped = True
                    with torch.no_grad():
                        delta.mul_(max_norm / delta.norm())
        delta = delta.detach()
        info = dict(v_steps=steps, clamped=clamped, loss=loss.item(), nll=nll.item(), kl=kl.item(),
                    weight_decay=weight_decay.item(), target_probability=float(torch.exp(-nll).item()))
        return v_init + delta, v_init, info
