"""What MEND and KE share as editing methods: a config naming a trained editor network, and an editor that
computes an edit in one forward and one backward pass and returns its exact LoRA factors."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..architecture import EditTarget, num_layers, unwrap_model
from ..errors import ConfigError, InvalidRequestError, LayerOutOfRangeError
from ..hooks import frozen_eval
from ..methods.base import EditConfig, EditContext, Editor, Update
from ..requests import EditRequest
from ..tokens import target_ids
from .matrices import EditedMatrix, GradientFactors, model_max_length, requests_batch
from .networks import EditorNetwork

__all__ = ["NetworkEditConfig", "NetworkEditor", "factor_norm"]


@dataclass(frozen=True)
class NetworkEditConfig(EditConfig):
    """Hyperparameters shared by the editor-network methods (MEND, KE).

    Args:
        editor: the trained editor network: a folder written by ``EditorNetwork.save_pretrained`` (e.g. the
            ``output_dir`` of ``hf_edit.editors.train_editor``) or a Hub model repo id.  Required to edit.
        editor_revision: the Hub revision (branch, tag or commit) of ``editor``.
        layers: edit only the matrices of these decoder layers (a subset of the layers the network was trained
            for); ``None`` (or ``"auto"``): all of them.
        rewrite_module_tmp: not used: the network fixes the edited modules; must be ``None``.
        lr_scale: multiplies every update (the reference's ``lr_scale``, 1.0).
        check_base_model: refuse a model whose weights differ from the one the network was trained for
            (:class:`~hf_edit.editors.EditorMismatchError`).  Turn off only to experiment.
        max_length: longest edit row in tokens (the prompt loses tokens at its start beyond it); ``None``: the
            model's position limit.
    """

    editor: str | None = None
    editor_revision: str | None = None
    lr_scale: float = 1.0
    check_base_model: bool = True
    max_length: int | None = None

    def validate(self) -> None:
        if self.editor is not None and (not isinstance(self.editor, str) or not self.editor.strip()):
            raise ConfigError(f"editor must be a folder or Hub repo id of a trained editor network, got "
                              f"{self.editor!r}.")
        if self.rewrite_module_tmp is not None:
            raise ConfigError(f"{type(self).__name__} edits the modules its editor network was trained for; "
                              "rewrite_module_tmp cannot be set (use layers= to restrict the edit to some layers).")
        if not (isinstance(self.lr_scale, numbers.Real) and math.isfinite(self.lr_scale)):
            raise ConfigError(f"lr_scale must be a finite number, got {self.lr_scale!r}.")
        if not isinstance(self.check_base_model, bool):
            raise ConfigError(f"check_base_model must be true or false, got {self.check_base_model!r}.")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ConfigError(f"max_length must be an integer >= 2 or None, got {self.max_length!r}.")

    def resolved_for(self, model: nn.Module) -> NetworkEditConfig:
        """Unchanged: ``layers=None`` means every layer the editor network edits."""
        return self

    def default_layers(self, model: nn.Module) -> tuple[int, ...]:
        from .matrices import default_editor_layers

        return default_editor_layers(model)


class NetworkEditor(Editor):
    """Edits with a trained editor network (loaded once per editor, checked against the model).

    All requests of one ``edit`` call are edited jointly (``joint = True``); each edited matrix gets one update
    whose rank is the number of contributing tokens (KE: plus one per request).  Updates are stackable: later
    edits of the same method share the adapter, ranks adding up.
    """

    config_class: ClassVar[type[EditConfig]] = NetworkEditConfig
    joint = True
    network_kind: ClassVar[str] = ""

    def __init__(self, config: NetworkEditConfig, context: EditContext) -> None:
        super().__init__(config, context)
        self._network: EditorNetwork | None = None

    # -- the network -------------------------------------------------------------------------------------------
    @property
    def network(self) -> EditorNetwork:
        """The editor network (loaded and checked against the model on first use)."""
        if self._network is None:
            cfg = self.config
            if cfg.editor is None:
                name = type(cfg).__name__
                raise ConfigError(
                    f"{name} needs a trained editor network: {name}(editor='folder-or-hub-id'). Train one with "
                    f"hf_edit.editors.train_editor('{self.network_kind}', model, tokenizer, data, output_dir=...) "
                    f"or `hf-edit train-editor --method {self.network_kind} ...`.")
            network = EditorNetwork._class_of(self.network_kind).from_pretrained(cfg.editor,
                                                                                 revision=cfg.editor_revision)
            if cfg.check_base_model:
                network.check_base_model(self.model)
            device = unwrap_model(self.model).get_input_embeddings().weight.device
            self._network = network.to(device).eval()
        return self._network

    def matrices(self) -> list[EditedMatrix]:
        """The matrices this config edits: the network's, restricted to ``layers`` when given.

        Raises:
            LayerOutOfRangeError: a layer does not exist in the model.
            ConfigError: a layer is not one the network was trained for.
        """
        wanted = self._wanted_layers()
        matrices = self.network.matrices
        if wanted is None:
            return list(matrices)
        missing = sorted(set(wanted) - {m.layer for m in matrices})
        if missing:
            raise ConfigError(f"The editor network edits layers {list(self.network.layers)}, not {missing}.")
        return [m for m in matrices if m.layer in wanted]

    def _wanted_layers(self) -> set[int] | None:
        if self.config.layers is None or isinstance(self.config.layers, str):  # None or "auto": the network's
            return None
        n = num_layers(unwrap_model(self.model))
        out = set()
        for layer in self.config.layers:
            if not -n <= layer < n:
                raise LayerOutOfRangeError(f"Layer {layer} is out of range: the model has {n} layers (0..{n - 1}).")
            out.add(layer + n if layer < 0 else layer)
        return out

    def targets(self) -> list[EditTarget]:
        """The edited matrices as :class:`~hf_edit.architecture.EditTarget` objects."""
        self._wanted_layers()  # a layer out of range fails before the network is loaded
        return [EditTarget(name=m.name, layer=m.layer, is_conv1d=m.is_conv1d, in_features=m.in_features,
                           out_features=m.out_features) for m in self.matrices()]

    def validate(self, request: EditRequest) -> None:
        """The target tokenises, the prompt is not empty, the row fits the model, the network fits the model."""
        ids = target_ids(self.tokenizer, request.target_new)
        if not self.tokenizer(request.filled_prompt)["input_ids"]:
            raise InvalidRequestError(f"The prompt {request.filled_prompt!r} tokenises to nothing.")
        limit = self._max_length()
        if limit is not None and len(ids) >= limit:
            raise InvalidRequestError(f"The target {request.target_new!r} ({len(ids)} tokens) does not fit the "
                                      f"model's {limit} positions after a prompt.")
        self.targets()

    def _max_length(self) -> int | None:
        return self.config.max_length or model_max_length(self.model)

    # -- the edit ----------------------------------------------------------------------------------------------
    def _factors(self, requests: Sequence[EditRequest], names: list[str]
                 ) -> tuple[dict[str, GradientFactors], float, Any]:
        from .matrices import gradient_factors

        batch = requests_batch(self.tokenizer, requests, self._max_length())
        with frozen_eval(self.model):
            factors, loss = gradient_factors(self.model, names, batch)
        return factors, float(loss), batch

    def _deltas(self, requests: Sequence[EditRequest], matrices: list[EditedMatrix]
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
        """``{name: (A, B)}`` of the edit and per-call diagnostics.  Implemented by MEND and KE."""
        raise NotImplementedError

    def compute(self, requests: Sequence[EditRequest]) -> list[Update]:
        """One update per edited matrix (ΔW = B A, Linear orientation; matrices with no contributing token are
        left out)."""
        started = time.perf_counter()
        matrices = self.matrices()
        deltas, info = self._deltas(requests, matrices)
        elapsed_ms = 1000 * (time.perf_counter() - started)
        network = self.network
        common = dict(info, editor=self.config.editor, editor_sha256=getattr(network, "weights_sha256", None),
                      time_ms=elapsed_ms, n_requests=len(requests))
        inner = unwrap_model(self.model)
        updates = []
        for m in matrices:
            if m.name not in deltas:
                continue
            A, B = deltas[m.name]
            A, B = A.detach().float().cpu(), B.detach().float().cpu()
            if A.shape[0] == 0:
                continue
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                from ..errors import OptimizationError

                raise OptimizationError(f"The {self.network_kind.upper()} update of {m.name} is not finite; "
                                        "nothing was applied.")
            weight = getattr(inner.get_submodule(m.name), "base_layer", inner.get_submodule(m.name)).weight
            norm = factor_norm(A, B)
            updates.append(Update(module=m.name, A=A, B=B, requests=tuple(requests), layer=m.layer,
                                  info=dict(common, rank=int(A.shape[0]), delta_norm=norm,
                                            relative_norm=norm / max(float(weight.detach().float().norm()), 1e-30)),
                                  stackable=True))
        return updates


def factor_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖B A‖_F computed from the factors: sqrt(trace((A Aᵀ)(Bᵀ B)))."""
    value = float(((A @ A.T) * (B.T @ B)).sum())
    return math.sqrt(max(value, 0.0))
