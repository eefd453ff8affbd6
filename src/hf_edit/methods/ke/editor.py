"""KE's editor: per request, gradient factors and the edit sentence → the trained network → exact LoRA factors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...editors.editing import NetworkEditor
from ...editors.matrices import EditedMatrix, TokenBatch
from ...editors.networks import KENetwork
from ...requests import EditRequest
from .config import KEConfig

__all__ = ["KEEditor"]


class KEEditor(NetworkEditor):
    """Computes KE edits; the requests of one call are edited independently on the same model and summed."""

    config_class = KEConfig
    network_kind = "ke"

    def _deltas(self, requests: Sequence[EditRequest], matrices: list[EditedMatrix]
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
        network = self.network
        assert isinstance(network, KENetwork)
        per_edit, losses, tokens, rows = [], [], {}, []
        for request in requests:
            factors, loss, batch = self._factors([request], [m.name for m in matrices])
            per_edit.append(factors)
            rows.append(batch)
            losses.append(loss)
            for name, f in factors.items():
                tokens[name] = tokens.get(name, 0) + f.n
        condition = TokenBatch.concat(rows, 0)
        with torch.no_grad():
            deltas = network(per_edit, condition.input_ids, condition.attention_mask,
                             scale=float(self.config.lr_scale))
        return deltas, {"loss": sum(losses) / len(losses), "tokens": tokens}
