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
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...architecture import EditTarget, base_layer, find_layout, unwrap_model
from ...errors import ConfigError, DisablingEditError, HfEditError, OptimizationError, UnsupportedArchitectureError
from ...hooks import add_low_rank, capture, frozen_eval, only_positions
from ...requests import EditRequest
from ...stats import SecondMomentStats
from ...templates import BARE_TEMPLATE, encode_templated, fact_position, normalise_templates, sample_context_templates
from ...tokens import Encoded, encode_with_subject, pad_batch, pad_token_id, target_ids
from ...values import ValueProblem, ValueResult, ValueSettings, optimise_values
from ..base import EditContext, Editor, Update
from .config import ROMEConfig

__all__ = ["RankOneUpdate", "ROMEEditor"]

logger = logging.getLogger(__name__)


@dataclass
class RankOneUpdate:
    """A ROME update ΔW = rv uᵀ (Linear orientation) of one module.

    Attributes:
        target: the edited module.
        u: unit key direction C⁻¹k̄ / ‖C⁻¹k̄‖, shape (in_features,), float32.
        rv: the value column rv = (v* − W k − b) / (k · u), shape (out_features,), float32.
        key: the key k with W′k + b = v* (k_cur or k̄ by key_mode).
        value: v*.
        info: diagnostics (norms, k·u, steps, losses, clamp, templates, statistics fingerprint, timings).
    """

    target: EditTarget
    u: torch.Tensor
    rv: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def module_delta_weight(self) -> torch.Tensor:
        """ΔW in the module's own weight layout ((in, out) for Conv1D, (out, in) for Linear)."""
        outer = torch.outer(self.rv, self.u)
        return outer.T if self.target.is_conv1d else outer

    def as_update(self, request: EditRequest) -> Update:
        """The contract's :class:`~hf_edit.methods.Update`: A = uᵀ (1 × in), B = rv (out × 1)."""
        return Update(module=self.target.name, A=self.u[None].cpu(), B=self.rv[:, None].cpu(), requests=(request,),
                      layer=self.target.layer, info=self.info, stackable=True,
                      tensors={"key": self.key.cpu(), "value": self.value.cpu()})


class ROMEEditor(Editor):
    """Computes ROME updates, one request after another (each on the model as edited so far).

    Context templates are sampled once, from the base model, and reused for every edit (as in the reference);
    templates recorded with earlier edits of the same sampler settings (e.g. in a loaded folder) are reused.
    Statistics come from the context's shared provider (explicit, cached, or computed on the base model).
    With several layers, each layer's update is computed with the earlier layers' updates of the same request
    applied.
    """

    config_class = ROMEConfig
    joint = False

    def __init__(self, config: ROMEConfig, context: EditContext) -> None:
        super().__init__(config, context)
        self._templates: list[str] | None = None
        self.templates_prepended_bare = False

    # -- templates and statistics -------------------------------------------------------------------------
    def _sampler_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {"context_template_length_params": [list(p) for p in cfg.context_template_length_params],
                "context_template_top_k": cfg.context_template_top_k, "seed": cfg.seed}

    def _recorded_templates(self) -> list[str] | None:
        """Templates sampled for an earlier edit with the same sampler settings (e.g. in a loaded folder)."""
        wanted = json.dumps(self._sampler_settings(), sort_keys=True)
        for edit in reversed(self.context.edits):
            templates = edit.info.get("context_templates")
            if templates is None or edit.config.get("context_templates") is not None:
                continue
            settings = {k: edit.config.get(k) for k in self._sampler_settings()}
            if json.dumps(settings, sort_keys=True) == wanted:
                return list(templates)
        return None

    @property
    def templates(self) -> list[str]:
        """The context templates (row 0 is ``"{}"``), sampled on first use."""
        if self._templates is None:
            if self.config.context_templates is not None:
                self._templates, self.templates_prepended_bare = normalise_templates(self.config.context_templates)
            else:
                self._templates = self._recorded_templates()
            if self._templates is None:
                with self.context.base_context(), frozen_eval(self.model):
                    self._templates = sample_context_templates(
                        self.model, self.tokenizer, self.config.context_template_length_params,
                        top_k=self.config.context_template_top_k, seed=self.config.seed)
        return self._templates

    def prepare(self) -> None:
        """Load (or compute) the statistics of every configured module."""
        if self.config.mom2_adjustment:
            for target in self.targets():
                self.stats_for(target)

    def stats_for(self, target: EditTarget) -> SecondMomentStats:
        """Second-moment statistics of ``target``'s input on the base model (explicit, cached or computed)."""
        cfg = self.config
        return self.context.stats.get(target, dataset=cfg.mom2_dataset, n_samples=cfg.mom2_n_samples,
                                      dtype=cfg.mom2_dtype, max_length=cfg.mom2_max_length)

    # -- the edit -------------------------------------------------------------------------------------------
    def validate(self, request: EditRequest) -> None:
        """Fail fast, before any computation, if the request does not fit the tokenizer or the model."""
        super().validate(request)
        self._encode(BARE_TEMPLATE, request)

    def compute(self, requests: Sequence[EditRequest]) -> list[Update]:
        """The rank-one update of every configured layer for each request (normally one request).

        The model is not modified.
        """
        updates: list[Update] = []
        for request in requests:
            with ExitStack() as applied:
                for target in self.targets():
                    update = self.compute_update(request, target)
                    updates.append(update.as_update(request))
                    module = unwrap_model(self.model).get_submodule(target.name)
                    applied.enter_context(add_low_rank(module, update.u[None], update.rv[:, None]))
        return updates

    def compute_update(self, request: EditRequest, target: EditTarget) -> RankOneUpdate:
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
            timings["key"] = time.perf_counter() - clock
            clock = time.perf_counter()
            v_star, v_init, opt_info = self._optimise_value(module, target, request, contexts, targets)
            timings["v_star"] = time.perf_counter() - clock
        return self._rank_one(request, target, module, keys, outputs, v_star, v_init, opt_info, targets, timings)

    def compute_each(self, requests: Sequence[EditRequest]) -> list[list[Update] | HfEditError]:
        """Each request's update alone on the model as it is now, with ``v_batch_size`` > 1 (or ``None``) the v* of
        up to that many requests optimised together (one
        batched forward and backward pass per step, each request its own δ, clamp and early stop: the same δ as
        one at a time, up to float rounding).  Configs editing several layers (each layer's v* depends on the
        update of the one before) fall back to one request at a time, as does a batch whose optimisation fails
        (so that the failure is pinned on its request)."""
        targets = self.targets()
        if len(requests) < 2 or len(targets) != 1 or self.config.v_batch_size == 1:
            return super().compute_each(requests)
        target = targets[0]
        module = unwrap_model(self.model).get_submodule(target.name)
        results: list[list[Update] | HfEditError | None] = [None] * len(requests)
        clock = time.perf_counter()
        templates = self.templates
        template_seconds = time.perf_counter() - clock
        problems, jobs = [], []
        for index, request in enumerate(requests):
            try:
                self.validate(request)
                ids = target_ids(self.tokenizer, request.target_new)
                contexts = [self._encode(template, request) for template in templates]
                kl = self._kl_context(request)
            except ConfigError:
                raise
            except HfEditError as err:
                results[index] = err
                continue
            problems.append(self._value_problem(request, contexts, ids, kl))
            jobs.append((index, request, ids, contexts))
        if not jobs:
            return results  # type: ignore[return-value]
        cfg = self.config
        with frozen_eval(self.model):
            clock = time.perf_counter()
            keys, outputs = self._keys_and_outputs(module, [c for job in jobs for c in job[3]])
            key_seconds = (time.perf_counter() - clock) / len(jobs)
            clock = time.perf_counter()
            try:
                values = optimise_values(self.model, module, problems, ValueSettings.from_config(self.config),
                                         pad_id=pad_token_id(self.tokenizer), chunk_size=cfg.v_batch_size,
                                         frozen=self._layers_below(target), progress=self.context.progress,
                                         description="ROME v*")
            except OptimizationError:
                values = None
            v_seconds = (time.perf_counter() - clock) / len(jobs)
        if values is None:
            for (index, _, _, _), result in zip(jobs, super().compute_each([job[1] for job in jobs])):
                results[index] = result
            return results  # type: ignore[return-value]
        n_templates = len(templates)
        for j, ((index, request, ids, _), value) in enumerate(zip(jobs, values)):
            rows = slice(j * n_templates, (j + 1) * n_templates)
            info = dict(_value_info(value), v_batch=min(len(jobs), cfg.v_batch_size or len(jobs)))
            timings = {"templates": template_seconds, "key": key_seconds, "v_star": v_seconds}
            try:
                update = self._rank_one(request, target, module, keys[rows], outputs[rows], value.value,
                                        value.init, info, ids, timings)
                results[index] = [update.as_update(request)]
            except HfEditError as err:
                results[index] = err
        return results  # type: ignore[return-value]

    def _rank_one(self, request: EditRequest, target: EditTarget, module: nn.Module, keys: torch.Tensor,
                  outputs: torch.Tensor, v_star: torch.Tensor, v_init: torch.Tensor, opt_info: dict[str, Any],
                  targets: list[int], timings: dict[str, float]) -> RankOneUpdate:
        """The rank-one update from the keys and module outputs of the templated prompts and the optimised v*."""
        templates = self.templates
        k_mean = keys.mean(0)
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
        return RankOneUpdate(target=target, u=u, rv=rv, key=key, value=v_star, info=info)

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

        with frozen_eval(self.model):
            before = next_token_logprobs()
            with add_low_rank(module, u[None], rv[:, None]):
                after = next_token_logprobs()
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
        return encode_templated(self.tokenizer, template, request)

    def _positions(self, contexts: list[Encoded]) -> torch.Tensor:
        return torch.tensor([fact_position(c, self.config.fact_token) for c in contexts])

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

    def _kl_context(self, request: EditRequest) -> Encoded:
        """The KL prompt "<subject> is a"."""
        return encode_with_subject(self.tokenizer, "", request.subject, " is a")

    def _value_problem(self, request: EditRequest, contexts: list[Encoded], targets: list[int],
                       kl: Encoded) -> ValueProblem:
        """The rows of the request's v*: every context followed by target[:-1] (δ at the fact token) and the KL row
        "<subject> is a" (δ and the KL distribution at its fact token)."""
        positions = self._positions(contexts + [kl]).tolist()
        return ValueProblem(rows=tuple(tuple(c.ids + targets[:-1]) for c in contexts),
                            positions=tuple(positions[:-1]), targets=(tuple(targets),) * len(contexts),
                            kl_rows=(tuple(kl.ids),), kl_positions=(positions[-1],), label=request.subject)

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
        """Optimise δ at the fact token so the model says the target (:func:`~hf_edit.values.optimise_values`);
        returns (v*, v_init, diagnostics).

        Only the logits the loss reads are computed, the decoder layers below the edited one run once and are
        replayed at later steps, and each row's tokens before its fact token run once: none changes the loss.
        """
        problem = self._value_problem(request, contexts, targets, self._kl_context(request))
        (value,) = optimise_values(self.model, module, [problem], ValueSettings.from_config(self.config),
                                   pad_id=pad_token_id(self.tokenizer), frozen=self._layers_below(target))
        return value.value, value.init, _value_info(value)


def _value_info(value: ValueResult) -> dict[str, Any]:
    """ROME's diagnostics of a v* optimisation."""
    info = value.info
    return {"v_steps": info["steps"], "clamped": info["clamped"], "loss": info["loss"], "nll": info["nll"],
            "kl": info["kl"], "weight_decay": info["weight_decay"], "target_probability": info["target_probability"]}
