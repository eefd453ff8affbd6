"""Integrated-gradients attribution of MLP neurons and knowledge-neuron selection (KN, Dai et al. 2022).

This is the attribution step of the KN editing method, as the EleutherAI ``knowledge-neurons`` code wrapped by ROME
computes it, for every architecture :func:`~hf_edit.architecture.find_layout` understands.

**Neurons.**  Neuron ``(l, j)`` is coordinate ``j`` of the MLP's intermediate vector at decoder layer ``l``, taken
at the **last prompt token**.  Its value slot is column ``j`` of the MLP output projection (row ``j`` of GPT-2's
``Conv1D`` weight), so the neuron index is the same in both neuron spaces below:

* ``neuron_space="pre_activation"`` (default, what the reference computes for GPT-2): the **input of the MLP's
  activation function**.  For GPT-2 this is the output of ``c_fc`` before GELU (``fc_in`` for GPT-J,
  ``dense_h_to_4h`` for GPT-NeoX/Falcon/BLOOM, ``fc1`` for OPT/Phi).  For gated MLPs (Llama, Mistral, Qwen, Gemma,
  OLMo2, Phi-3: ``down_proj(act(gate_proj x) * up_proj x)``) it is the **gate** pre-activation
  ``gate_proj x``: only the gate is scaled along the path, the ``up_proj`` factor keeps its actual value.
  Because ``act(0) = 0`` for SiLU/GELU, the zero baseline still switches the neuron off.
* ``neuron_space="post_activation"`` (the paper's definition): the **input of the MLP output projection**.  For
  GPT-2 this is ``GELU(c_fc x)``; for gated MLPs it is the gated product ``act(gate_proj x) * up_proj x``, the
  input of ``down_proj``.

**Score.**  For a target token ``t`` let ``F_t(ẑ)`` be the softmax probability of ``t`` at the last position when
the neuron vector of layer ``l`` at the last position is overwritten by ``ẑ`` (every other layer and position runs
as usual).  With ``z`` the vector of a clean forward pass and baseline ``b`` (zero by default)::

    S_l = (z - b) ⊙ (1/m) Σ_k ∇F_t(b + α_k (z - b))

``rule="reference"`` uses ``α_k = k/(m-1)``, ``k = 0..m-1`` (``linspace(0, 1, m)``: both ends, divided by ``m``),
as the reference code does; ``rule="paper"`` uses ``α_k = k/m``, ``k = 1..m`` (Dai et al.).  A target of ``T``
tokens gets the mean of the ``T`` single-token scores, every token being scored at the same last prompt position
(the ROME fork's behaviour: no teacher forcing).  By linearity this is the score of ``(1/T) Σ_i F_{t_i}``, which is
how it is computed (one backward pass serves all ``T`` tokens).  As the reference, the target is tokenised without
special tokens and **without** a leading space (``target_leading_space=True`` adds one).

**Batching.**  Each integration point of each layer is one row of a batch that repeats the prompt; a forward and a
backward pass handle ``batch_size`` rows at once (rows of different layers may share a chunk: each row is patched at
its own layer only).  Memory is bounded by ``batch_size``, not by ``steps`` or the number of layers; the result
does not depend on ``batch_size`` (up to floating-point rounding).

**Selection.**  :func:`coarse_neurons` keeps the neurons whose score exceeds a threshold (absolute, a fraction of
the global maximum, or a percentile); :func:`refine_neurons` keeps those found for more than a fraction ``p`` of
the prompts (Dai et al. / EleutherAI's refinement) or, with ``refine=False``, the union (ROME's wrapper).
:func:`find_knowledge_neurons` runs both over a list of prompts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .architecture import find_layout, max_positions, num_layers, resolve_target, unwrap_model
from .errors import ConfigError, InvalidRequestError, LayerOutOfRangeError, UnsupportedArchitectureError
from .hooks import as_batch_seq, frozen_eval, only_positions

__all__ = [
    "NeuronSpace",
    "RiemannRule",
    "Neuron",
    "AttributionResult",
    "KnowledgeNeurons",
    "integrated_gradients",
    "neuron_module_names",
    "coarse_neurons",
    "refine_neurons",
    "find_knowledge_neurons",
]

NeuronSpace = Literal["pre_activation", "post_activation"]
RiemannRule = Literal["reference", "paper"]
#: A neuron: (decoder layer index, coordinate in the MLP intermediate vector).
Neuron = tuple[int, int]

_SCORES_FILE = "attribution.safetensors"
_META_FILE = "attribution.json"
_HEADER_KEY = "hf_edit_attribution"
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AttributionResult:
    """Integrated-gradients scores of the MLP neurons of some decoder layers for one prompt and target.

    Attributes:
        scores: float32 CPU tensor ``(len(layers), d_ff)``; row ``i`` holds the scores of decoder layer
            ``layers[i]`` (all layers by default, so usually ``(n_layers, d_ff)``).
        layers: the decoder layer index of each row of :attr:`scores`.
        target_ids: the target token ids that were scored (their scores are averaged).
        prompt: the prompt text ("" when token ids were given).
        target: the target text ("" when token ids were given).
        steps: number of integration points ``m``.
        rule: ``"reference"`` or ``"paper"`` (see the module docstring).
        neuron_space: ``"pre_activation"`` or ``"post_activation"``.
        baseline: ``"zero"``, or ``"custom"`` when a baseline tensor was given.
        target_prob: mean probability of the target ids at the last prompt position, unpatched model (``None``
            when unknown).
        neuron_modules: the module whose input is the neuron vector, per row (its input is what is patched).
        model_name: ``config._name_or_path`` of the model, if any.
        model_type: ``config.model_type`` of the model, if any.
    """

    scores: torch.Tensor
    layers: tuple[int, ...]
    target_ids: tuple[int, ...]
    prompt: str = ""
    target: str = ""
    steps: int = 20
    rule: str = "reference"
    neuron_space: str = "pre_activation"
    baseline: str = "zero"
    target_prob: float | None = None
    neuron_modules: tuple[str, ...] = field(default_factory=tuple)
    model_name: str | None = None
    model_type: str | None = None

    def __post_init__(self) -> None:
        if self.scores.dim() != 2 or self.scores.shape[0] != len(self.layers):
            raise ValueError(f"scores must be (len(layers)={len(self.layers)}, d_ff); got {tuple(self.scores.shape)}.")

    @property
    def d_ff(self) -> int:
        """Number of neurons per layer."""
        return int(self.scores.shape[1])

    def layer_scores(self, layer: int) -> torch.Tensor:
        """The ``(d_ff,)`` scores of decoder layer ``layer``."""
        try:
            return self.scores[self.layers.index(layer)]
        except ValueError:
            raise LayerOutOfRangeError(f"Layer {layer} was not attributed; attributed layers: {self.layers}.") from None

    def top(self, k: int) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring neurons as ``(layer, neuron, score)``, best first."""
        if k <= 0:
            return []
        flat = self.scores.reshape(-1)
        values, indices = torch.topk(flat, min(k, flat.numel()))
        return [(self.layers[i // self.d_ff], i % self.d_ff, v) for v, i in zip(values.tolist(), indices.tolist(),
                                                                                strict=True)]

    def metadata(self) -> dict:
        """Everything but the scores, as JSON-serialisable values."""
        return {
            "format_version": _FORMAT_VERSION,
            "layers": list(self.layers),
            "target_ids": list(self.target_ids),
            "prompt": self.prompt,
            "target": self.target,
            "steps": self.steps,
            "rule": self.rule,
            "neuron_space": self.neuron_space,
            "baseline": self.baseline,
            "target_prob": self.target_prob,
            "neuron_modules": list(self.neuron_modules),
            "model_name": self.model_name,
            "model_type": self.model_type,
        }

    def save(self, path: str | Path) -> Path:
        """Write the scores and the metadata; returns the path written.

        ``path`` ending in ``.safetensors``: one file holding the ``scores`` tensor, with the metadata as JSON in
        the file's header (key ``hf_edit_attribution``).  Otherwise ``path`` is a directory (created if needed)
        that receives ``attribution.safetensors`` and ``attribution.json``.
        """
        from safetensors.torch import save_file

        scores = {"scores": self.scores.detach().to("cpu", torch.float32).contiguous()}
        target = Path(path)
        if target.suffix == ".safetensors":
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file(scores, str(target), metadata={"format": "pt", _HEADER_KEY: json.dumps(self.metadata())})
            return target
        target.mkdir(parents=True, exist_ok=True)
        save_file(scores, str(target / _SCORES_FILE), metadata={"format": "pt"})
        (target / _META_FILE).write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return target

    @classmethod
    def load(cls, path: str | Path) -> AttributionResult:
        """Read a result written by :meth:`save` (a ``.safetensors`` file or a directory)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        source = Path(path)
        if source.is_file():
            with safe_open(str(source), framework="pt") as handle:
                header = (handle.metadata() or {}).get(_HEADER_KEY)
                if header is None:
                    raise ValueError(f"{source} holds no hf_edit attribution metadata (header key {_HEADER_KEY!r}).")
                scores = handle.get_tensor("scores")
            meta = json.loads(header)
        else:
            meta = json.loads((source / _META_FILE).read_text())
            scores = load_file(str(source / _SCORES_FILE))["scores"]
        return cls(scores=scores, layers=tuple(meta["layers"]), target_ids=tuple(meta["target_ids"]),
                   prompt=meta["prompt"], target=meta["target"], steps=int(meta["steps"]), rule=meta["rule"],
                   neuron_space=meta["neuron_space"], baseline=meta["baseline"],
                   target_prob=meta.get("target_prob"), neuron_modules=tuple(meta["neuron_modules"]),
                   model_name=meta.get("model_name"), model_type=meta.get("model_type"))


# ----------------------------------------------------------------------------------------------------------------
# Where the neurons are
# ----------------------------------------------------------------------------------------------------------------

_ACTIVATION_MODULE_PREFIXES = ("transformers.activations", "torch.nn.modules.activation")


def _activation_child(mlp: nn.Module, mlp_name: str) -> str:
    """Name of the activation-function child of an MLP block (the only parameterless, non-dropout child that is an
    activation module)."""
    found = []
    for name, child in mlp.named_children():
        if any(True for _ in child.parameters()) or isinstance(child, nn.Dropout):
            continue
        module_path = type(child).__module__
        if module_path.startswith(_ACTIVATION_MODULE_PREFIXES) or "act" in name.lower() or "gelu" in name.lower():
            found.append(name)
    if len(found) != 1:
        raise UnsupportedArchitectureError(
            f"Cannot identify the activation function of '{mlp_name}': found {len(found)} candidates {found}. "
            "Use neuron_space='post_activation', or pass neuron_module_template='<path with {} for the layer>' "
            "naming the module whose input is the neuron vector.")
    return found[0]


def neuron_module_names(model: nn.Module, layers: Sequence[int], neuron_space: NeuronSpace = "pre_activation",
                        neuron_module_template: str | None = None) -> list[str]:
    """Full names of the modules whose **input** is the neuron vector of each layer.

    ``post_activation``: the MLP output projection (``find_layout``).  ``pre_activation``: the MLP's activation
    function (for gated MLPs the one applied to the gate).  ``neuron_module_template`` (``{}`` = layer) overrides
    both.
    """
    model = unwrap_model(model)
    if neuron_module_template is not None:
        return [neuron_module_template.format(layer) for layer in layers]
    if neuron_space == "post_activation":
        return [resolve_target(model, layer).name for layer in layers]
    if neuron_space != "pre_activation":
        raise ConfigError(f"neuron_space must be 'pre_activation' or 'post_activation', not {neuron_space!r}.")
    layout = find_layout(model)
    names = []
    for layer in layers:
        mlp_name = layout.mlp.format(layer)
        names.append(f"{mlp_name}.{_activation_child(model.get_submodule(mlp_name), mlp_name)}")
    return names


# ----------------------------------------------------------------------------------------------------------------
# Integrated gradients
# ----------------------------------------------------------------------------------------------------------------


def _alphas(steps: int, rule: RiemannRule) -> torch.Tensor:
    if rule == "reference":
        return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    if rule == "paper":
        return torch.arange(1, steps + 1, dtype=torch.float64) / steps
    raise ConfigError(f"rule must be 'reference' or 'paper', not {rule!r}.")


def _normalise_layers(model: nn.Module, layers: int | Sequence[int] | None) -> tuple[int, ...]:
    n = num_layers(model)
    if layers is None:
        return tuple(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if not -n <= int(layer) < n:
            raise LayerOutOfRangeError(f"Layer {layer} is out of range: the model has {n} layers (0..{n - 1}).")
        out.append(int(layer) % n)
    if not out:
        raise ConfigError("layers is empty.")
    if len(set(out)) != len(out):
        raise ConfigError(f"layers has duplicates: {list(layers)}.")
    return tuple(out)


def _encode(tokenizer: PreTrainedTokenizerBase | None, prompt: str | Sequence[int], target: str | Sequence[int],
            target_leading_space: bool) -> tuple[list[int], list[int]]:
    if isinstance(prompt, str) or isinstance(target, str):
        if tokenizer is None:
            raise ConfigError("A tokenizer is needed when the prompt or the target is text.")
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("The prompt is empty.")
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    else:
        prompt_ids = [int(i) for i in prompt]
    if isinstance(target, str):
        text = " " + target if target_leading_space and not target.startswith(" ") else target
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    else:
        ids = [int(i) for i in target]
    if not prompt_ids:
        raise InvalidRequestError(f"The prompt {prompt!r} tokenises to nothing.")
    if not ids:
        raise InvalidRequestError(f"The target {target!r} tokenises to nothing.")
    return prompt_ids, ids


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


@contextmanager
def _pre_hooks(modules: Sequence[nn.Module], hooks: Sequence) -> Iterator[None]:
    handles = []
    try:
        for module, hook in zip(modules, hooks, strict=True):
            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _target_prob(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean softmax probability of ``ids`` per row of ``logits`` (rows, vocab)."""
    return logits.float().softmax(-1)[:, ids].mean(-1)


def integrated_gradients(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    prompt: str | Sequence[int],
    target: str | Sequence[int],
    layers: int | Sequence[int] | None = None,
    steps: int = 20,
    batch_size: int | None = None,
    baseline: Literal["zero"] | torch.Tensor = "zero",
    *,
    neuron_space: NeuronSpace = "pre_activation",
    rule: RiemannRule = "reference",
    target_leading_space: bool = False,
    neuron_module_template: str | None = None,
) -> AttributionResult:
    """Integrated-gradients scores of every MLP neuron of ``layers`` for ``target`` after ``prompt``.

    See the module docstring for what a neuron is and the exact formula.  The model is not modified; it runs in
    eval mode with frozen parameters during the call (both restored afterwards).

    Args:
        model: a transformers causal LM (possibly wrapped by PEFT; active adapters take part in the forward pass).
        tokenizer: its tokenizer; may be ``None`` when ``prompt`` and ``target`` are token ids.
        prompt: the prompt text (tokenised with the tokenizer's special tokens, as the model sees it) or its ids.
            The neurons are read and patched at its last token.
        target: the ground-truth text (tokenised without special tokens and, as the reference, without a leading
            space) or its ids.  Several tokens: the scores are averaged over the tokens, each scored at the last
            prompt position.
        layers: decoder layers to attribute (negative indices count from the end); ``None``: all.
        steps: number of integration points ``m`` (the reference uses 20).
        batch_size: integration points per forward/backward pass (any positive number; memory grows with it);
            ``None``: ``steps``.
        baseline: ``"zero"`` (the reference), or a tensor of shape ``(d_ff,)`` or ``(len(layers), d_ff)`` in
            neuron space.
        neuron_space: ``"pre_activation"`` (reference) or ``"post_activation"`` (the paper's neurons; for gated
            MLPs the input of ``down_proj``).
        rule: ``"reference"`` (``α = linspace(0, 1, m)``) or ``"paper"`` (``α = k/m``, ``k = 1..m``).
        target_leading_space: prepend a space to a text target (the reference does not).
        neuron_module_template: name of the module whose input is the neuron vector, ``{}`` standing for the layer
            index; overrides ``neuron_space``'s module (for architectures hf_edit cannot analyse).

    Returns:
        An :class:`AttributionResult` with scores ``(len(layers), d_ff)``.

    Raises:
        ConfigError: bad ``steps``, ``batch_size``, ``rule``, ``neuron_space`` or baseline shape.
        LayerOutOfRangeError: a layer does not exist.
        InvalidRequestError: the prompt or target tokenises to nothing, or the prompt is too long.
        UnsupportedArchitectureError: the neuron module cannot be found, or it does not run exactly once per
            forward pass with a ``d_ff``-wide input.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}.")
    batch_size = steps if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
    alphas = _alphas(steps, rule)
    inner = unwrap_model(model)
    layer_list = _normalise_layers(inner, layers)
    prompt_ids, tgt_ids = _encode(tokenizer, prompt, target, target_leading_space)
    limit = max_positions(inner)
    if limit is not None and len(prompt_ids) > limit:
        raise InvalidRequestError(f"The prompt has {len(prompt_ids)} tokens; the model allows {limit}.")

    names = neuron_module_names(inner, layer_list, neuron_space, neuron_module_template)
    try:
        modules = [inner.get_submodule(name) for name in names]
    except AttributeError as exc:
        raise ConfigError(f"Neuron module not found: {exc}") from None
    d_ff = resolve_target(inner, layer_list[0]).in_features if neuron_module_template is None else None
    head = inner.get_output_embeddings()
    if head is None:
        raise UnsupportedArchitectureError(f"{type(inner).__name__} has no output embeddings (LM head).")

    device = _input_device(inner)
    n_tok = len(prompt_ids)
    last = n_tok - 1
    target_index = torch.tensor(tgt_ids, dtype=torch.long)

    with frozen_eval(inner):
        # Clean pass: the neuron vector of every requested layer at the last position, and the target probability.
        clean: list[list[torch.Tensor]] = [[] for _ in modules]

        def recorder(i: int):
            def hook(_module: nn.Module, args: tuple) -> None:
                clean[i].append(as_batch_seq(args[0], (1, n_tok))[0, last].detach().to("cpu", torch.float32))
            return hook

        ids = torch.tensor([prompt_ids], device=device)
        with torch.no_grad(), _pre_hooks(modules, [recorder(i) for i in range(len(modules))]), \
                only_positions(head, torch.tensor([0]), torch.tensor([last])):
            logits = inner(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        target_prob = float(_target_prob(logits[0], target_index.to(logits.device))[0])
        for name, seen in zip(names, clean, strict=True):
            if len(seen) != 1:
                raise UnsupportedArchitectureError(
                    f"Module '{name}' ran {len(seen)} times in one forward pass; attribution needs a module that runs "
                    "exactly once per layer. Pass neuron_module_template naming such a module.")
        z = torch.stack([seen[0] for seen in clean])  # (L, d_ff), float32 on the CPU
        width = z.shape[1] if d_ff is None else d_ff
        if z.shape[1] != width:
            raise UnsupportedArchitectureError(
                f"The input of '{names[0]}' has width {z.shape[1]}, but the MLP output projection takes {width}: "
                f"it is not the neuron vector. Use neuron_space='post_activation' or neuron_module_template.")
        base = _baseline(baseline, z)
        span = z - base

        # Patched passes: row r of a chunk sets layer rows_layer[r]'s neuron vector to base + α_r (z - base).
        n_layers = len(layer_list)
        row_layer = torch.arange(n_layers).repeat_interleave(steps)
        row_alpha = alphas.repeat(n_layers)
        grad_sum = torch.zeros(n_layers, width, dtype=torch.float64)
        for start in range(0, n_layers * steps, batch_size):
            chunk_layer = row_layer[start:start + batch_size]
            chunk_alpha = row_alpha[start:start + batch_size]
            rows = len(chunk_layer)
            points = (base[chunk_layer].double() + chunk_alpha[:, None] * span[chunk_layer].double()).float()
            points = points.to(device).requires_grad_(True)
            used = sorted(set(chunk_layer.tolist()))
            hooks = [_patcher(points, (chunk_layer == i).nonzero().squeeze(1), (rows, n_tok), last) for i in used]
            batch_ids = ids.repeat(rows, 1)
            with torch.enable_grad(), _pre_hooks([modules[i] for i in used], hooks), \
                    only_positions(head, torch.arange(rows), torch.full((rows,), last)):
                logits = inner(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids), use_cache=False).logits
                objective = _target_prob(logits[0], target_index.to(logits.device)).sum()
                (grad,) = torch.autograd.grad(objective, points)
            grad_sum.index_add_(0, chunk_layer, grad.detach().to("cpu", torch.float64))

    scores = (span.double() * grad_sum / steps).float()
    config = getattr(inner, "config", None)
    return AttributionResult(
        scores=scores, layers=layer_list, target_ids=tuple(tgt_ids),
        prompt=prompt if isinstance(prompt, str) else "", target=target if isinstance(target, str) else "",
        steps=steps, rule=rule, neuron_space=neuron_space if neuron_module_template is None else "custom",
        baseline="zero" if isinstance(baseline, str) else "custom", target_prob=target_prob,
        neuron_modules=tuple(names), model_name=getattr(config, "_name_or_path", None) or None,
        model_type=getattr(config, "model_type", None))


def _baseline(baseline: Literal["zero"] | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    if isinstance(baseline, str):
        if baseline != "zero":
            raise ConfigError(f"baseline must be 'zero' or a tensor, not {baseline!r}.")
        return torch.zeros_like(z)
    base = torch.as_tensor(baseline).detach().to("cpu", torch.float32)
    if base.shape == z.shape[1:]:
        base = base.expand_as(z)
    if base.shape != z.shape:
        raise ConfigError(f"baseline must have shape ({z.shape[1]},) or {tuple(z.shape)}; got {tuple(base.shape)}.")
    return base


def _patcher(points: torch.Tensor, rows: torch.Tensor, batch_shape: tuple[int, int], position: int):
    """Forward pre-hook that overwrites the module input at ``(rows, position)`` with ``points[rows]``."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        xb = as_batch_seq(x, batch_shape)
        index_rows = rows.to(xb.device)
        index_pos = torch.full_like(index_rows, position)
        patched = xb.index_put((index_rows, index_pos), points[rows.to(points.device)].to(xb.dtype))
        return (patched.reshape(x.shape), *args[1:])

    return hook


# ----------------------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------------------


def coarse_neurons(scores: AttributionResult | torch.Tensor, *, adaptive_threshold: float | None = None,
                   threshold: float | None = None, percentile: float | None = None,
                   layers: Sequence[int] | None = None) -> list[Neuron]:
    """Coarse knowledge-neuron selection: ``{(l, j) : S[l, j] > τ}`` (strict), sorted by (layer, neuron).

    Exactly one of:

    * ``adaptive_threshold`` ``a``: ``τ = a · max S``, the maximum of the **signed** scores over all attributed
      layers (ROME's wrapper uses 0.2, EleutherAI's default is 0.3);
    * ``threshold``: ``τ`` itself;
    * ``percentile`` (0-100): ``τ`` = numpy's percentile of the flattened scores.

    Args:
        scores: an :class:`AttributionResult`, or a ``(n_rows, d_ff)`` tensor.
        layers: the layer index of each row of a tensor (default ``0..n_rows-1``); ignored for a result.
    """
    if sum(x is not None for x in (adaptive_threshold, threshold, percentile)) != 1:
        raise ConfigError("Give exactly one of adaptive_threshold, threshold and percentile.")
    if isinstance(scores, AttributionResult):
        layer_ids, values = scores.layers, scores.scores
    else:
        values = torch.as_tensor(scores)
        if values.dim() != 2:
            raise ConfigError(f"scores must be 2-D (layers, d_ff); got shape {tuple(values.shape)}.")
        layer_ids = tuple(range(values.shape[0])) if layers is None else tuple(int(x) for x in layers)
        if len(layer_ids) != values.shape[0]:
            raise ConfigError(f"layers has {len(layer_ids)} entries for {values.shape[0]} rows of scores.")
    values = values.detach().cpu()
    if adaptive_threshold is not None:
        tau = float(values.max()) * adaptive_threshold
    elif threshold is not None:
        tau = float(threshold)
    else:
        if not 0 <= percentile <= 100:
            raise ConfigError(f"percentile must be within [0, 100], got {percentile}.")
        tau = float(np.percentile(values.double().numpy().reshape(-1), percentile))
    return [(layer_ids[int(r)], int(j)) for r, j in (values > tau).nonzero().tolist()]


def refine_neurons(neuron_sets: Sequence[Iterable[Neuron]], *, p: float = 0.5, refine: bool = True) -> list[Neuron]:
    """Combine the coarse neuron sets of ``n`` prompts that share a ground truth.

    ``refine=True`` (Dai et al. / EleutherAI ``get_refined_neurons``): keep a neuron found for more than ``p · n``
    prompts (strict; EleutherAI's default ``p = 0.5``).  ``refine=False`` (ROME's wrapper): the union, ``p`` unused.
    EleutherAI's ``negative_examples`` filter is not reproduced: as written it never removes a neuron.

    Returns the neurons sorted by (layer, neuron).
    """
    sets = [{(int(layer), int(j)) for layer, j in s} for s in neuron_sets]
    if not sets:
        raise ConfigError("refine_neurons needs at least one neuron set.")
    if not refine:
        return sorted(set().union(*sets))
    if not 0 <= p <= 1:
        raise ConfigError(f"p must be within [0, 1], got {p}.")
    counts = Counter(n for s in sets for n in s)
    return sorted(n for n, c in counts.items() if c > p * len(sets))


@dataclass(frozen=True, eq=False)
class KnowledgeNeurons:
    """The outcome of :func:`find_knowledge_neurons`.

    Attributes:
        neurons: the selected ``(layer, neuron)`` pairs, sorted.
        per_prompt: each prompt's coarse set.
        attributions: each prompt's :class:`AttributionResult`.
    """

    neurons: list[Neuron]
    per_prompt: list[list[Neuron]]
    attributions: list[AttributionResult]

    def by_layer(self) -> dict[int, list[int]]:
        """The selected neurons grouped by layer: ``{layer: [neuron, ...]}`` (layers and neurons ascending)."""
        grouped: dict[int, list[int]] = {}
        for layer, neuron in self.neurons:
            grouped.setdefault(layer, []).append(neuron)
        return grouped


def find_knowledge_neurons(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    target: str | Sequence[int],
    *,
    adaptive_threshold: float | None = 0.2,
    threshold: float | None = None,
    percentile: float | None = None,
    p: float = 0.4,
    refine: bool = False,
    layers: int | Sequence[int] | None = None,
    steps: int = 20,
    batch_size: int | None = None,
    neuron_space: NeuronSpace = "pre_activation",
    rule: RiemannRule = "reference",
    target_leading_space: bool = False,
    neuron_module_template: str | None = None,
) -> KnowledgeNeurons:
    """Attribute every prompt, select each one's coarse neurons, and combine them.

    The defaults are ROME's KN wrapper (``hparams/KN/gpt2-xl.json``): adaptive threshold 0.2, ``p = 0.4``,
    ``refine=False`` (union; with a single prompt, as ROME uses, refinement would change nothing).  Dai et al. /
    EleutherAI: ``adaptive_threshold=0.3, p=0.5, refine=True`` over paraphrases of the prompt.  Giving
    ``threshold`` or ``percentile`` replaces the adaptive threshold.  The remaining arguments go to
    :func:`integrated_gradients`.
    """
    if threshold is not None or percentile is not None:
        adaptive_threshold = None
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if prompt_list and isinstance(prompt_list[0], int):
        prompt_list = [prompt_list]  # a single prompt given as ids
    if not prompt_list:
        raise InvalidRequestError("No prompts given.")
    results = [integrated_gradients(model, tokenizer, prompt, target, layers, steps, batch_size,
                                    neuron_space=neuron_space, rule=rule, target_leading_space=target_leading_space,
                                    neuron_module_template=neuron_module_template)
               for prompt in prompt_list]
    per_prompt = [coarse_neurons(r, adaptive_threshold=adaptive_threshold, threshold=threshold,
                                 percentile=percentile) for r in results]
    return KnowledgeNeurons(neurons=refine_neurons(per_prompt, p=p, refine=refine), per_prompt=per_prompt,
                            attributions=results)
