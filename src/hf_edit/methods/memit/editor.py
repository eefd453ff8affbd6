"""MEMIT (Meng et al., ICLR 2023) and the layer loop it shares with EMMET and AlphaEdit.

For a batch of requests and the edited layers l_1 < … < l_L (z layer = l_L):

1. **z** (:mod:`.values`): for each request, δ is added to the output of decoder block l_L at the subject's last
   token and optimised (batched over requests) so that the model says the target after every context template;
   z = h + δ.  Computed once, on the model as it is.
2. For each layer l_i in turn, on the model with the deltas of l_1 … l_{i−1} applied:

   * K: the projection's input at the subject's last token, averaged over the template groups (``compute_ks``);
   * H: block l_L's output at the subject's last token of the bare prompts; R = (Z − H) / (L − i + 1);
   * the closed form gives ΔW_l = B A with B = R (d × n) and A (n × d_in) (MEMIT: A = ((λC + KKᵀ)⁻¹K)ᵀ);
   * ΔW_l is applied temporarily (a hook) before the next layer's keys are read.

3. The factors become one rank-n LoRA update per layer.  The model itself is never modified.

Requests whose keys are identical (same subject after the same prompt prefix) share one key column and one z
optimised for all their prompts and targets (MEMIT-Merge), unless ``duplicate_subjects`` says otherwise.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from ...architecture import EditTarget, base_layer, find_layout, num_layers, unwrap_model
from ...errors import ConfigError, InvalidRequestError, OptimizationError, StatisticsMismatchError
from ...hooks import add_low_rank, frozen_eval
from ...requests import EditRequest
from ...stats import SecondMomentStats, model_fingerprint
from ...templates import BARE_TEMPLATE, value_positions
from ...tokens import Encoded, encode_with_subject, pad_token_id
from ...values import LogitLens, ValueProblem, ValueResult, ValueSettings, optimise_values
from ..base import EditContext, Editor, Update
from .config import MassEditConfig, MEMITConfig
from .keys import (
    PositionedRows,
    encode_templated,
    fact_position,
    group_weights,
    read_all_positions,
    read_at_positions,
)
from .solve import CholeskyCache, dtype_of, memit_dense, memit_lowrank
from .templates import GroupedTemplates, flatten_templates, sample_grouped_templates

__all__ = ["LayerSolve", "MEMITEditor", "MassEditor"]

logger = logging.getLogger(__name__)

#: What a closed form returns for one layer: A (n, d_in), B (d_out, n) and diagnostics.
LayerSolve = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


class MassEditor(Editor):
    """The MEMIT family's editor: templates, keys, batched z, the sequential layer loop; subclasses give the
    closed form (:meth:`solve_layer`) and may keep state across batches (:meth:`before_batch`, :meth:`finish`).

    ``joint = True``: all requests of one ``edit`` call are one batch (one update per layer, rank = number of
    distinct keys), removed together.
    """

    config_class = MassEditConfig
    joint = True

    def __init__(self, config: MassEditConfig, context: EditContext) -> None:
        super().__init__(config, context)
        self._templates: GroupedTemplates | None = None
        self._cholesky = CholeskyCache()
        self._fingerprints: dict[int, tuple[SecondMomentStats, str]] = {}
        self._model_fingerprint: str | None = None

    # -- templates and statistics -------------------------------------------------------------------------
    def _sampler_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {"context_template_length_params": [list(p) for p in cfg.context_template_length_params],
                "context_template_seeds": None if cfg.context_template_seeds is None
                else list(cfg.context_template_seeds),
                "context_template_top_k": cfg.context_template_top_k, "seed": cfg.seed}

    def _recorded_templates(self) -> GroupedTemplates | None:
        """Templates sampled earlier with the same sampler settings: kept in the method's state, or recorded
        with an edit of this method (e.g. in a loaded folder)."""
        wanted = json.dumps(self._sampler_settings(), sort_keys=True)
        stored = self.context.state.get("context_templates")
        if isinstance(stored, dict) and json.dumps(stored.get("settings"), sort_keys=True) == wanted:
            return tuple(tuple(g) for g in stored["templates"])
        for edit in reversed(self.context.edits):
            templates = edit.info.get("context_templates")
            if edit.method != self.config.name or templates is None or edit.config.get("context_templates"):
                continue
            settings = {k: edit.config.get(k) for k in self._sampler_settings()}
            if json.dumps(settings, sort_keys=True) == wanted:
                return tuple(tuple(g) for g in templates)
        return None

    @property
    def templates(self) -> GroupedTemplates:
        """The grouped context templates (group 0 is ``("{}",)`` unless given otherwise), sampled on first use
        from the base model and kept in the method's state."""
        if self._templates is None:
            cfg = self.config
            templates = cfg.context_templates or self._recorded_templates()
            if templates is None:
                with self.context.base_context(), frozen_eval(self.model):
                    templates = sample_grouped_templates(
                        self.model, self.tokenizer, cfg.context_template_length_params,
                        seeds=cfg.context_template_seeds, top_k=cfg.context_template_top_k, seed=cfg.seed)
            self._templates = tuple(tuple(g) for g in templates)
            if cfg.context_templates is None:
                self.context.state["context_templates"] = {"settings": self._sampler_settings(),
                                                           "templates": [list(g) for g in self._templates]}
        return self._templates

    def prepare(self) -> None:
        """Load (or compute) the statistics of every edited layer (MEMIT-style solves always read them)."""
        for target in self.targets():
            self.stats_for(target)

    def stats_for(self, target: EditTarget) -> SecondMomentStats:
        """Second-moment statistics of ``target``'s input on the base model (explicit, cached or computed).

        Raises:
            StatisticsMismatchError: statistics given explicitly belong to another module or model.
        """
        cfg = self.config
        stats = self.context.stats.get(target, dataset=cfg.mom2_dataset, n_samples=cfg.mom2_n_samples,
                                       dtype=cfg.mom2_dtype, max_length=cfg.mom2_max_length)
        if self.context.stats.explicit is not None:
            self._check_model(stats, target)
        return stats

    def _check_model(self, stats: SecondMomentStats, target: EditTarget) -> None:
        """Explicit statistics that record the model they were computed on must be of this model."""
        recorded = stats.metadata.get("model_fingerprint")
        if not recorded:
            return
        if self._model_fingerprint is None:
            self._model_fingerprint = model_fingerprint(self.model, self.context.revision)
        if recorded != self._model_fingerprint:
            raise StatisticsMismatchError(
                f"The statistics given for {target.name} were computed on another model (fingerprint "
                f"{recorded[:12]}…, this model is {self._model_fingerprint[:12]}…). Pass statistics of this model, "
                "or none to compute them.")

    def stats_fingerprint(self, stats: SecondMomentStats) -> str:
        """The statistics' content fingerprint (hashed once per statistics object)."""
        entry = self._fingerprints.get(id(stats))
        if entry is None or entry[0] is not stats:
            entry = (stats, stats.fingerprint())
            self._fingerprints[id(stats)] = entry
        return entry[1]

    def cholesky(self, stats: SecondMomentStats, shift: float = 0.0) -> torch.Tensor:
        """Cached float64 Cholesky factor of C + shift·I (C = E[kkᵀ] of ``stats``)."""
        return self._cholesky.factor(stats, stats.second_moment(), shift)

    # -- validation ---------------------------------------------------------------------------------------
    def validate(self, request: EditRequest) -> None:
        """Fail fast if the request does not fit the tokenizer or the layers cannot be found."""
        super().validate(request)
        targets = self.targets()
        if any(t.layer is None for t in targets):
            raise ConfigError(f"{self.config_class.__name__} needs layer indices: rewrite_module_tmp must contain "
                              "'{}' for the layer (the z layer is the last edited layer's decoder block).")
        encode_templated(self.tokenizer, BARE_TEMPLATE, request)
        encode_with_subject(self.tokenizer, "", request.subject, " is a")

    def group_requests(self, requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
        """The batch as key units: requests whose keys are identical form one unit (``duplicate_subjects``).

        Keys are identical when the text up to the fact token is: the prompt's prefix and the subject for
        ``subject_first``/``subject_last``, the whole prompt otherwise.

        Raises:
            InvalidRequestError: two requests have the same prompt and subject but different targets, or keys
                coincide under ``duplicate_subjects="error"``.
        """
        seen: dict[tuple[str, str], str] = {}
        for request in requests:
            key = (request.prompt, request.subject)
            if key in seen and seen[key] != request.target_new:
                raise InvalidRequestError(
                    f"Two requests of one batch ask {request.filled_prompt!r} for different targets "
                    f"({seen[key]!r} and {request.target_new!r}); edit them in separate batches or drop one.")
            seen[key] = request.target_new
        units: dict[tuple[str, ...], list[EditRequest]] = {}
        for index, request in enumerate(requests):
            if self.config.fact_token in ("subject_first", "subject_last"):
                key: tuple[str, ...] = (request.prefix, request.subject)
            else:
                key = (request.prompt, request.subject)
            if self.config.duplicate_subjects == "separate":
                key = (*key, str(index))
            unit = units.setdefault(key, [])
            if unit and self.config.duplicate_subjects == "error":
                raise InvalidRequestError(
                    f"Requests {unit[0].filled_prompt!r} and {request.filled_prompt!r} have the same key (subject "
                    f"{request.subject!r}); with duplicate_subjects='error' they cannot share a batch. Use "
                    "duplicate_subjects='merge' (MEMIT-Merge) or separate batches.")
            if all(r != request for r in unit):  # exact duplicates count once
                unit.append(request)
        return list(units.values())

    # -- the edit -----------------------------------------------------------------------------------------
    def compute(self, requests: Sequence[EditRequest]) -> list[Update]:
        """One update per edited layer for the whole batch (the model is not modified).

        Raises:
            InvalidRequestError: conflicting requests (see :meth:`group_requests`).
            OptimizationError: NaN/inf in the z optimisation or the closed form.
            StatisticsMismatchError: explicit statistics of another module or model.
        """
        requests, units, targets, stats, timings = self.begin_batch(requests)
        model = unwrap_model(self.model)
        block = self.block(targets[-1].layer)
        updates: list[Update] = []
        with frozen_eval(self.model):
            clock = time.perf_counter()
            results = self.compute_z(units, targets[-1].layer)
            timings["z"] = time.perf_counter() - clock
            Z = torch.stack([r.value for r in results]).double()  # (n, d)
            with ExitStack() as applied:
                for i, target in enumerate(targets):
                    clock = time.perf_counter()
                    keys, H = self.compute_ks(units, [target], block=block)
                    K = keys[target.name]  # (d_in, n)
                    R = (Z - H).T  # (d, n)
                    share = 1.0 / (len(targets) - i)
                    timings[f"keys_{target.layer}"] = time.perf_counter() - clock
                    clock = time.perf_counter()
                    module = model.get_submodule(target.name)
                    update = self.layer_update(i, target, stats[i], K, R, share, requests, len(units), module)
                    timings[f"solve_{target.layer}"] = time.perf_counter() - clock
                    updates.append(update)
                    applied.enter_context(add_low_rank(module, update.A, update.B))
                clock = time.perf_counter()
                extra = self.finish(targets, units, updates)
                if extra:
                    timings["finish"] = time.perf_counter() - clock
        updates[0].info["z"] = [dict(r.info, subject=u[0].subject, requests=len(u)) for r, u in zip(results, units)]
        updates[0].info["timings"] = timings
        return updates

    def begin_batch(self, requests: Sequence[EditRequest]) -> tuple[
            list[EditRequest], list[list[EditRequest]], list[EditTarget], list[SecondMomentStats], dict[str, float]]:
        """What every ``compute`` of the family starts with: the requests, their key units (:meth:`group_requests`),
        the edited targets, their statistics and the timings so far (the templates, sampled on first use);
        :meth:`before_batch` has been called."""
        requests = list(requests)
        units = self.group_requests(requests)
        targets = self.targets()
        clock = time.perf_counter()
        _ = self.templates
        timings = {"templates": time.perf_counter() - clock}
        cfg = self.config
        self.context.stats.prefetch(targets, dataset=cfg.mom2_dataset, n_samples=cfg.mom2_n_samples,
                                    dtype=cfg.mom2_dtype, max_length=cfg.mom2_max_length)  # one pass for all layers
        stats = [self.stats_for(t) for t in targets]
        self.before_batch(targets, stats, units)
        return requests, units, targets, stats, timings

    def layer_update(self, i: int, target: EditTarget, stats: SecondMomentStats, K: torch.Tensor, R: torch.Tensor,
                     share: float, requests: Sequence[EditRequest], n_units: int, module: nn.Module) -> Update:
        """Layer ``i``'s update for keys K (d_in, n) and the residual share·R (d, n), the keys of the requests'
        prompts preserved (``prompt_preservation``), with its diagnostics.

        Raises:
            OptimizationError: the closed form is not finite.
        """
        R_l = R * share
        A, B, solve_info = self.solve_layer(i, target, stats, K, R_l, preserved=self.prompt_keys(requests, target))
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise OptimizationError(
                f"The {self.config_class.label or 'closed-form'} update of {target.name} is not finite; "
                "nothing was applied. Check the statistics (more texts) and the hyperparameters.")
        A, B = A.float(), B.float()
        info = self._layer_info(i, share, stats, K, R, R_l, A, B, module, solve_info, self.templates,
                                len(requests), n_units)
        return Update(module=target.name, A=A.cpu(), B=B.cpu(), requests=tuple(requests), layer=target.layer,
                      info=info, stackable=True)

    def _layer_info(self, i: int, share: float, stats: SecondMomentStats, K: torch.Tensor, R: torch.Tensor,
                    R_l: torch.Tensor, A: torch.Tensor, B: torch.Tensor, module: nn.Module,
                    solve_info: dict[str, Any], templates: GroupedTemplates, n_requests: int,
                    n_units: int) -> dict[str, Any]:
        delta = B.double() @ A.double()
        fitted = delta @ K
        weight_norm = base_layer(module).weight.float().norm().item()
        return dict(solve_info, layer_index=i, share=share, n_requests=n_requests, n_keys=n_units,
                    norm_residual=R.norm().item(), norm_update=delta.norm().item(),
                    relative_norm=delta.norm().item() / max(weight_norm, 1e-30),
                    fit=(fitted - R_l).norm().item() / max(R_l.norm().item(), 1e-30),
                    stats_fingerprint=self.stats_fingerprint(stats),
                    context_templates=[list(g) for g in templates])

    # -- subclass hooks -----------------------------------------------------------------------------------
    def before_batch(self, targets: list[EditTarget], stats: list[SecondMomentStats],
                     units: list[list[EditRequest]]) -> None:
        """Called before any computation of a batch (e.g. to check or build state).  Default: nothing."""

    def solve_layer(self, index: int, target: EditTarget, stats: SecondMomentStats, K: torch.Tensor,
                    R: torch.Tensor, *, preserved: torch.Tensor | None = None) -> LayerSolve:
        """The closed form of layer ``index``: K (d_in, n) keys, R (d, n) its share of the residual, ``preserved``
        (d_in, m) further keys to keep unchanged, weighted (``prompt_preservation``), or ``None``."""
        raise NotImplementedError

    def finish(self, targets: list[EditTarget], units: list[list[EditRequest]], updates: list[Update]) -> bool:
        """Called with every layer's update applied, once the batch succeeded (e.g. to update state).
        Returns whether it did anything.  Default: nothing."""
        return False

    # -- building blocks ----------------------------------------------------------------------------------
    def block(self, layer: int) -> nn.Module:
        """Decoder block ``layer``."""
        model = unwrap_model(self.model)
        return model.get_submodule(f"{find_layout(model).layers}.{layer}")

    def value_token(self) -> str:
        """Where values are written and keys read: the config's ``fact_token`` (a subclass may write at every
        subject token, ``"subject"``; see :func:`~hf_edit.templates.value_positions`)."""
        return self.config.fact_token

    def _key_templates(self) -> tuple[list[str], list[int]]:
        """The templates keys are read in (MEMIT's, plus the bare prompt when no template is bare) and each one's
        group (-1: the added bare prompt, which carries no weight)."""
        flat = flatten_templates(self.templates)
        groups = [g for g, group in enumerate(self.templates) for _ in group]
        if BARE_TEMPLATE not in flat:
            flat, groups = flat + [BARE_TEMPLATE], groups + [-1]
        return flat, groups

    def key_texts(self, units: list[list[EditRequest]]) -> list[Encoded]:
        """Every unit's prompt in every template (unit after unit), plus the bare prompt when no template is bare:
        the texts whose keys are read."""
        flat, _ = self._key_templates()
        return [encode_templated(self.tokenizer, template, unit[0]) for unit in units for template in flat]

    def key_weights(self, n_units: int) -> torch.Tensor:
        """(n_units, n_units × texts per unit) float64: MEMIT's averaging of each unit's key texts
        (:meth:`key_texts`) into one key."""
        _, groups = self._key_templates()
        per_template = len(groups)
        weights = group_weights(n_units, per_template, [g if g >= 0 else 10**9 for g in groups])
        if -1 in groups:  # the added bare row carries no weight
            weights[:, per_template - 1::per_template] = 0
            weights = weights / weights.sum(1, keepdim=True)
        return weights

    def _key_rows(self, units: list[list[EditRequest]]) -> tuple[PositionedRows, torch.Tensor, list[int]]:
        """Rows (:meth:`key_texts` at the fact token), the averaging weights (:meth:`key_weights`) and the row of
        each unit's bare prompt."""
        flat, _ = self._key_templates()
        bare = flat.index(BARE_TEMPLATE)
        texts = self.key_texts(units)
        ids = [tuple(encoded.ids) for encoded in texts]
        positions = [fact_position(encoded, self.config.fact_token) for encoded in texts]
        return PositionedRows(tuple(ids), tuple(positions)), self.key_weights(len(units)), [
            u * len(flat) + bare for u in range(len(units))]

    def prompt_keys(self, requests: Sequence[EditRequest], target: EditTarget) -> torch.Tensor | None:
        """√μ · the keys of every token of the requests' bare prompts but those whose values are written
        (:meth:`value_token`), on the model as it is now (``prompt_preservation`` = μ; ``None`` when μ = 0), as
        (d_in, m) float64 columns."""
        mu = self.config.prompt_preservation
        if not mu:
            return None
        encoded = [encode_templated(self.tokenizer, BARE_TEMPLATE, r) for r in dict.fromkeys(requests)]
        module = unwrap_model(self.model).get_submodule(target.name)
        with frozen_eval(self.model):
            inputs = read_all_positions(self.model, [e.ids for e in encoded], module,
                                        pad_id=pad_token_id(self.tokenizer))
        columns = []
        for e, x in zip(encoded, inputs):
            keep = torch.ones(x.shape[0], dtype=torch.bool)
            keep[list(value_positions(e, self.value_token()))] = False
            columns.append(x[keep])
        return (torch.cat(columns).double() * mu ** 0.5).T.contiguous()

    @torch.no_grad()
    def compute_ks(self, units: list[list[EditRequest]], targets: Sequence[EditTarget], *,
                   block: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Keys of every unit at each target on the model as it is now, and (with ``block``) the block's output
        at the bare prompts' fact token.

        Returns:
            ``{target name: K (d_in, n) float64}``, and H (n, d) float64 or ``None``.
        """
        rows, weights, bare_rows = self._key_rows(units)
        model = unwrap_model(self.model)
        reads = {t.name: (model.get_submodule(t.name), "input") for t in targets}
        if block is not None:
            reads["__block__"] = (block, "output")
        with frozen_eval(self.model):
            seen = read_at_positions(self.model, rows, reads, pad_id=pad_token_id(self.tokenizer))
        keys = {t.name: (weights @ seen[t.name].double()).T.contiguous() for t in targets}
        H = seen["__block__"][bare_rows].double() if block is not None else None
        return keys, H

    def value_settings(self) -> ValueSettings:
        """How z (or δ) is optimised: the config's values (:meth:`~hf_edit.values.ValueSettings.from_config`)."""
        return ValueSettings.from_config(self.config)

    def compute_z(self, units: list[list[EditRequest]], z_layer: int) -> list[ValueResult]:
        """z = h + δ of every unit at the output of block ``z_layer`` (batched, see :mod:`.values`)."""
        model = unwrap_model(self.model)
        layout = find_layout(model)
        blocks = list(model.get_submodule(layout.layers))
        n = num_layers(model)
        flat = flatten_templates(self.templates)
        problems = [ValueProblem.build(self.tokenizer, unit, flat, self.config.fact_token) for unit in units]
        loss_layer = n - 1 if self.config.v_loss_layer is None else max(int(self.config.v_loss_layer), z_layer)
        lens = None
        if loss_layer < n - 1:
            lens = LogitLens(blocks[loss_layer], model.get_submodule(layout.final_norm),
                             model.get_output_embeddings())
        with frozen_eval(self.model):
            return optimise_values(self.model, blocks[z_layer], problems, self.value_settings(),
                                   pad_id=pad_token_id(self.tokenizer), chunk_size=self.config.z_batch_size,
                                   frozen=blocks[:z_layer + 1], lens=lens, progress=self.context.progress,
                                   description=f"{self.config.name} z")


class MEMITEditor(MassEditor):
    """MEMIT's closed form: ΔW = R Kᵀ(λC + KKᵀ)⁻¹, λ = ``mom2_update_weight``."""

    config_class = MEMITConfig

    def solve_layer(self, index: int, target: EditTarget, stats: SecondMomentStats, K: torch.Tensor,
                    R: torch.Tensor, *, preserved: torch.Tensor | None = None) -> LayerSolve:
        cfg = self.config
        dtype = dtype_of(cfg.solve_dtype)
        if cfg.mom2_dtype == "float32":
            A, B = memit_dense(stats.second_moment(), K, R, cfg.mom2_update_weight, dtype, preserved=preserved)
            return A, B, {"solve": "dense"}
        A, B = memit_lowrank(self.cholesky(stats), K, R, cfg.mom2_update_weight, dtype, preserved=preserved)
        return A, B, {"solve": "low-rank"}

