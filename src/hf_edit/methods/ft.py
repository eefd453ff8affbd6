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

import json
import logging
import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..adapters import LoraFactors
from ..architecture import EditTarget, base_layer, num_layers, resolve_target, unwrap_model
from ..errors import ConfigError, InvalidRequestError, OptimizationError
from ..hooks import frozen_eval, only_positions
from ..requests import EditRequest, as_requests
from ..tokens import pad_batch, pad_token_id, target_ids

__all__ = ["FTConfig", "FT_PRESETS", "FTL_PRESETS", "ft_preset_for", "DenseUpdate", "FTEditor", "ft_loss",
           "prompt_last_loss", "autoregressive_loss"]

logger = logging.getLogger(__name__)

FTLoss = Literal["prompt_last", "autoregressive"]

#: Reference hyperparameter keys naming modules that hf_edit finds by itself; accepted and ignored.
_REFERENCE_ONLY_KEYS = {"layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
                        "lm_head_module"}

#: Layer of FT+L when neither ``layers`` nor a preset is given: every shipped FT+L config edits layer 0.
DEFAULT_FTL_LAYER = 0
#: ε of FT+L on a model without a preset (the gpt2-xl value).
DEFAULT_FTL_EPSILON = 5e-4


def _default_layer(n_layers: int, constrained: bool) -> int:
    """The documented default layer: 0 for FT+L (all shipped FT+L configs), ``n // 3`` for FT.

    The shipped unconstrained choices disagree (gpt2-xl: layer 1 of 48, GPT-J: 21 of 28), so for FT hf_edit
    uses the same rule as ROME's default, the early-middle MLP where causal tracing locates factual recall.
    """
    return DEFAULT_FTL_LAYER if constrained else n_layers // 3


def _parse_norm_constraint(value: Any, *, reference: bool) -> float | None:
    """``norm_constraint`` as ε or ``None``.

    ``None``/``False`` mean no constraint.  With ``reference=True`` (values from a reference JSON file) an
    integer or ``True`` also means no constraint, as in the reference's ``type(x) is float`` test, with a
    warning.
    """
    if value is None or value is False:
        return None
    if isinstance(value, numbers.Integral):  # includes True
        if reference:
            logger.warning(
                "norm_constraint=%r is not a float: the reference implementation treats it as "
                "'no constraint' (type(x) is float), and so does FTConfig.from_dict. Write %r for an "
                "L-infinity constraint.",
                value, float(value))
            return None
        raise ConfigError(
            f"norm_constraint must be a float ε > 0 (FT+L) or None/False (FT), got {type(value).__name__} "
            f"{value!r}. The reference ignores non-float values; write {float(value)!r} for a constraint or "
            "None for none.")
    if not isinstance(value, numbers.Real):
        raise ConfigError(f"norm_constraint must be a float ε > 0 or None, got {value!r}.")
    value = float(value)
    if not value > 0:  # written so that NaN fails too
        raise ConfigError(f"norm_constraint ε must be positive, got {value}. Use None for unconstrained FT.")
    return value


@dataclass(frozen=True)
class FTConfig:
    """Hyperparameters of FT / FT+L, with the reference implementation's names and defaults.

    Args:
        layers: decoder layer(s) whose projection is trained (0-based; all jointly).  ``None``: the preset for
            the model id (``model.config.name_or_path``) if there is one, else layer 0 for FT+L
            (``norm_constraint`` set; every shipped FT+L config) and ``num_hidden_layers // 3`` for FT (as
            ROME's default).
        rewrite_module_tmp: module path with ``{}`` for the layer (e.g. ``"transformer.h.{}.attn.c_attn"``);
            any ``nn.Linear`` or ``Conv1D``.  Default: the MLP output projection found by architecture
            discovery.
        lr: Adam learning rate.
        num_steps: number of epochs over the requests.
        batch_size: requests per optimiser step (chunks, in order).
        norm_constraint: ε of FT+L: after every chunk each trained tensor is clamped element-wise to
            [w₀ − ε, w₀ + ε].  ``None`` or ``False``: unconstrained FT.  Must be a float > 0;
            :meth:`from_dict` follows the reference and treats an integer as "no constraint" (with a warning).
        weight_decay: Adam's (coupled, L2) weight decay.
        loss: ``"prompt_last"`` (reference: every target token scored at the prompt's last position) or
            ``"autoregressive"`` (hf_edit's option, not the paper's: teacher-forced next-token NLL over the
            target).
        early_stop_loss: skip the step of a chunk whose loss is below this; stop after an epoch whose mean
            loss is below it (hard-coded 1e-2 in the reference).
        kl_factor: present in the reference's files but unused there; must be 0.
    """

    layers: tuple[int, ...] | None = None
    rewrite_module_tmp: str | None = None
    lr: float = 5e-4
    num_steps: int = 25
    batch_size: int = 128
    norm_constraint: float | None = None
    weight_decay: float = 0.0
    loss: FTLoss = "prompt_last"
    early_stop_loss: float = 1e-2
    kl_factor: float = 0.0

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
            layers = (int(layers),)
        elif layers is not None:
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
                raise ConfigError(f"layers must be an int or a sequence of ints, got {layers!r}.")
            layers = tuple(layers)
            if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in layers):
                raise ConfigError(f"layers must be integers, got {layers!r}.")
            layers = tuple(int(x) for x in layers)
        object.__setattr__(self, "layers", layers)
        norm_constraint = _parse_norm_constraint(self.norm_constraint, reference=False)
        object.__setattr__(self, "norm_constraint", norm_constraint)
        self._validate()

    def _validate(self) -> None:
        if self.layers is not None and len(self.layers) == 0:
            raise ConfigError("layers is empty.")
        if self.loss not in ("prompt_last", "autoregressive"):
            raise ConfigError(f"loss must be 'prompt_last' or 'autoregressive', got {self.loss!r}.")
        for name in ("num_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if not (isinstance(self.lr, numbers.Real) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}.")
        if not (isinstance(self.weight_decay, numbers.Real) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be non-negative, got {self.weight_decay!r}.")
        if not isinstance(self.early_stop_loss, numbers.Real) or math.isnan(self.early_stop_loss):
            raise ConfigError(f"early_stop_loss must be a number, got {self.early_stop_loss!r}.")
        if self.kl_factor != 0:
            raise ConfigError(f"kl_factor={self.kl_factor!r}: the reference's FT has no KL term; only 0 "
                              "is accepted (the key exists so that the reference's files load).")
        if self.rewrite_module_tmp is not None and not isinstance(self.rewrite_module_tmp, str):
            raise ConfigError(f"rewrite_module_tmp must be a string, got {self.rewrite_module_tmp!r}.")

    @property
    def constrained(self) -> bool:
        """``True`` for FT+L (an ε is set)."""
        return self.norm_constraint is not None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FTConfig:
        """Build from a dict, e.g. the reference's ``hparams/FT/*.json`` (its module-path keys other than
        ``rewrite_module_tmp`` are ignored; ``wd_power_law`` of kmeng01/memit is not supported)."""
        values = dict(values)
        if "wd_power_law" in values:
            raise ConfigError(
                "wd_power_law (kmeng01/memit's GPT-J_wd: weight decay scaled with the number of edits) is "
                "not supported; set weight_decay explicitly instead.")
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known - _REFERENCE_ONLY_KEYS
        if unknown:
            raise ConfigError(f"Unknown FT hyperparameters: {sorted(unknown)}.")
        if "norm_constraint" in values:
            values["norm_constraint"] = _parse_norm_constraint(values["norm_constraint"], reference=True)
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> FTConfig:
        """Load a JSON hyperparameter file (hf_edit's or the reference's)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict that :meth:`from_dict` reads back."""
        return json.loads(json.dumps(asdict(self)))

    def resolved_for(self, model: nn.Module) -> FTConfig:
        """This config with ``layers`` filled in: the preset for the model's id, else the default rule."""
        if self.layers is not None:
            return self
        inner = unwrap_model(model)
        model_id = getattr(inner.config, "name_or_path", None) or getattr(inner.config, "_name_or_path", None)
        preset = _lookup(FTL_PRESETS if self.constrained else FT_PRESETS, model_id)
        if preset is not None:
            return replace(self, layers=tuple(preset["layers"]))
        return replace(self, layers=(_default_layer(num_layers(inner), self.constrained),))


#: Shipped FT+L configs of the reference (kmeng01/rome ``hparams/FT/*_constr.json``): lr 5e-4, 25 epochs.
FTL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-medium": dict(layers=(0,), norm_constraint=2e-3),
    "gpt2-large": dict(layers=(0,), norm_constraint=1e-3),
    "gpt2-xl": dict(layers=(0,), norm_constraint=5e-4),
    "EleutherAI/gpt-j-6B": dict(layers=(0,), norm_constraint=5e-5),
}

#: Unconstrained FT (kmeng01/rome ``hparams/FT/*_unconstr.json``): lr 5e-4, 25 epochs.  The reference ships no
#: unconstrained file for gpt2-medium/large: hf_edit uses gpt2-xl's layer 1.  Scaled by depth (1 of 48 layers)
#: it rounds to layer 0 or 1 of 24/36; layer 1 is kept so that FT stays one block above FT+L's layer 0.
FT_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-medium": dict(layers=(1,)),
    "gpt2-large": dict(layers=(1,)),
    "gpt2-xl": dict(layers=(1,)),
    "EleutherAI/gpt-j-6B": dict(layers=(21,)),
}


def _lookup(presets: Mapping[str, dict[str, Any]], model_id: str | None) -> dict[str, Any] | None:
    if not model_id:
        return None
    lowered = str(model_id).lower().rstrip("/")
    for name, values in presets.items():
        if lowered == name.lower() or lowered.endswith("/" + name.lower().split("/")[-1]):
            return values
    return None


def ft_preset_for(model_id: str | None, constrained: bool) -> FTConfig:
    """The shipped config for a model id (``"gpt2-xl"``, ``"openai-community/gpt2-xl"``, ...).

    ``constrained=False`` is method ``"ft"``, ``True`` is ``"ft+l"``.  Unknown models: FT gets the defaults
    with ``layers=None`` (resolved to ``num_hidden_layers // 3``); FT+L gets layer 0 and ε = 5e-4 (the gpt2-xl
    value).
    """
    preset = _lookup(FTL_PRESETS if constrained else FT_PRESETS, model_id)
    if preset is not None:
        return FTConfig(**preset)
    if constrained:
        return FTConfig(layers=(DEFAULT_FTL_LAYER,), norm_constraint=DEFAULT_FTL_EPSILON)
    return FTConfig()


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


class FTEditor:
    """Computes FT / FT+L updates for one model.

    Args:
        model: the causal LM as edited so far (edits active), possibly a ``PeftModel`` whose target module is
            a LoRA wrapper: then the wrapped base layer's weight and bias are trained with the adapters
            active.
        tokenizer: its tokenizer.
        config: the FT hyperparameters (``layers`` resolved with :meth:`FTConfig.resolved_for`).
        progress: show a progress bar over epochs.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: FTConfig, *,
                 progress: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config.resolved_for(model)
        self.progress = progress

    def targets(self) -> list[EditTarget]:
        """The modules this config trains, in ascending layer order (a module named twice is trained once).

        Raises:
            LayerOutOfRangeError: a layer does not exist.
            ConfigError: a named module does not exist or is not an ``nn.Linear``/``Conv1D``.
        """
        found: dict[str, EditTarget] = {}
        n = num_layers(unwrap_model(self.model))
        for layer in sorted(self.config.layers, key=lambda x: x + n if x < 0 else x):
            target = resolve_target(self.model, layer, self.config.rewrite_module_tmp)
            found.setdefault(target.name, target)
        return list(found.values())

    def validate(self, request: EditRequest) -> None:
        """Fail fast, before any computation, if the request does not fit the tokenizer."""
        target_ids(self.tokenizer, request.target_new)
        if not self.tokenizer(request.filled_prompt)["input_ids"]:
            raise InvalidRequestError(f"The prompt {request.filled_prompt!r} tokenises to nothing.")

    def compute(self, requests: EditRequest | Iterable[Any]) -> list[DenseUpdate]:
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
