"""Training MEND and KE editor networks with ``accelerate``.

The objective (spec §2.4, §3.6) of one edit: the gradient factors of the inner edit (rewrite prompt + new target)
go through the network; the edit is applied to the frozen base model as low-rank hooks; the loss is

    c_edit · NLL(target | paraphrase, edited model) + c_loc · KL(p_base ‖ p_edited) on locality text,

back-propagated into the network only (the base model is never trained).

The loop (:func:`train_editor`):

* **Batches.**  An optimiser step sees ``batch_size`` edits (the reference: ``accumulate_bs`` 10 × 1 edit), split
  into micro-batches of ``micro_batch_size`` edits (+ ``n_loc`` locality texts) per process, accumulated.  The
  edits of step s are the same whatever the number of processes: micro-batch g of the run (g counting across
  processes) takes examples g·m … g·m + m − 1 of a seeded per-epoch permutation.  So 1 process and N processes
  with the same ``batch_size`` train on the same data and average the same gradients.
* **Normalisation statistics (MEND).**  Each step uses the statistics of all earlier steps (plus a warm-up over
  ``norm_warmup`` edits before the first step); after the step, the statistics of the step's tokens, gathered
  from every process, are merged in.  The reference updates them token by token during the forward pass, which
  makes them depend on the order in which processes see data; this rule is deterministic and process-count
  invariant.
* **Optimisers.**  Adam over the network (MEND lr 1e-6, KE 1e-5) and, for MEND, a second Adam (lr ``lr_lr``
  1e-4) over the per-matrix step sizes, which therefore take a step from both (the reference's behaviour).
  Gradient norm clipped to 100; a step with a non-finite gradient is skipped.
* **Evaluation** every ``eval_every`` steps on held-back edits (each applied alone): edit success on the rewrite
  prompt and on a paraphrase (every target token the top-1 prediction), drawdown (share of locality tokens whose
  top-1 prediction changes), and the losses.  The best network by validation loss is kept.
* **Checkpoints** every ``checkpoint_every`` steps (``accelerate`` state: network, optimisers, RNG; plus the step),
  and ``resume_from`` continues a run exactly where it stopped.
* **Logging**: tqdm progress, ``metrics.jsonl`` in the output folder, and TensorBoard / W&B through accelerate's
  trackers when installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..architecture import unwrap_model
from ..errors import ConfigError
from ..hooks import frozen_eval
from .data import EditExample, EditorTrainingData, prepare_training_data
from .matrices import (
    GradientFactors,
    TokenBatch,
    encode_edits,
    encode_texts,
    gradient_factors,
    locality_kl,
    low_rank_deltas,
    model_max_length,
    target_accuracy,
    target_nll,
)
from .networks import EditorNetwork, GradientTransform, MENDNetwork

__all__ = ["EditorTrainingConfig", "TrainingResult", "train_editor", "evaluate_editor", "editor_losses",
           "DEFAULT_LR"]

logger = logging.getLogger(__name__)

#: The reference's outer learning rates (``alg/mend.yaml`` 1e-6, ``alg/efk.yaml`` 1e-5).
DEFAULT_LR = {"mend": 1e-6, "ke": 1e-5}
METRICS_NAME = "metrics.jsonl"
STATE_NAME = "trainer_state.json"
CONFIG_NAME = "training_config.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class EditorTrainingConfig:
    """How an editor network is trained (defaults: the reference's ``config.yaml`` + ``alg/{mend,efk}.yaml``).

    Args:
        layers: decoder layers whose MLP matrices are edited (default: the last three).
        modules: explicit module names instead of ``layers``.
        network: the network's hyperparameters (:class:`~hf_edit.editors.MENDNetworkConfig` /
            :class:`~hf_edit.editors.KENetworkConfig` fields).
        edit_weight, loc_weight: c_edit and c_loc of the loss (0.1 and 1.0).
        lr: Adam learning rate of the network; ``None``: 1e-6 (MEND) or 1e-5 (KE).
        lr_lr: MEND: Adam learning rate of the second optimiser over the step sizes (1e-4).
        batch_size: edits per optimiser step (effective batch, all processes together; the reference 10).
        micro_batch_size: edits per forward pass and process (the reference 1); ``batch_size`` must be a
            multiple of ``micro_batch_size`` × processes.
        n_loc: locality texts per micro-batch (the reference 1).
        loc_neighbours: also put up to this many neighbourhood prompts of each edit (other subjects of the same
            relation, evaluation prompts removed) into the locality KL (0: plain text only, as the reference's
            locality data).
        max_grad_norm: gradient-norm clipping (100).
        max_steps: optimiser steps (the run may stop earlier, see ``max_time_s`` and ``early_stop_patience``).
        max_time_s: stop after this many seconds of training (across resumes).
        mixed_precision: ``"no"``, ``"fp16"`` (GPU) or ``"bf16"`` (accelerate's autocast of the forward passes).
        cpu: train on the CPU even when a GPU is present.
        seed: data order, held-back slice, network initialisation.
        val_size: edits held back from the training data for evaluation (when no validation data is given).
        max_length: longest edit row (tokens); ``None``: the model's positions.
        loc_max_length: locality texts are truncated to this many tokens (and to the model's positions).
        norm_warmup: MEND: edits whose gradient factors initialise the normalisation statistics.
        eval_every: evaluate every this many steps (0: only at the end).
        eval_size: validation edits per evaluation (``None``: all held back).
        checkpoint_every: save a resumable checkpoint every this many steps (0: only at the end).
        keep_checkpoints: how many checkpoints to keep.
        log_every: log training metrics every this many steps.
        select: the network saved as the result: ``"best"`` validation loss (the reference) or ``"last"``.
        early_stop_patience: stop when the validation loss has not improved for this many evaluations.
        log_with: accelerate trackers (``"tensorboard"``, ``"wandb"``, ...); ``"auto"``: TensorBoard if
            installed; ``()``: none.  Trackers that are not installed are skipped with a warning.
    """

    layers: tuple[int, ...] | None = None
    modules: tuple[str, ...] | None = None
    network: Mapping[str, Any] | None = None
    edit_weight: float = 0.1
    loc_weight: float = 1.0
    lr: float | None = None
    lr_lr: float = 1e-4
    batch_size: int = 10
    micro_batch_size: int = 1
    n_loc: int = 1
    loc_neighbours: int = 0
    max_grad_norm: float = 100.0
    max_steps: int = 100_000
    max_time_s: float | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    seed: int = 0
    val_size: int = 100
    max_length: int | None = None
    loc_max_length: int = 128
    norm_warmup: int = 100
    eval_every: int = 500
    eval_size: int | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    select: Literal["best", "last"] = "best"
    early_stop_patience: int | None = None
    log_with: str | tuple[str, ...] = "auto"

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in (
                [self.layers] if isinstance(self.layers, int) else self.layers)))
        if self.modules is not None:
            object.__setattr__(self, "modules", tuple(str(x) for x in self.modules))
        if isinstance(self.log_with, list):
            object.__setattr__(self, "log_with", tuple(self.log_with))
        for name in ("batch_size", "micro_batch_size", "n_loc", "max_steps", "loc_max_length", "log_every",
                     "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("val_size", "norm_warmup", "eval_every", "checkpoint_every", "loc_neighbours"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}.")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                              f"({self.micro_batch_size}).")
        for name in ("edit_weight", "loc_weight", "lr_lr", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}.")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be positive, got {self.lr!r}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        if self.select not in ("best", "last"):
            raise ConfigError(f"select must be 'best' or 'last', got {self.select!r}.")
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise ConfigError(f"max_time_s must be positive, got {self.max_time_s!r}.")

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else (dict(value) if isinstance(value, Mapping)
                                                                        else value)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EditorTrainingConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"Unknown training settings {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**dict(values))


@dataclass
class TrainingResult:
    """What :func:`train_editor` returns.

    Attributes:
        editor: the selected network (CPU, eval mode), also saved to ``output_dir``.
        output_dir: the folder holding the network, ``metrics.jsonl``, ``training_config.json`` and checkpoints.
        steps: optimiser steps done (in total, across resumes); examples_seen: edits trained on.
        time_s: training time (across resumes); stopped: ``"max_steps"``, ``"max_time"`` or ``"early_stop"``.
        metrics: the last evaluation; best_metrics: the evaluation of the selected network.
        data: the training data's description (sources, fingerprint, counts, exclusions).
    """

    editor: EditorNetwork
    output_dir: Path
    steps: int
    examples_seen: int
    time_s: float
    stopped: str
    metrics: dict[str, float] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


# -- the objective -------------------------------------------------------------------------------------------------
@dataclass
class _Micro:
    """One micro-batch: edits (inner rows), their outer rows, locality rows."""

    inner: list[TokenBatch]  # MEND: one batch of all edits; KE: one batch per edit
    outer: TokenBatch
    loc: TokenBatch
    rewrite: TokenBatch | None = None


def _edit_deltas(network: nn.Module, model: nn.Module, names: list[str], inner: list[TokenBatch],
                 statistics: dict[str, torch.Tensor] | None = None
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Gradient factors of the inner edits, through the network; ``statistics`` collects MEND's batch
    statistics of the factors (merged in order)."""
    per_edit: list[dict[str, GradientFactors]] = []
    losses = []
    for batch in inner:
        factors, loss = gradient_factors(model, names, batch)
        per_edit.append(factors)
        losses.append(loss)
    plain = network.module if hasattr(network, "module") else network
    if plain.joint_edits:
        (factors,) = per_edit
        if statistics is not None:
            for key, packed in plain.statistics_of(factors).items():
                size = plain.transforms[key].in_features
                statistics[key] = packed if key not in statistics else GradientTransform.merge(
                    statistics[key], packed, size)
        deltas = network(factors)
    else:
        ids = TokenBatch.concat(inner, 0)
        deltas = network(per_edit, ids.input_ids, ids.attention_mask)
    return deltas, torch.stack(losses).mean()


def editor_losses(network: nn.Module, model: nn.Module, micro: _Micro, *, edit_weight: float,
                  loc_weight: float, autocast: Any = nullcontext, statistics: dict[str, torch.Tensor] | None = None,
                  metrics: bool = False) -> dict[str, torch.Tensor]:
    """The training objective of one micro-batch (and, with ``metrics``, the evaluation measures).

    Returns a dict with ``loss`` (differentiable), ``loss_edit``, ``loss_loc``, ``inner_loss`` and, with
    ``metrics``, ``es_rewrite``, ``es_paraphrase``, ``pre_es_rewrite``, ``pre_es_paraphrase``, ``drawdown``.
    """
    plain = network.module if hasattr(network, "module") else network
    names = [m.name for m in plain.matrices]
    device = unwrap_model(model).get_input_embeddings().weight.device
    pad = 0
    with autocast():
        deltas, inner_loss = _edit_deltas(network, model, names, [b.to(device) for b in micro.inner], statistics)
        rows = [micro.outer, micro.loc] + ([micro.rewrite] if metrics and micro.rewrite is not None else [])
        joint = TokenBatch.concat(rows, pad).to(device)
        n_outer, n_loc = micro.outer.input_ids.shape[0], micro.loc.input_ids.shape[0]
        loc_width = micro.loc.input_ids.shape[1]
        with torch.no_grad():
            pre_joint = model(input_ids=joint.input_ids, attention_mask=joint.attention_mask).logits \
                if metrics else None
            pre_loc = pre_joint[n_outer:n_outer + n_loc, :loc_width] if metrics else model(
                input_ids=micro.loc.input_ids.to(device), attention_mask=micro.loc.attention_mask.to(device)).logits
        with low_rank_deltas(model, deltas):
            post = model(input_ids=joint.input_ids, attention_mask=joint.attention_mask).logits
    outer_rows = TokenBatch(joint.input_ids[:n_outer], joint.attention_mask[:n_outer], joint.label_mask[:n_outer],
                            joint.rows[:n_outer])
    loss_edit = target_nll(post[:n_outer], outer_rows)
    loc_mask = micro.loc.attention_mask.to(device).bool()
    post_loc = post[n_outer:n_outer + n_loc, :loc_width]
    loss_loc = locality_kl(pre_loc, post_loc, loc_mask)
    out = {"loss": edit_weight * loss_edit + loc_weight * loss_loc, "loss_edit": loss_edit.detach(),
           "loss_loc": loss_loc.detach(), "inner_loss": inner_loss.detach()}
    if metrics:
        with torch.no_grad():
            out["es_paraphrase"] = target_accuracy(post[:n_outer], outer_rows).mean()
            out["pre_es_paraphrase"] = target_accuracy(pre_joint[:n_outer], outer_rows).mean()
            changed = (pre_loc.argmax(-1) != post_loc.argmax(-1)) & loc_mask
            out["drawdown"] = changed.sum().float() / loc_mask.sum().clamp_min(1)
            if micro.rewrite is not None:
                start = n_outer + n_loc
                rewrite_rows = TokenBatch(joint.input_ids[start:], joint.attention_mask[start:],
                                          joint.label_mask[start:], joint.rows[start:])
                out["es_rewrite"] = target_accuracy(post[start:], rewrite_rows).mean()
                out["pre_es_rewrite"] = target_accuracy(pre_joint[start:], rewrite_rows).mean()
    return out


class _Batches:
    """Deterministic micro-batches: example positions → edits (per-epoch seeded permutations), locality texts."""

    def __init__(self, data: EditorTrainingData, tokenizer: PreTrainedTokenizerBase, joint_edits: bool, *,
                 micro_batch_size: int, n_loc: int, seed: int, max_length: int | None, loc_max_length: int,
                 loc_neighbours: int = 0) -> None:
        self.data, self.tokenizer, self.joint_edits = data, tokenizer, joint_edits
        self.loc_neighbours = loc_neighbours
        self.micro, self.n_loc, self.seed = micro_batch_size, n_loc, seed
        self.max_length, self.loc_max_length = max_length, loc_max_length
        self._perms: dict[tuple[str, int], torch.Tensor] = {}

    def _perm(self, what: str, n: int, epoch: int) -> torch.Tensor:
        key = (what, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            offset = {"train": 0, "loc": 1, "warmup": 2, "val_loc": 3}[what]
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + offset * 7_919 + epoch)
            self._perms[key] = torch.randperm(n, generator=generator)
        return self._perms[key]

    def example(self, position: int) -> tuple[EditExample, int]:
        n = len(self.data.train)
        epoch, pos = divmod(position, n)
        return self.data.train[int(self._perm("train", n, epoch)[pos])], epoch + pos

    def loc_text(self, position: int, what: str = "loc") -> str:
        n = len(self.data.locality)
        epoch, pos = divmod(position, n)
        return self.data.locality[int(self._perm(what, n, epoch)[pos])]

    def build(self, examples: Sequence[tuple[EditExample, int]], loc_texts: Sequence[str], *,
              with_rewrite: bool = False) -> _Micro:
        requests = [e.request for e, _ in examples]
        prompts = [r.filled_prompt for r in requests]
        targets = [r.target_new for r in requests]
        inner_all = encode_edits(self.tokenizer, prompts, targets, max_length=self.max_length)
        if self.joint_edits:
            inner = [inner_all]
        else:
            inner = [encode_edits(self.tokenizer, [p], [t], max_length=self.max_length)
                     for p, t in zip(prompts, targets, strict=True)]
        outer = encode_edits(self.tokenizer, [e.outer_prompt(draw) for e, draw in examples], targets,
                             max_length=self.max_length)
        neighbours = []
        for example, draw in examples:
            pool = example.neighbours
            neighbours += [pool[(draw + j) % len(pool)] for j in range(min(self.loc_neighbours, len(pool)))]
        loc = encode_texts(self.tokenizer, [*loc_texts, *neighbours], max_length=self.loc_max_length)
        return _Micro(inner=inner, outer=outer, loc=loc, rewrite=inner_all if with_rewrite else None)

    def micro_batch(self, index: int) -> _Micro:
        """Micro-batch ``index`` of the run (counting micro-batches of every process)."""
        examples = [self.example(index * self.micro + j) for j in range(self.micro)]
        texts = [self.loc_text(index * self.n_loc + j) for j in range(self.n_loc)]
        return self.build(examples, texts)

    def warmup_batches(self, n: int) -> list[_Micro]:
        """The edits whose factors initialise MEND's normalisation statistics (in micro-batches)."""
        count = len(self.data.train)
        order = self._perm("warmup", count, 0)
        chosen = [(self.data.train[int(order[i % count])], i) for i in range(n)]
        return [self.build(chosen[i:i + self.micro], [self.data.locality[0]])
                for i in range(0, len(chosen), self.micro)]

    def val_micro(self, example: EditExample, index: int) -> _Micro:
        texts = [self.loc_text(index * self.n_loc + j, "val_loc") for j in range(self.n_loc)]
        return self.build([(example, index)], texts, with_rewrite=True)


# -- evaluation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def _evaluate(network: EditorNetwork, model: nn.Module, batches: _Batches, examples: Sequence[EditExample],
              config: EditorTrainingConfig, autocast: Any = nullcontext) -> dict[str, float]:
    was_training = network.training
    network.eval()
    totals: dict[str, float] = {}
    try:
        for i, example in enumerate(examples):
            micro = batches.val_micro(example, i)
            with torch.enable_grad():
                values = editor_losses(network, model, micro, edit_weight=config.edit_weight,
                                       loc_weight=config.loc_weight, autocast=autocast, metrics=True)
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + float(value)
    finally:
        network.train(was_training)
    n = max(len(examples), 1)
    return {f"val/{k}": v / n for k, v in sorted(totals.items())}


def evaluate_editor(network: EditorNetwork, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    examples: Sequence[EditExample], locality: Sequence[str], *,
                    config: EditorTrainingConfig | None = None) -> dict[str, float]:
    """The validation measures of ``network`` on ``examples`` (each edit applied alone to ``model``).

    Returns the means of ``loss`` (c_edit·NLL + c_loc·KL), ``loss_edit``, ``loss_loc``, ``es_rewrite`` and
    ``es_paraphrase`` (every target token the top-1 prediction after the edit), their pre-edit values, and
    ``drawdown`` (share of locality tokens whose top-1 prediction changed), as ``val/<name>``.
    """
    config = config or EditorTrainingConfig()
    data = EditorTrainingData(train=list(examples), val=[], locality=list(locality))
    positions = model_max_length(model)
    batches = _Batches(data, tokenizer, network.joint_edits, micro_batch_size=1, n_loc=config.n_loc, seed=config.seed,
                       max_length=_cap(config.max_length, positions),
                       loc_max_length=_cap(config.loc_max_length, positions), loc_neighbours=config.loc_neighbours)
    with frozen_eval(model):
        return _evaluate(network, model, batches, examples, config)


def _cap(value: int | None, limit: int | None) -> int | None:
    if value is None:
        return limit
    return value if limit is None else min(value, limit)


# -- the loop ------------------------------------------------------------------------------------------------------
def _trackers(log_with: str | tuple[str, ...]) -> list[str]:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    wanted = (["tensorboard"] if available["tensorboard"] else []) if log_with == "auto" else (
        [log_with] if isinstance(log_with, str) else list(log_with))
    out = []
    for name in wanted:
        if available.get(name, True):
            out.append(name)
        else:
            logger.warning("The %s tracker is not installed; metrics go to metrics.jsonl only.", name)
    return out


def _latest_checkpoint(output_dir: Path) -> Path | None:
    folder = output_dir / CHECKPOINTS
    found = sorted((p for p in folder.glob("step-*") if (p / STATE_NAME).is_file()),
                   key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []
    return found[-1] if found else None


def train_editor(method: Literal["mend", "ke"], model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 train_data: Any, *, output_dir: str | os.PathLike, config: EditorTrainingConfig | None = None,
                 locality_data: Any, exclude: Any = None, val_data: Any = None, n_train: int | None = None,
                 resume_from: str | os.PathLike | None = None, progress: bool = True) -> TrainingResult:
    """Train a MEND or KE editor network for ``model`` and save it to ``output_dir``.

    Run it as is (one CPU or GPU), or under ``accelerate launch`` / ``torchrun`` for several processes.

    Args:
        method: ``"mend"`` or ``"ke"``.
        model: the base causal LM (any architecture that :func:`~hf_edit.editors.find_edited_matrices` handles);
            it is moved to the training device, frozen while training, and its flags restored afterwards.
        tokenizer: its fast tokenizer.
        train_data: CounterFact (ROME or EasyEdit format) or zsRE edits: a path, Hub dataset id,
            :class:`~hf_edit.evaluation.EvalData` or list of cases.
        output_dir: where the network (``EditorNetwork.save_pretrained`` format), ``metrics.jsonl``,
            ``training_config.json`` and ``checkpoints/`` go.
        config: :class:`EditorTrainingConfig` (default: the reference's hyperparameters).
        locality_data: text for the locality term: a text file or folder (e.g. WikiText-2 raw) or a list of
            strings.
        exclude: evaluation data never to train on (e.g. the CounterFact file you evaluate on), or case ids.
        val_data: validation edits (default: ``config.val_size`` edits held back from ``train_data``).
        n_train: use the first ``n_train`` records of ``train_data``.
        resume_from: ``"latest"`` (the newest checkpoint in ``output_dir``) or a checkpoint folder.
        progress: show a progress bar (main process).

    Returns:
        A :class:`TrainingResult`; the selected network is also saved to ``output_dir``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if method not in ("mend", "ke"):
        raise ConfigError(f"method must be 'mend' or 'ke', got {method!r}.")
    config = config or EditorTrainingConfig()
    output_dir = Path(output_dir)
    lr = config.lr if config.lr is not None else DEFAULT_LR[method]
    trackers = _trackers(config.log_with)
    # without any accelerator, say so: accelerate only sets up multi-process CPU training (gloo) with cpu=True
    on_cpu = config.cpu or not (torch.accelerator.is_available() if hasattr(torch, "accelerator")
                                else torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=on_cpu,
                              log_with=trackers or None, project_dir=str(output_dir))
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = config.micro_batch_size * world
    if config.batch_size % per_step:
        raise ConfigError(f"batch_size ({config.batch_size}) must be a multiple of micro_batch_size × processes "
                          f"({config.micro_batch_size} × {world}).")
    accumulation = config.batch_size // per_step
    set_seed(config.seed)

    data = prepare_training_data(train_data, locality=locality_data, exclude=exclude, val_data=val_data,
                                 val_size=config.val_size, seed=config.seed, n=n_train)
    if accelerator.is_main_process:
        logger.info("Editor training data: %s", data.describe())
    positions = model_max_length(model)
    batches = _Batches(data, tokenizer, EditorNetwork._class_of(method).joint_edits,
                       micro_batch_size=config.micro_batch_size, n_loc=config.n_loc,
                       seed=config.seed, max_length=_cap(config.max_length, positions),
                       loc_max_length=_cap(config.loc_max_length, positions), loc_neighbours=config.loc_neighbours)
    val_examples = data.val[:config.eval_size] if config.eval_size else data.val

    model.to(accelerator.device)
    network = EditorNetwork.create(method, model, layers=config.layers, modules=config.modules,
                                   config=dict(config.network or {}))
    network.to(accelerator.device).train()
    optimisers = [torch.optim.Adam(network.parameters(), lr=lr)]
    if network.learning_rate_parameters():
        optimisers.append(torch.optim.Adam(network.learning_rate_parameters(), lr=config.lr_lr))
    prepared = accelerator.prepare(network, *optimisers)
    wrapped, optimisers = prepared[0], list(prepared[1:])

    run_description = {"method": method, "config": config.to_dict(), "world_size": world,
                       "base_model": network.base_model.to_dict(), **data.describe()}
    start_step, examples_seen, elapsed_before, best = 0, 0, 0.0, None
    best_metrics: dict[str, float] = {}
    evals_without_improvement = 0
    if resume_from is not None:
        checkpoint = _latest_checkpoint(output_dir) if str(resume_from) == "latest" else Path(resume_from)
        if checkpoint is None:
            raise ConfigError(f"No checkpoint to resume from in {output_dir / CHECKPOINTS}.")
        state = json.loads((checkpoint / STATE_NAME).read_text())
        if state.get("run") != _comparable(run_description):
            raise ConfigError(f"The checkpoint {checkpoint} belongs to another run (method, base model, data or "
                              "training settings differ); start a new output_dir or pass the same settings.")
        accelerator.load_state(str(checkpoint))
        start_step, examples_seen = int(state["step"]), int(state["examples_seen"])
        elapsed_before, best = float(state["elapsed_s"]), state.get("best")
        best_metrics = state.get("best_metrics", {})
        evals_without_improvement = int(state.get("evals_without_improvement", 0))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CONFIG_NAME).write_text(json.dumps(run_description, indent=2, default=str))
        _truncate_log(output_dir / METRICS_NAME, start_step)
    if trackers:
        accelerator.init_trackers("hf_edit-editor", config={k: str(v) for k, v in config.to_dict().items()})

    from tqdm.auto import tqdm

    bar = tqdm(total=config.max_steps, initial=start_step, desc=f"training {method.upper()}",
               disable=not (progress and accelerator.is_local_main_process))
    started = time.perf_counter()
    stopped, done, last_metrics, last_eval = "max_steps", start_step, {}, -1
    elapsed = elapsed_before
    window: dict[str, float] = {}
    window_steps = 0
    with frozen_eval(model):
        if network.collects_statistics and start_step == 0 and config.norm_warmup and network.config.norm:
            for micro in batches.warmup_batches(config.norm_warmup):
                factors, _ = gradient_factors(model, [m.name for m in network.matrices],
                                              micro.inner[0].to(accelerator.device))
                network.observe(factors)
        for step in range(start_step, config.max_steps):
            statistics: dict[str, torch.Tensor] = {}
            sums: dict[str, torch.Tensor] = {}
            for m in range(accumulation):
                index = (step * accumulation + m) * world + rank
                micro = batches.micro_batch(index)
                sync = m == accumulation - 1
                with (nullcontext() if sync else accelerator.no_sync(wrapped)):
                    values = editor_losses(wrapped, model, micro, edit_weight=config.edit_weight,
                                           loc_weight=config.loc_weight, autocast=accelerator.autocast,
                                           statistics=statistics if network.collects_statistics else None)
                    accelerator.backward(values["loss"] / accumulation)
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value.detach() / accumulation
            grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), config.max_grad_norm)
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if math.isfinite(grad_norm):
                for optimiser in optimisers:
                    optimiser.step()
            else:
                logger.warning("Step %d: non-finite gradient norm; the step is skipped.", step)
            for optimiser in optimisers:
                optimiser.zero_grad(set_to_none=True)
            if network.collects_statistics:
                _merge_statistics(accelerator, network, statistics)
            examples_seen += config.batch_size
            for key, value in sums.items():
                window[key] = window.get(key, 0.0) + float(value)
            window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
            window_steps += 1
            done = step + 1
            elapsed = elapsed_before + time.perf_counter() - started
            bar.update(1)
            if done % config.log_every == 0 or done == config.max_steps:
                keys = sorted(window)
                means = accelerator.reduce(torch.tensor([window[k] / window_steps for k in keys],
                                                        device=accelerator.device), "mean")
                record = {"step": done, "examples": examples_seen, "elapsed_s": round(elapsed, 3),
                          **{f"train/{k}": float(v) for k, v in zip(keys, means.tolist(), strict=True)}}
                if network.learning_rate_parameters():  # MEND's learned edit learning rates
                    record["train/edit_lr_mean"] = float(torch.cat(
                        [p.detach().flatten() for p in network.learning_rate_parameters()]).mean())
                _log(accelerator, output_dir, record, trackers)
                bar.set_postfix(loss=f"{record['train/loss']:.4g}")
                window, window_steps = {}, 0
            reason = 0  # 1: time budget spent, 2: early stop
            if config.eval_every and done % config.eval_every == 0 and done < config.max_steps:
                last_metrics, best, best_metrics, evals_without_improvement, early = _eval_step(
                    accelerator, network, model, batches, val_examples, config, output_dir, done,
                    examples_seen, elapsed, best, best_metrics, evals_without_improvement, trackers, run_description)
                last_eval = done
                reason = 2 if early else 0
            if config.max_time_s is not None and elapsed >= config.max_time_s:
                reason = max(reason, 1)
            if config.max_time_s is not None or config.early_stop_patience is not None:
                reason = int(accelerator.reduce(torch.tensor(float(reason), device=accelerator.device), "max"))
            if reason:
                stopped = "early_stop" if reason == 2 else "max_time"
                break
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.max_steps:
                _checkpoint(accelerator, output_dir, done, examples_seen, elapsed, best, best_metrics,
                            evals_without_improvement, run_description, config.keep_checkpoints)
        # final evaluation, checkpoint and artifact
        if val_examples and last_eval != done:
            last_metrics, best, best_metrics, evals_without_improvement, _ = _eval_step(
                accelerator, network, model, batches, val_examples, config, output_dir, done, examples_seen,
                elapsed, best, best_metrics, evals_without_improvement, trackers, run_description)
        _checkpoint(accelerator, output_dir, done, examples_seen, elapsed, best, best_metrics,
                    evals_without_improvement, run_description, config.keep_checkpoints)
    bar.close()
    if trackers:
        accelerator.end_training()
    network = accelerator.unwrap_model(wrapped)
    # only the main process evaluates, so only it knows the best network; every process loads the saved result
    selected = "best" if config.select == "best" and best is not None and accelerator.is_main_process else "last"
    if accelerator.is_main_process:
        final = network
        if selected == "best":  # best/ is gone when an earlier, completed run of this folder already moved it up
            best_dir = output_dir / "best" if (output_dir / "best").is_dir() else output_dir
            final = EditorNetwork.from_pretrained(best_dir)
        final.training_info = {
            **run_description, "steps": done, "examples_seen": examples_seen, "time_s": round(elapsed, 1),
            "stopped": stopped, "selected": selected,
            "selected_step": best_metrics.get("step") if selected == "best" else done,
            "final_metrics": {k: v for k, v in (best_metrics if selected == "best" else last_metrics).items()
                              if k.startswith("val/")},
            "mixed_precision": config.mixed_precision}
        final.save_pretrained(output_dir)
        if selected == "best":
            shutil.rmtree(output_dir / "best", ignore_errors=True)
    accelerator.wait_for_everyone()
    result_network = EditorNetwork.from_pretrained(output_dir)
    return TrainingResult(editor=result_network, output_dir=output_dir, steps=done, examples_seen=examples_seen,
                          time_s=elapsed, stopped=stopped, metrics=last_metrics, best_metrics=best_metrics,
                          data=data.describe())


def _comparable(run: Mapping[str, Any]) -> Any:
    """The parts of a run description that must match to resume (JSON round trip for stable comparison)."""
    keep = dict(run)
    keep["base_model"] = {k: v for k, v in dict(keep.get("base_model", {})).items() if k != "name_or_path"}
    config = dict(keep.get("config", {}))
    for name in ("max_steps", "max_time_s", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every",
                 "log_with", "early_stop_patience", "select", "eval_size"):
        config.pop(name, None)
    keep["config"] = config
    return json.loads(json.dumps(keep, default=str))


def _merge_statistics(accelerator: Any, network: MENDNetwork, statistics: dict[str, torch.Tensor]) -> None:
    """Merge this step's factor statistics of every process into the network's buffers (same on every rank)."""
    keys = list(network.transforms.keys())
    parts = []
    for key in keys:
        transform = network.transforms[key]
        packed = statistics.get(key)
        if packed is None:
            packed = torch.zeros(transform.statistics_size(), device=accelerator.device)
        parts.append(packed.to(accelerator.device, torch.float32))
    flat = torch.cat(parts)[None]
    gathered = accelerator.gather(flat) if accelerator.num_processes > 1 else flat
    for row in gathered:
        offset = 0
        for key in keys:
            transform = network.transforms[key]
            size = transform.statistics_size()
            transform.update_statistics(row[offset:offset + size])
            offset += size


def _eval_step(accelerator: Any, network: EditorNetwork, model: nn.Module, batches: _Batches,
               val_examples: Sequence[EditExample], config: EditorTrainingConfig, output_dir: Path, step: int,
               examples_seen: int, elapsed: float, best: float | None, best_metrics: dict[str, float],
               stale: int, trackers: list[str], run: Mapping[str, Any]
               ) -> tuple[dict[str, float], float | None, dict[str, float], int, bool]:
    metrics: dict[str, float] = {}
    stop = False
    if accelerator.is_main_process and val_examples:
        metrics = _evaluate(network, model, batches, val_examples, config, autocast=accelerator.autocast)
        metrics.update(step=step, examples=examples_seen, elapsed_s=round(elapsed, 3))
        _log(accelerator, output_dir, metrics, trackers)
        if best is None or metrics["val/loss"] < best:
            best, best_metrics, stale = metrics["val/loss"], dict(metrics), 0
            if config.select == "best":
                network.training_info = {**run, "steps": step, "selected_step": step}
                network.save_pretrained(output_dir / "best")
        else:
            stale += 1
        stop = config.early_stop_patience is not None and stale >= config.early_stop_patience
    accelerator.wait_for_everyone()
    return metrics, best, best_metrics, stale, stop


def _checkpoint(accelerator: Any, output_dir: Path, step: int, examples_seen: int, elapsed: float,
                best: float | None, best_metrics: Mapping[str, float], stale: int, run: Mapping[str, Any],
                keep: int) -> None:
    folder = output_dir / CHECKPOINTS / f"step-{step:08d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        state = {"step": step, "examples_seen": examples_seen, "elapsed_s": elapsed, "best": best,
                 "best_metrics": dict(best_metrics), "evals_without_improvement": stale, "run": _comparable(run)}
        (folder / STATE_NAME).write_text(json.dumps(state, indent=2))
        found = sorted((p for p in (output_dir / CHECKPOINTS).glob("step-*")), key=lambda p: int(p.name[5:]))
        for old in found[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _log(accelerator: Any, output_dir: Path, record: Mapping[str, Any], trackers: list[str]) -> None:
    if accelerator.is_main_process:
        with open(output_dir / METRICS_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(record)) + "\n")
    if trackers:
        accelerator.log({k: v for k, v in record.items() if k not in ("step",)}, step=int(record["step"]))


def _truncate_log(path: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run rewrites them); a fresh run starts a new log."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
