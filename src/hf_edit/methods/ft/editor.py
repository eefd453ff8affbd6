"""FT and FT+L: fine-tuning one projection on the edit prompts (baselines of ROME, Meng et al. 2022).

This reproduces what the reference implementation computes (kmeng01/rome ``baselines/ft/ft_main.py``), not the
paper's description of it (see the design notes, rome-spec §12-§13):

* **Trained parameters**: the **weight and the bias** of one projection per configured layer (the MLP output
  projection found by architecture discovery, or any ``nn.Linear``/``Conv1D`` named by
  ``rewrite_module_tmp``), looked up exactly (the reference selects every parameter whose name *contains* the
  template).  Everything else is frozen; the model runs in eval mode (no dropout).  All requests and all
  target modules are trained **jointly** by one Adam optimiser.
* **Inputs**: the bare prompts (``request.filled_prompt``, no context templates), right-padded, with an
  attention mask.  Targets are ``" " + target_new`` tokenised without special tokens.
* **Loss** ``"prompt_last"`` (the reference's): at the prompt's last token, the log-softmax is read at
  **every** target id (a multi-token target is a bag of tokens predicted at one position, no teacher forcing);
  the negative mean over the example's target ids, then the mean over the batch.  For single-token targets
  this is the paper's −log P[o* | p].  ``"autoregressive"`` is hf_edit's alternative, **not the paper's nor
  the reference's**: the input is prompt + target[:-1] and every target token is scored teacher-forced at its
  own position.
* **Schedule**: ``num_steps`` epochs; each epoch walks the requests in chunks of ``batch_size`` (in order).
  Per chunk: forward; an Adam step only if the chunk's loss is at least ``early_stop_loss``; then, for FT+L,
  every trained tensor is clamped element-wise to [w₀ − ε, w₀ + ε] (after every chunk, stepped or not).  After
  an epoch whose size-weighted mean chunk loss is below ``early_stop_loss`` training stops.
* **Output**: Δ = w − w₀ per module (weight and bias); the model's tensors are restored bit for bit.

Precision: float32 models train exactly as the reference.  For float16/bfloat16 models hf_edit keeps a float32
master copy of each trained tensor (Adam state, steps and clamp in float32; the model's tensor is the master
cast to its dtype before each forward), and the loss is computed from float32 logits; the returned deltas are
float32.

hf_edit stores a dense delta as a full-rank LoRA (B = identity, A = ΔW, ``lora_B.bias`` = Δb), see
:meth:`DenseUpdate.factors`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...adapters import LoraFactors
from ...architecture import EditTarget, base_layer, unwrap_model
from ...errors import ConfigError, InvalidRequestError, OptimizationError
from ...hooks import frozen_eval, only_positions
from ...requests import EditRequest, as_requests
from ...tokens import pad_batch, pad_token_id, target_ids
from ..base import EditContext, Editor, Update
from .config import FTConfig, FTLoss

__all__ = ["DenseUpdate", "FTEditor", "ft_loss", "prompt_last_loss", "autoregressive_loss"]

logger = logging.getLogger(__name__)

@dataclass
class DenseUpdate:
    """A dense FT/FT+L update of one module.

    Attributes:
        target: the trained module.
        delta_weight: ΔW in the ``nn.Linear`` orientation (out_features, in_features), float32, CPU (for
            GPT-2's Conv1D, whose weight is stored (in, out), this is the transpose of the weight's change).
        delta_bias: Δb, (out_features,), float32, CPU; ``None`` when the module has no bias.
        info: diagnostics of the joint training (shared by the updates of one :meth:`FTEditor.compute`):
            ``epochs`` run, optimiser ``steps`` taken, ``batches`` run, ``loss`` (mean loss of the last epoch,
            measured before its steps), ``epoch_losses``, ``early_stopped`` (an epoch's mean loss fell below
            ``early_stop_loss``), ``epsilon`` (ε or ``None``), ``objective``, ``lr``, ``batch_size``,
            ``num_steps``, ``n_requests``, ``modules``, ``time_s``; plus ``max_abs_delta_weight`` and
            ``max_abs_delta_bias`` (``None`` without bias) of this module.
    """

    target: EditTarget
    delta_weight: torch.Tensor
    delta_bias: torch.Tensor | None
    info: dict[str, Any] = field(default_factory=dict)

    def factors(self) -> LoraFactors:
        """Full-rank LoRA factors: B = identity (out × out), A = ΔW (out × in), bias = Δb.

        B @ A == ΔW exactly (a product with the identity involves no rounding)."""
        out_features = self.delta_weight.shape[0]
        eye = torch.eye(out_features, dtype=self.delta_weight.dtype, device=self.delta_weight.device)
        return LoraFactors(A=self.delta_weight.clone(), B=eye,
                           bias=None if self.delta_bias is None else self.delta_bias.clone())

    def module_delta_weight(self) -> torch.Tensor:
        """ΔW in the module's own weight layout ((in, out) for Conv1D, (out, in) for Linear)."""
        return self.delta_weight.T if self.target.is_conv1d else self.delta_weight


def _factor_fields(factors: LoraFactors) -> dict[str, Any]:
    return {"A": factors.A, "B": factors.B, "bias": factors.bias}


# -- the loss ------------------------------------------------------------------------------------------------

@dataclass
class _Batch:
    """A tokenised chunk: padded inputs and, per scored token, (row, position, label id)."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    n_examples: int


def _encode(tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], loss: str,
            device: torch.device | str | None) -> _Batch:
    rows, score_rows, score_pos, labels = [], [], [], []
    for i, request in enumerate(requests):
        prompt = list(tokenizer(request.filled_prompt)["input_ids"])
        if not prompt:
            raise InvalidRequestError(f"The prompt {request.filled_prompt!r} tokenises to nothing.")
        targets = target_ids(tokenizer, request.target_new)
        if loss == "prompt_last":
            rows.append(prompt)
            positions = [len(prompt) - 1] * len(targets)
        else:
            rows.append(prompt + targets[:-1])
            positions = list(range(len(prompt) - 1, len(prompt) - 1 + len(targets)))
        score_rows += [i] * len(targets)
        score_pos += positions
        labels += targets
    inputs = pad_batch(rows, pad_token_id(tokenizer), device)
    return _Batch(inputs=inputs, rows=torch.tensor(score_rows), positions=torch.tensor(score_pos),
                  labels=torch.tensor(labels, device=device), n_examples=len(requests))


def _input_device(model: nn.Module) -> torch.device:
    embeddings = unwrap_model(model).get_input_embeddings()
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _batch_loss(model: nn.Module, batch: _Batch, per_example: bool = False) -> torch.Tensor:
    """Mean over each example's scored tokens of −log p(label), then the mean over examples (float32)."""
    head = unwrap_model(model).get_output_embeddings()
    if head is not None:
        with only_positions(head, batch.rows, batch.positions):
            logits = model(**batch.inputs).logits[0]
    else:
        logits = model(**batch.inputs).logits
        logits = logits[batch.rows.to(logits.device), batch.positions.to(logits.device)]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    nll = -log_probs.gather(-1, batch.labels.to(log_probs.device)[:, None]).squeeze(-1)
    index = batch.rows.to(nll.device)
    sums = torch.zeros(batch.n_examples, dtype=nll.dtype, device=nll.device).index_add(0, index, nll)
    counts = torch.bincount(index, minlength=batch.n_examples).to(nll.dtype)
    per = sums / counts
    return per if per_example else per.mean()


def ft_loss(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: EditRequest | Iterable[Any],
            loss: FTLoss = "prompt_last", *, per_example: bool = False) -> torch.Tensor:
    """The FT loss of ``requests`` as one right-padded batch, on the model as it is (differentiable, float32).

    Args:
        loss: ``"prompt_last"`` or ``"autoregressive"`` (see :class:`FTConfig`).
        per_example: return the (n,) per-request losses instead of their mean.
    """
    if loss not in ("prompt_last", "autoregressive"):
        raise ConfigError(f"loss must be 'prompt_last' or 'autoregressive', got {loss!r}.")
    batch = _encode(tokenizer, as_requests(requests), loss, _input_device(model))
    return _batch_loss(model, batch, per_example)


def prompt_last_loss(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                     requests: EditRequest | Iterable[Any], *, per_example: bool = False) -> torch.Tensor:
    """The reference's FT loss: all target ids scored at each prompt's last token (see :func:`ft_loss`)."""
    return ft_loss(model, tokenizer, requests, "prompt_last", per_example=per_example)


def autoregressive_loss(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                        requests: EditRequest | Iterable[Any], *, per_example: bool = False) -> torch.Tensor:
    """Teacher-forced NLL of the target tokens after the prompt (hf_edit's option; see :func:`ft_loss`)."""
    return ft_loss(model, tokenizer, requests, "autoregressive", per_example=per_example)


# -- the editor ----------------------------------------------------------------------------------------------

class _Trained:
    """One trained tensor: the model's parameter, its original value and the tensor the optimiser updates."""

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param
        self.original = param.detach().clone()
        self.original_grad = param.grad
        self.original32 = self.original if param.dtype == torch.float32 else self.original.float()
        # float32: the optimiser updates the parameter itself (as the reference); else a float32 master copy.
        self.master = param if param.dtype == torch.float32 else self.original32.clone().requires_grad_(True)

    @property
    def mixed(self) -> bool:
        return self.master is not self.param

    def load_master(self) -> None:
        if self.mixed:
            with torch.no_grad():
                self.param.copy_(self.master)

    def take_grad(self) -> None:
        if self.mixed:
            self.master.grad = None if self.param.grad is None else self.param.grad.float()
            self.param.grad = None

    def delta(self) -> torch.Tensor:
        return (self.master.detach() - self.original32).float().cpu()

    def restore(self) -> None:
        with torch.no_grad():
            self.param.copy_(self.original)
        self.param.grad = self.original_grad


class FTEditor(Editor):
    """Computes FT / FT+L updates: all requests of one call are trained jointly (as the reference does).

    The model may be a ``PeftModel`` whose target module is a LoRA wrapper: then the wrapped base layer's weight
    and bias are trained with the adapters active.  Each call's updates are dense and get an adapter of their own.
    """

    config_class = FTConfig
    joint = True

    def __init__(self, config: FTConfig, context: EditContext) -> None:
        super().__init__(config, context)
        self.progress = context.progress

    def validate(self, request: EditRequest) -> None:
        """Fail fast, before any computation, if the request does not fit the tokenizer or the model."""
        super().validate(request)
        if not self.tokenizer(request.filled_prompt)["input_ids"]:
            raise InvalidRequestError(f"The prompt {request.filled_prompt!r} tokenises to nothing.")

    def compute(self, requests: Sequence[EditRequest]) -> list[Update]:
        """Train jointly on ``requests``; one dense :class:`~hf_edit.methods.Update` per trained module
        (B = identity, A = ΔW, bias = Δb), each in an adapter of its own (not stackable)."""
        requests = as_requests(requests)
        return [Update(module=u.target.name, **_factor_fields(u.factors()), requests=tuple(requests),
                       layer=u.target.layer, info=u.info, stackable=False) for u in self.compute_dense(requests)]

    def compute_dense(self, requests: EditRequest | Iterable[Any]) -> list[DenseUpdate]:
        """Train the target modules jointly on all ``requests``; one :class:`DenseUpdate` per target module.

        The model is not modified: its trained tensors are restored bit for bit, and the ``requires_grad``
        flags, ``.grad`` attributes and train/eval mode are restored, also when an error is raised.

        Raises:
            InvalidRequestError: a request does not fit the tokenizer (or there are none).
            OptimizationError: the loss or an update became NaN/inf.
        """
        requests = as_requests(requests)
        if not requests:
            raise InvalidRequestError("No edit requests were given.")
        for request in requests:
            self.validate(request)
        cfg = self.config
        targets = self.targets()
        inner = unwrap_model(self.model)
        device = _input_device(self.model)
        chunks = [requests[i:i + cfg.batch_size] for i in range(0, len(requests), cfg.batch_size)]
        batches = [_encode(self.tokenizer, chunk, cfg.loss, device) for chunk in chunks]

        trained: list[tuple[EditTarget, _Trained, _Trained | None]] = []
        seen: set[int] = set()
        for target in targets:
            layer = base_layer(inner.get_submodule(target.name))
            tensors = []
            for param in (layer.weight, getattr(layer, "bias", None)):
                if param is None or id(param) in seen:
                    tensors.append(None)
                    continue
                seen.add(id(param))
                tensors.append(_Trained(param))
            trained.append((target, *tensors))
        tensors = [t for _, w, b in trained for t in (w, b) if t is not None]

        clock = time.perf_counter()
        with frozen_eval(self.model):
            try:
                for t in tensors:
                    t.param.requires_grad_(True)
                    t.param.grad = None
                stats = self._train(batches, tensors)
                deltas = [(target, w.delta() if w else None, b.delta() if b else None)
                          for target, w, b in trained]
            finally:
                for t in tensors:
                    t.restore()
        for _, dw, db in deltas:
            if any(d is not None and not torch.isfinite(d).all() for d in (dw, db)):
                raise OptimizationError("The FT update is not finite. Nothing was applied; try a smaller lr.")

        info = dict(stats, objective=cfg.loss, lr=cfg.lr, batch_size=cfg.batch_size, num_steps=cfg.num_steps,
                    epsilon=cfg.norm_constraint, n_requests=len(requests), modules=[t.name for t in targets],
                    time_s=time.perf_counter() - clock)
        updates = []
        for target, dw, db in deltas:
            if dw is None:  # the weight is shared with a module listed earlier (tied); nothing of its own
                dw = torch.zeros(target.out_features, target.in_features)
            delta_weight = dw.T.contiguous() if target.is_conv1d else dw
            own = dict(info, max_abs_delta_weight=float(delta_weight.abs().max()),
                       max_abs_delta_bias=None if db is None else float(db.abs().max()))
            updates.append(DenseUpdate(target=target, delta_weight=delta_weight, delta_bias=db, info=own))
        return updates

    def _train(self, batches: list[_Batch], tensors: list[_Trained]) -> dict[str, Any]:
        cfg = self.config
        optimiser = torch.optim.Adam([t.master for t in tensors], lr=cfg.lr, weight_decay=cfg.weight_decay)
        epoch_losses: list[float] = []
        steps, early_stopped = 0, False
        epochs = range(cfg.num_steps)
        bar = nullcontext()
        if self.progress:
            from tqdm.auto import tqdm

            bar = epochs = tqdm(epochs, desc="FT", leave=False)
        with bar:
            for epoch in epochs:
                total, count = 0.0, 0
                for b, batch in enumerate(batches):
                    optimiser.zero_grad(set_to_none=True)
                    for t in tensors:
                        t.param.grad = None
                        t.load_master()
                    loss = _batch_loss(self.model, batch)
                    value = loss.item()
                    if not math.isfinite(value):
                        raise OptimizationError(
                            f"The FT loss became {value} in epoch {epoch}, batch {b}. Nothing was applied; "
                            "try a smaller lr or check the model's precision.")
                    logger.debug("FT epoch %d batch %d loss %.6g", epoch, b, value)
                    total += value * batch.n_examples
                    count += batch.n_examples
                    if value >= cfg.early_stop_loss:
                        loss.backward()
                        for t in tensors:
                            t.take_grad()
                        optimiser.step()
                        steps += 1
                    del loss
                    if cfg.norm_constraint is not None:
                        eps = cfg.norm_constraint
                        with torch.no_grad():
                            for t in tensors:
                                t.master.clamp_(min=t.original32 - eps, max=t.original32 + eps)
                epoch_losses.append(total / count)
                if self.progress:
                    epochs.set_postfix(loss=f"{epoch_losses[-1]:.4g}")
                if epoch_losses[-1] < cfg.early_stop_loss:
                    early_stopped = True
                    break
        optimiser.zero_grad(set_to_none=True)
        return dict(epochs=len(epoch_losses), steps=steps, batches=len(batches) * len(epoch_losses),
                    loss=epoch_losses[-1], epoch_losses=epoch_losses, early_stopped=early_stopped)
