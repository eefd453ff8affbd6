"""MEND's editor: gradient factors → the trained network → exact LoRA factors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...editors.editing import NetworkEditor
from ...editors.matrices import EditedMatrix
from ...editors.networks import MENDNetwork
from ...requests import EditRequest
from .config import MENDConfig

__all__ = ["MENDEditor"]


class MENDEditor(NetworkEditor):
    """Computes MEND edits: all requests of a call jointly (one batch, one loss, one factor set per matrix)."""

    config_class = MENDConfig
    network_kind = "mend"

    def _deltas(self, requests: Sequence[EditRequest], matrices: list[EditedMatrix]
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
        network = self.network
        assert isinstance(network, MENDNetwork)
        factors, loss, _ = self._factors(requests, [m.name for m in matrices])
        with torch.no_grad():
            deltas = network(factors, scale=float(self.config.lr_scale))
        edit_lrs = {m.name: float(network.edit_lrs.detach()[network.matrices.index(m)]) for m in matrices}
        return deltas, {"loss": loss, "tokens": {n: f.n for n, f in factors.items()}, "edit_lrs": edit_lrs}
