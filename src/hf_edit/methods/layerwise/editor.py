"""The layer-wise method: EMMET's closed form with a δ optimised at every edited layer.

For a batch of requests and the edited layers l_1 < … < l_L (W_l the MLP output projection of layer l):

1. **Values**: for each request (key unit), a δ_l is added to the output of every W_l at the subject's last token
   and all L of them are optimised together with MEMIT's loss over the context templates (NLL + KL + weight decay
   summed over layers, each δ_l clamped against that layer's output; batched over requests, see
   :mod:`hf_edit.values`).
2. **Keys** under that configuration: one forward pass with every δ_l in place reads the input of every W_l at
   the fact token of every templated prompt, so layer l's keys are the ones it will see once the layers below it
   deliver their δ.
3. **Updates**, each layer on its own: W_l must add δ_l at those keys (``template_keys="each"``: one equality
   constraint per templated prompt; ``"mean"``: one per request at MEMIT's averaged key) while keeping the keys of
   the prompts' other tokens (``prompt_preservation``) and changing E[kkᵀ]-weighted outputs as little as possible:
   EMMET's ΔW = R D⁻¹KᵀC'⁻¹ (:func:`hf_edit.methods.memit.solve.emmet_lowrank`), one rank-n LoRA per layer.

Why: on the CounterFact fact model a single z at one layer cannot make the new object win on paraphrases (the
fact is read from several layers' residuals); measured in ``benchmarks/bench_layerwise.py``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack

import torch

from ...architecture import EditTarget, find_layout, unwrap_model
from ...hooks import add_at_positions, frozen_eval
from ...requests import EditRequest
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
            rows, weights, _bare = self._key_rows(units)
            keys = self._keys_under(rows, results, modules)
            timings["keys"] = time.perf_counter() - clock
        each = self._each(len(rows.ids), targets)
        updates: list[Update] = []
        for i, (target, module) in enumerate(zip(targets, modules)):
            clock = time.perf_counter()
            deltas = torch.stack([r.delta[i] for r in results]).double()  # (n_units, d)
            if each:
                K = keys[i].double().T.contiguous()  # (d_in, rows)
                R = deltas.repeat_interleave(len(rows.ids) // len(units), dim=0).T.contiguous()
            else:
                K = (weights @ keys[i].double()).T.contiguous()  # (d_in, n_units)
                R = deltas.T.contiguous()
            update = self.layer_update(i, target, stats[i], K, R, 1.0, requests, len(units), module)
            update.info["template_keys"] = "each" if each else "mean"
            timings[f"solve_{target.layer}"] = time.perf_counter() - clock
            updates.append(update)
        updates[0].info["values"] = [dict(r.info, subject=u[0].subject, requests=len(u))
                                     for r, u in zip(results, units)]
        updates[0].info["timings"] = timings
        return updates

    def compute_values(self, units: list[list[EditRequest]]) -> list[ValueResult]:
        """δ of every unit at every edited layer's projection output, optimised jointly (``delta``: (L, d))."""
        model = unwrap_model(self.model)
        blocks = list(model.get_submodule(find_layout(model).layers))
        targets = self.targets()
        modules = [model.get_submodule(t.name) for t in targets]
        flat = flatten_templates(self.templates)
        problems = [ValueProblem.build(self.tokenizer, unit, flat, self.config.fact_token) for unit in units]
        return optimise_values(self.model, modules, problems, self.value_settings(),
                               pad_id=pad_token_id(self.tokenizer), chunk_size=self.config.z_batch_size,
                               frozen=blocks[:targets[0].layer])

    def _keys_under(self, rows: PositionedRows, results: list[ValueResult],
                    modules: list[torch.nn.Module]) -> list[torch.Tensor]:
        """Each module's input at every row's fact token with every δ in place, (rows, d_in) per module."""
        per_unit = len(rows.ids) // len(results)
        pad_id = pad_token_id(self.tokenizer)
        reads = {str(i): (module, "input") for i, module in enumerate(modules)}
        parts: list[list[torch.Tensor]] = [[] for _ in modules]
        for u, result in enumerate(results):
            chunk = PositionedRows(rows.ids[u * per_unit:(u + 1) * per_unit],
                                   rows.positions[u * per_unit:(u + 1) * per_unit])
            shape = (per_unit, max(len(ids) for ids in chunk.ids))
            positions = torch.tensor(chunk.positions)
            with ExitStack() as added:
                for i, module in enumerate(modules):
                    delta = result.delta[i].expand(per_unit, -1)
                    added.enter_context(add_at_positions(module, delta, positions, shape))
                seen = read_at_positions(self.model, chunk, reads, pad_id=pad_id, batch_size=per_unit)
            for i in range(len(modules)):
                parts[i].append(seen[str(i)])
        return [torch.cat(p) for p in parts]

    def _each(self, n_rows: int, targets: list[EditTarget]) -> bool:
        """Whether every templated key is its own constraint (``template_keys``; ``"auto"``: while the batch's
        keys stay within a quarter of the narrowest projection input)."""
        mode = self.config.template_keys
        if mode != "auto":
            return mode == "each"
        return n_rows <= min(t.in_features for t in targets) // 4
