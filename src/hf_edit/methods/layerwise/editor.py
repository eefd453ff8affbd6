"""The layer-wise method: EMMET's closed form with a δ optimised at every edited layer.

For a batch of requests and the edited layers l_1 < … < l_L (W_l the MLP output projection of layer l):

1. **Values**: for each request (key unit), a δ_{l,s} is added to the output of every W_l at every subject token
   s (``value_tokens="subject"``: one δ per token, counted from the subject's last; ``"fact"``: the fact token
   only) and all of them are optimised together with MEMIT's loss over the context templates (NLL + KL + weight
   decay summed over layers and tokens, each δ clamped against its own output; batched over requests, see
   :mod:`hf_edit.values`).
2. **Keys** under that configuration: one forward pass with every δ in place reads the input of every W_l at
   those tokens of every templated prompt, so layer l's keys are the ones it will see once the layers below it
   deliver their δ.
3. **Updates**, each layer on its own: W_l must add δ_{l,s} at those keys (``template_keys="each"``: one equality
   constraint per templated prompt and token; ``"mean"``: one per request and token at MEMIT's averaged key)
   while keeping the keys of the prompts' other tokens (``prompt_preservation``) and changing E[kkᵀ]-weighted
   outputs as little as possible: EMMET's ΔW = R D⁻¹KᵀC'⁻¹ (:func:`hf_edit.methods.memit.solve.emmet_lowrank`),
   one low-rank LoRA per layer.

Why: on the CounterFact fact model a single z at one layer cannot make the new object win on paraphrases (the
fact is read from several layers' residuals and from every subject token); measured in
``benchmarks/bench_layerwise.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace

import torch

from ...architecture import EditTarget, find_layout, unwrap_model
from ...hooks import add_at_positions, frozen_eval
from ...requests import EditRequest
from ...templates import value_positions
from ...tokens import pad_token_id
from ...values import ValueProblem, ValueResult, optimise_values
from ..base import Update
from ..emmet.editor import EMMETEditor
from ..memit.keys import PositionedRows, read_at_positions
from ..memit.templates import flatten_templates
from .config import LayerwiseConfig

__all__ = ["LayerwiseEditor"]


class LayerwiseEditor(EMMETEditor):
    """Computes layer-wise updates: all requests of one ``edit`` call together (``joint``)."""

    config_class = LayerwiseConfig

    def compute(self, requests: Sequence[EditRequest]) -> list[Update]:
        """One update per edited layer for the whole batch (the model is not modified).

        Raises:
            InvalidRequestError: conflicting requests (see :meth:`group_requests`).
            OptimizationError: NaN/inf in the value optimisation or the closed form.
            StatisticsMismatchError: explicit statistics of another module or model.
        """
        requests, units, targets, stats, timings = self.begin_batch(requests)
        model = unwrap_model(self.model)
        modules = [model.get_submodule(t.name) for t in targets]
        with frozen_eval(self.model):
            clock = time.perf_counter()
            results = self.compute_values(units)
            timings["values"] = time.perf_counter() - clock
            clock = time.perf_counter()
            keys = self.read_keys(units, results, modules)
            timings["keys"] = time.perf_counter() - clock
        each = self._each(keys.n_rows, targets)
        averaging = None if each else keys.averaging(self.key_weights(len(units)))
        updates: list[Update] = []
        for i, (target, module) in enumerate(zip(targets, modules)):
            clock = time.perf_counter()
            if each:  # one column per row
                K = keys.inputs[i].double().T.contiguous()
                columns = zip(keys.unit_of, keys.slot_of)
            else:  # one column per (unit, slot)
                K = (averaging @ keys.inputs[i].double()).T.contiguous()
                columns = keys.groups()
            R = torch.stack([keys.value(results[u].delta, i, slot) for u, slot in columns]).double().T.contiguous()
            update = self.layer_update(i, target, stats[i], K, R, 1.0, requests, len(units), module)
            update.info["template_keys"] = "each" if each else "mean"
            update.info["value_tokens"] = self.config.value_tokens
            timings[f"solve_{target.layer}"] = time.perf_counter() - clock
            updates.append(update)
        updates[0].info["values"] = [dict(r.info, subject=u[0].subject, requests=len(u))
                                     for r, u in zip(results, units)]
        updates[0].info["timings"] = timings
        return updates

    def read_keys(self, units: list[list[EditRequest]], results: list[ValueResult],
                  modules: list[torch.nn.Module]) -> _Keys:
        """The inputs of ``modules`` at every value token of every templated prompt of ``units``, with every δ of
        ``results`` in place (call under :func:`~hf_edit.hooks.frozen_eval`)."""
        return _Keys.read(self, units, results, modules)

    def value_token(self) -> str:
        """``"subject"`` (every subject token) with ``value_tokens="subject"``, else the config's fact token."""
        return "subject" if self.config.value_tokens == "subject" else self.config.fact_token

    def compute_values(self, units: list[list[EditRequest]]) -> list[ValueResult]:
        """δ of every unit at every edited layer's projection output (and value token), optimised jointly
        (``delta``: (L, d) or (L, tokens, d)); units whose target stays unlikely are optimised again with the
        next clamp of ``clamp_escalation``."""
        model = unwrap_model(self.model)
        blocks = list(model.get_submodule(find_layout(model).layers))
        targets = self.targets()
        modules = [model.get_submodule(t.name) for t in targets]
        flat = flatten_templates(self.templates)
        problems = [ValueProblem.build(self.tokenizer, unit, flat, self.value_token()) for unit in units]
        settings = self.value_settings()
        results: list[ValueResult | None] = [None] * len(problems)
        todo = list(range(len(problems)))
        ladder = [f for f in self.config.clamp_escalation if f > settings.clamp_norm_factor]
        for factor in (settings.clamp_norm_factor, *ladder):
            done = optimise_values(self.model, modules, [problems[i] for i in todo],
                                   replace(settings, clamp_norm_factor=factor), pad_id=pad_token_id(self.tokenizer),
                                   chunk_size=self.config.z_batch_size, frozen=blocks[:targets[0].layer],
                                   progress=self.context.progress, description=f"layer-wise δ (clamp {factor:g})")
            for i, result in zip(todo, done):
                result.info["clamp_norm_factor"] = factor
                results[i] = result
            todo = [i for i in todo if results[i].info["target_probability"] < self.config.escalation_threshold]
            if not todo:
                break
        return results  # type: ignore[return-value]

    def _each(self, n_rows: int, targets: list[EditTarget]) -> bool:
        """Whether every templated key is its own constraint (``template_keys``; ``"auto"``: while the batch's
        keys, one per templated prompt and value token, stay within a quarter of the narrowest projection
        input)."""
        mode = self.config.template_keys
        if mode != "auto":
            return mode == "each"
        return n_rows <= min(t.in_features for t in targets) // 4


class _Keys:
    """The edited modules' inputs at every value token of every templated prompt, read with every δ in place.

    Rows are laid out unit after unit, text after text (:meth:`LayerwiseEditor.key_texts`), token after token
    (slot 0 = the last value token); ``unit_of``/``text_of``/``slot_of`` name each row's origin."""

    def __init__(self, inputs: list[torch.Tensor], unit_of: list[int], text_of: list[int], slot_of: list[int],
                 n_texts: int) -> None:
        self.inputs, self.unit_of, self.text_of, self.slot_of, self.n_texts = inputs, unit_of, text_of, slot_of, n_texts

    @property
    def n_rows(self) -> int:
        return len(self.slot_of)

    @staticmethod
    def value(delta: torch.Tensor, module: int, slot: int) -> torch.Tensor:
        """A result's δ for one module and slot (results without slots have one)."""
        return delta[module] if delta.dim() == 2 else delta[module, slot]

    @classmethod
    def read(cls, editor: LayerwiseEditor, units: list[list[EditRequest]], results: list[ValueResult],
             modules: list[torch.nn.Module]) -> _Keys:
        texts = editor.key_texts(units)
        per_unit = len(texts) // len(units)
        pad_id = pad_token_id(editor.tokenizer)
        reads = {str(i): (module, "input") for i, module in enumerate(modules)}
        parts: list[list[torch.Tensor]] = [[] for _ in modules]
        unit_of, text_of, slot_of = [], [], []
        for u, result in enumerate(results):
            n_slots = 1 if result.delta.dim() == 2 else result.delta.shape[1]
            ids, read_at, add_rows, add_positions, add_values = [], [], [], [], []
            for t in range(u * per_unit, (u + 1) * per_unit):
                slots = value_positions(texts[t], editor.value_token())[:n_slots]
                first = len(ids)
                for slot, position in enumerate(slots):
                    ids.append(tuple(texts[t].ids))
                    read_at.append(position)
                    unit_of.append(u)
                    text_of.append(t)
                    slot_of.append(slot)
                for row in range(first, len(ids)):  # every copy of the text gets every δ of the text
                    for slot, position in enumerate(slots):
                        add_rows.append(row)
                        add_positions.append(position)
                        add_values.append(slot)
            shape = (len(ids), max(len(row) for row in ids))
            with ExitStack() as added:
                for i, module in enumerate(modules):
                    delta = torch.stack([cls.value(result.delta, i, slot) for slot in add_values])
                    added.enter_context(add_at_positions(module, delta, torch.tensor(add_positions), shape,
                                                         rows=torch.tensor(add_rows)))
                seen = read_at_positions(editor.model, PositionedRows(tuple(ids), tuple(read_at)), reads,
                                         pad_id=pad_id, batch_size=len(ids))
            for i in range(len(modules)):
                parts[i].append(seen[str(i)])
        return cls([torch.cat(p) for p in parts], unit_of, text_of, slot_of, len(texts))

    def groups(self) -> list[tuple[int, int]]:
        """The (unit, slot) pairs, sorted."""
        return sorted(set(zip(self.unit_of, self.slot_of)))

    def averaging(self, text_weights: torch.Tensor) -> torch.Tensor:
        """(groups, rows) float64: each unit's key for each slot (:meth:`groups`), MEMIT's weighted mean over the
        texts that have the slot (``text_weights``: (units, texts), MEMIT's group weights)."""
        groups = self.groups()
        index = {g: k for k, g in enumerate(groups)}
        matrix = torch.zeros(len(groups), self.n_rows, dtype=torch.float64)
        for row, (u, t, slot) in enumerate(zip(self.unit_of, self.text_of, self.slot_of)):
            matrix[index[(u, slot)], row] = text_weights[u, t].double()
        return matrix / matrix.sum(1, keepdim=True)
