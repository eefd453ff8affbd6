"""``Edit``: one applied update of one module, with the request(s) it carries and its diagnostics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import ADAPTER_NAME, LoraFactors
from .requests import EditRequest

__all__ = ["Edit"]


@dataclass(repr=False)
class Edit:
    """One applied edit of one module.

    Attributes:
        requests: what was edited (one request for ROME; every request computed jointly for FT or MEMIT).
        method: the registry name of the method (``"rome"``, ``"ft"``, ``"ft+l"``, a plugin's name, ...).
        module: full name of the edited module.
        layer: its decoder layer.
        factors: ΔW = B @ A (and Δb) of this edit, float32 on the CPU, Linear orientation.
        config: the method's hyperparameters (``EditConfig.to_dict()``, with the method name).
        info: diagnostics (ROME: norms, k·u, steps, losses, templates, statistics fingerprint, timings; FT: epochs,
            steps, losses, ε, max |Δ|).
        group: edits of one group share a PEFT adapter (consecutive stackable updates of one method).
        adapter: the name of that adapter (``"default"`` for the first group, then ``"edit_1"``, ...).
        batch: edits of one batch were computed together and are removed together (one request of ROME; one
            ``edit`` call of a joint method).
        stackable: the edit may share its adapter with later edits of the same method.
        tensors: tensors of this session only, not saved (ROME: ``key`` k and ``value`` v* with W′k + b = v*).
    """

    requests: tuple[EditRequest, ...]
    method: str
    module: str
    layer: int | None
    factors: LoraFactors
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    group: int = 0
    adapter: str = ADAPTER_NAME
    batch: int = 0
    stackable: bool = True
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def request(self) -> EditRequest:
        """The (first) request of this edit."""
        return self.requests[0]

    @property
    def key(self) -> torch.Tensor | None:
        """ROME: the key k the update was solved for (this session only)."""
        return self.tensors.get("key")

    @property
    def value(self) -> torch.Tensor | None:
        """ROME: the value v* with W′k + b = v* (this session only)."""
        return self.tensors.get("value")

    def __repr__(self) -> str:
        request = self.request
        more = f" (+{len(self.requests) - 1} more)" if len(self.requests) > 1 else ""
        checks = self.info.get("checks") or [{}]
        probability = checks[0].get("p_new")
        shown = f", P(new)={probability:.3f}" if isinstance(probability, (int, float)) else ""
        return (f"Edit({self.method}, {self.module}, {request.subject!r} -> {request.target_new!r}{more}, "
                f"rank={self.factors.rank}{shown})")

    @property
    def checks(self) -> list[dict[str, Any]]:
        """Whether the edit took, per request, measured right after it was applied (see
        :func:`hf_edit.checks.check_requests`): ``p_new``, ``rank_new``, ``p_old``, ``rank_old``, ``top``, ``took``."""
        return list(self.info.get("checks") or [])

    def manifest_entry(self) -> dict[str, Any]:
        """This edit's entry in ``hf_edit.json`` (everything but the factors, which live in the adapter)."""
        return {"method": self.method, "module": self.module, "layer": self.layer, "rank": self.factors.rank,
                "adapter": self.adapter, "group": self.group, "batch": self.batch, "stackable": self.stackable,
                "requests": [r.to_dict() for r in self.requests], "config": self.config, "info": self.info}
