"""Causal tracing: where in the network a causal LM recalls a fact (Meng et al., ROME §2).

Method (kmeng01/rome ``experiments/causal_trace.py``, spec §6):

1. **Clean run.**  The prompt is run once; the answer is the clean top next-token prediction (or a given target)
   and ``high_score`` is its probability.
2. **Corrupted runs.**  Gaussian noise ν·ε, ε ~ N(0, 1), is *added* to the token-embedding output at the subject's
   tokens, in ``samples`` independent draws.  ``low_score`` is the answer's probability averaged over the draws.
   The default ν is 3 × the standard deviation of the token embeddings of the subject(s) (each subject tokenised
   alone, without special tokens), the paper's ν = 3σ.
3. **Restoration.**  For a token t and a layer l one state of the corrupted run is set back to its clean value:
   the decoder layer's output (``kind="hidden"``), the MLP's output (``"mlp"``) or the attention's output
   (``"attn"``).  For ``"mlp"``/``"attn"`` a window of ``window`` = 10 layers is restored at once,
   l' ∈ [max(0, l − 5), min(L, l + 5)), as the reference does.  ``scores[t, l]`` is the answer's probability with
   that restoration, averaged over the same noise draws; the **indirect effect** is ``scores − low_score`` and the
   **total effect** ``high_score − low_score``.

Every (restoration, noise draw) pair is one row of a batched forward pass; the draw of sample s is the same in
every restoration (the reference recreates its seeded generator for every call).  Noise comes from
``numpy.random.RandomState(seed)``; ``seed=1`` reproduces the reference's draws exactly.  The clean states are
captured once from the clean run and written back by forward hooks, so a restoration may sit in any row of any
batch; rows of different facts are right-padded and each row's answer is read at its own last real token.

:func:`trace_dataset` averages the indirect effect at one token (the subject's last by default) over many facts;
:func:`choose_layers` turns an averaged MLP profile into a suggested edit layer (ROME's rule, §6.5), and
:func:`traced_profile` caches profiles under ``$HF_EDIT_CACHE/traces``.

States hooked (found from :func:`~hf_edit.architecture.find_layout`): the decoder layers; the MLP module (the MLP
output projection where the MLP module is the whole layer, as in OPT, or adds the residual itself, as in BLOOM);
the attention module (``self_attn``, ``attn``, ``attention`` or ``self_attention``; BLOOM: its output
projection).  Tuple outputs are restored in their first element.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .architecture import find_layout, num_layers, unwrap_model
from .errors import ConfigError, InvalidRequestError, SubjectNotFoundError, UnsupportedArchitectureError
from .files import atomic_write, hf_edit_cache_dir
from .hooks import as_batch_seq, eval_mode, forward_hook, only_positions
from .requests import EditRequest, as_request
from .tokens import encode_with_subject, pad_batch, pad_token_id, target_ids

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_WINDOW",
    "Kind",
    "TokenChoice",
    "TraceProfile",
    "TraceResult",
    "choose_layers",
    "noise_level",
    "restore_window",
    "scaled_window",
    "suggest_layers",
    "trace",
    "trace_dataset",
    "traced_profile",
    "traces_cache_dir",
]

Kind = Literal["hidden", "mlp", "attn"]
TokenChoice = Literal["subject_first", "subject_last", "first_after_subject", "last"]

#: Rows (restoration points × noise samples) per forward pass.
DEFAULT_BATCH_SIZE = 256
#: Layers restored at once for ``kind="mlp"``/``"attn"`` (the reference's window).
DEFAULT_WINDOW = 10
#: Version of the cached profile format (part of the cache key).
_CACHE_FORMAT = 1

_KINDS = ("hidden", "mlp", "attn")
_TOKEN_CHOICES = ("subject_first", "subject_last", "first_after_subject", "last")
_ATTN_CHILD_NAMES = ("self_attn", "attn", "attention", "self_attention")
#: Model types whose MLP / attention modules add the residual stream to their own output: hook the projection.
_RESIDUAL_INSIDE: dict[str, dict[str, str]] = {"bloom": {"mlp": "mlp.dense_4h_to_h", "attn": "self_attention.dense"}}
_STATE_NAMES = {"hidden": "hidden-state", "mlp": "MLP", "attn": "attention"}
_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_COLORS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------
def _nan_to_none(values: Any) -> Any:
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if isinstance(values, float) and math.isnan(values) else values


def _none_to_nan(values: Any) -> Any:
    if isinstance(values, list):
        return [_none_to_nan(v) for v in values]
    return float("nan") if values is None else values


def _float_or_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


@dataclass
class TraceResult:
    """The causal trace of one fact.

    Attributes:
        scores: restored probabilities of the answer, shape ``(n_tokens, n_layers)`` float32; ``scores[t, l]`` is
            the mean over noise samples with state ``kind`` restored at token t and layers ``restore_window(l)``.
            Tokens that were not traced (see ``positions`` of :func:`trace`) hold NaN.
        low_score: the answer's probability in the corrupted runs, nothing restored (mean over samples).
        high_score: the answer's probability in the clean run.
        input_ids: the prompt's token ids (special tokens included).
        tokens: each token decoded alone.
        subject_range: ``(first, end)``: the subject's tokens are ``first .. end - 1``.
        answer: the answer token, decoded.
        answer_id: its id.
        kind: ``"hidden"``, ``"mlp"`` or ``"attn"``.
        window: number of layers restored at once.
        noise: the noise scale ν.
        samples: number of noise draws.
        seed: seed of the noise.
        prompt: the prompt, subject filled in.
        subject: the subject.
    """

    scores: torch.Tensor
    low_score: float
    high_score: float
    input_ids: list[int]
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    kind: str
    window: int
    noise: float
    samples: int
    seed: int
    prompt: str = ""
    subject: str = ""

    @property
    def effect(self) -> torch.Tensor:
        """Indirect effect ``scores − low_score``, shape ``(n_tokens, n_layers)``."""
        return self.scores - self.low_score

    @property
    def total_effect(self) -> float:
        """``high_score − low_score``."""
        return self.high_score - self.low_score

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    @property
    def subject_last(self) -> int:
        """Index of the subject's last token."""
        return self.subject_range[1] - 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN as ``None``) that :meth:`from_dict` reads back."""
        return {
            "prompt": self.prompt, "subject": self.subject, "kind": self.kind, "window": self.window,
            "noise": self.noise, "samples": self.samples, "seed": self.seed, "answer": self.answer,
            "answer_id": self.answer_id, "low_score": self.low_score, "high_score": self.high_score,
            "input_ids": list(self.input_ids), "tokens": list(self.tokens),
            "subject_range": list(self.subject_range), "scores": _nan_to_none(self.scores.tolist()),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TraceResult:
        """Inverse of :meth:`to_dict`."""
        return cls(scores=torch.tensor(_none_to_nan(data["scores"]), dtype=torch.float32),
                   low_score=float(data["low_score"]), high_score=float(data["high_score"]),
                   input_ids=list(data["input_ids"]), tokens=list(data["tokens"]),
                   subject_range=tuple(data["subject_range"]), answer=data["answer"],
                   answer_id=int(data["answer_id"]), kind=data["kind"], window=int(data["window"]),
                   noise=float(data["noise"]), samples=int(data["samples"]), seed=int(data["seed"]),
                   prompt=data.get("prompt", ""), subject=data.get("subject", ""))

    def plot(self, path_or_ax: str | os.PathLike | Any | None = None, *, title: str | None = None,
             model_name: str | None = None) -> Any:
        """Draw the paper-style heatmap: tokens down, layers across, colour = restored probability.

        Subject tokens are marked with ``*``; the colour scale starts at ``low_score``.  Needs matplotlib (the
        ``bench`` extra); pyplot is not used, so no window opens and no global state changes.

        Args:
            path_or_ax: a file path (the figure is saved there), a matplotlib ``Axes`` to draw into, or ``None``.
            title: overrides the default title.
            model_name: named in the x-axis label.

        Returns:
            The ``Axes`` when one was given, else the ``Figure``.
        """
        Figure, is_axes = _matplotlib()
        ax = path_or_ax if is_axes(path_or_ax) else None
        size = (2.5 + 0.35 * self.n_layers, 1.2 + 0.3 * len(self.tokens))
        fig = ax.figure if ax is not None else Figure(figsize=size)
        if ax is None:
            ax = fig.subplots()
        scores = self.scores.numpy()
        mesh = ax.pcolormesh(np.ma.masked_invalid(scores), cmap=_CMAPS.get(self.kind, "Greys"),
                             vmin=self.low_score, edgecolors="none")
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(self.tokens))])
        first, end = self.subject_range
        ax.set_yticklabels([f"{tok!r}"[1:-1] + ("*" if first <= i < end else "") for i, tok in enumerate(self.tokens)])
        step = max(1, self.n_layers // 12)
        ax.set_xticks([i + 0.5 for i in range(0, self.n_layers, step)])
        ax.set_xticklabels([str(i) for i in range(0, self.n_layers, step)])
        where = f" within {model_name}" if model_name else ""
        state = _STATE_NAMES.get(self.kind, self.kind)
        if self.window == 1:
            ax.set_xlabel(f"single restored {state} layer{where}")
        else:
            ax.set_xlabel(f"center of interval of {self.window} restored {state} layers{where}")
        short = {"hidden": "state", "mlp": "MLP", "attn": "Attn"}.get(self.kind, self.kind)
        ax.set_title(title if title is not None else f"Impact of restoring {short} after corrupted input")
        bar = fig.colorbar(mesh, ax=ax)
        bar.set_label(f"p({self.answer.strip()})")
        return _finish(fig, ax, path_or_ax, is_axes)


@dataclass
class TraceProfile:
    """Indirect effects at one token per layer, over many facts (the paper's average indirect effect).

    Attributes:
        kind: the restored state.
        token: which token was restored (``"subject_last"`` by default).
        effects: per-fact indirect effects, shape ``(n, n_layers)`` float32.
        low_scores: per-fact corrupted probabilities, shape ``(n,)``.
        high_scores: per-fact clean probabilities, shape ``(n,)``.
        window, samples, noise, seed: the trace settings (``noise`` is the ν actually used).
        n_skipped: facts left out because the clean top prediction was not the true object.
        case_ids: identifiers of the facts kept (``None`` where a record had none).
        from_cache: set by :func:`traced_profile` when the profile was read from its cache (not serialised).
        cache_path: the cache file (not serialised).
    """

    kind: str
    token: str
    effects: torch.Tensor
    low_scores: torch.Tensor
    high_scores: torch.Tensor
    window: int
    samples: int
    noise: float
    seed: int
    n_skipped: int = 0
    case_ids: list[Any] = field(default_factory=list)
    from_cache: bool = field(default=False, compare=False)
    cache_path: Path | None = field(default=None, compare=False)

    @property
    def n(self) -> int:
        """Number of facts averaged."""
        return int(self.effects.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.effects.shape[1])

    @property
    def mean(self) -> torch.Tensor:
        """Average indirect effect per layer, shape ``(n_layers,)`` (NaN when no fact was kept)."""
        if self.n == 0:
            return torch.full((self.n_layers,), float("nan"))
        return self.effects.mean(0)

    @property
    def stderr(self) -> torch.Tensor:
        """Standard error of :attr:`mean` (sample std / √n; NaN for fewer than two facts)."""
        if self.n < 2:
            return torch.full((self.n_layers,), float("nan"))
        return self.effects.std(0) / math.sqrt(self.n)

    @property
    def ci95(self) -> torch.Tensor:
        """Half-width of the notebook's 95% interval, 1.96 · std / √n."""
        return 1.96 * self.stderr

    @property
    def total_effect(self) -> float:
        """Mean of ``high − low`` over the facts."""
        return float((self.high_scores - self.low_scores).mean()) if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN as ``None``) that :meth:`from_dict` reads back."""
        return {
            "kind": self.kind, "token": self.token, "window": self.window, "samples": self.samples,
            "noise": self.noise, "seed": self.seed, "n": self.n, "n_layers": self.n_layers,
            "n_skipped": self.n_skipped, "mean": _nan_to_none(self.mean.tolist()),
            "stderr": _nan_to_none(self.stderr.tolist()), "total_effect": _nan_to_none(self.total_effect),
            "effects": self.effects.tolist(), "low_scores": self.low_scores.tolist(),
            "high_scores": self.high_scores.tolist(), "case_ids": list(self.case_ids),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TraceProfile:
        """Inverse of :meth:`to_dict`."""
        n_layers = int(data["n_layers"])
        effects = torch.tensor(data["effects"], dtype=torch.float32).reshape(-1, n_layers)
        return cls(kind=data["kind"], token=data["token"], effects=effects,
                   low_scores=torch.tensor(data["low_scores"], dtype=torch.float32).reshape(-1),
                   high_scores=torch.tensor(data["high_scores"], dtype=torch.float32).reshape(-1),
                   window=int(data["window"]), samples=int(data["samples"]), noise=_float_or_nan(data["noise"]),
                   seed=int(data["seed"]), n_skipped=int(data.get("n_skipped", 0)),
                   case_ids=list(data.get("case_ids", [])))

    def plot(self, path_or_ax: str | os.PathLike | Any | None = None, *, title: str | None = None) -> Any:
        """Bar chart of the average indirect effect per layer with 95% intervals (needs matplotlib).

        Args:
            path_or_ax: a file path (the figure is saved there), a matplotlib ``Axes`` to draw into, or ``None``.
            title: overrides the default title.

        Returns:
            The ``Axes`` when one was given, else the ``Figure``.
        """
        Figure, is_axes = _matplotlib()
        ax = path_or_ax if is_axes(path_or_ax) else None
        fig = ax.figure if ax is not None else Figure(figsize=(max(4.0, 0.3 * self.n_layers + 2), 3.2))
        if ax is None:
            ax = fig.subplots()
        layers = list(range(self.n_layers))
        errors = np.nan_to_num(self.ci95.numpy())
        ax.bar(layers, self.mean.numpy(), yerr=errors, color=_COLORS.get(self.kind, "tab:gray"), capsize=2)
        ax.set_xlabel("layer" if self.window == 1 else f"center of {self.window}-layer window")
        ax.set_ylabel("average indirect effect")
        ax.set_xticks(layers[:: max(1, self.n_layers // 12)])
        state = {"hidden": "Hidden state", "mlp": "MLP", "attn": "Attention"}.get(self.kind, self.kind)
        ax.set_title(title if title is not None else f"{state} restored at {self.token.replace('_', ' ')} (n={self.n})")
        return _finish(fig, ax, path_or_ax, is_axes)


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.axes import Axes
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("Plotting needs matplotlib: pip install 'hf-edit[bench]' (or matplotlib).") from err
    return Figure, lambda obj: isinstance(obj, Axes)


def _finish(fig: Any, ax: Any, path_or_ax: Any, is_axes: Any) -> Any:
    if is_axes(path_or_ax):
        return ax
    fig.tight_layout()
    if path_or_ax is not None:
        fig.savefig(os.fspath(path_or_ax), dpi=120)
    return fig


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------
def _traced_modules(model: nn.Module, kind: str) -> list[nn.Module]:
    """The module of each layer whose output ``kind`` restores."""
    base = unwrap_model(model)
    layout = find_layout(base)
    n = num_layers(base)
    layers = [base.get_submodule(f"{layout.layers}.{i}") for i in range(n)]
    if kind == "hidden":
        return layers
    special = _RESIDUAL_INSIDE.get(getattr(base.config, "model_type", ""), {})
    if kind in special:
        return [layer.get_submodule(special[kind]) for layer in layers]
    if kind == "mlp":
        mlp_names = [layout.mlp.format(i) for i in range(n)]
        if all(name != f"{layout.layers}.{i}" for i, name in enumerate(mlp_names)):
            return [base.get_submodule(name) for name in mlp_names]
        return [base.get_submodule(layout.projection_name(i)) for i in range(n)]
    child = next((c for c in _ATTN_CHILD_NAMES if isinstance(getattr(layers[0], c, None), nn.Module)), None)
    if child is None:
        raise UnsupportedArchitectureError(
            f"Cannot find the attention module of {type(layers[0]).__name__} (looked for children named "
            f"{list(_ATTN_CHILD_NAMES)}); kind='attn' is not available for this model.")
    return [getattr(layer, child) for layer in layers]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def restore_window(layer: int, n_layers: int, window: int) -> range:
    """The layers restored for the cell of ``layer``: ``[max(0, l − w//2), min(L, l − w//2 + w))``.

    For the reference's window of 10 that is l − 5 … l + 4, clipped at the ends; for 1 it is the layer itself.
    """
    start = layer - window // 2
    return range(max(0, start), min(n_layers, start + window))


# --------------------------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Fact:
    prompt: str
    subject: str
    ids: tuple[int, ...]
    span: tuple[int, int]
    target_id: int | None = None
    true_ids: tuple[int, ...] = ()
    case_id: Any = None


def _split_prompt(prompt: str, subject: str) -> tuple[str, str]:
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise InvalidRequestError(f"The prompt {prompt!r} must contain at most one '{{}}'.")
        prefix, suffix = prompt.split("{}")
        return prefix, suffix
    at = prompt.find(subject)
    if at < 0:
        raise SubjectNotFoundError(f"The subject {subject!r} does not occur in the prompt {prompt!r}.")
    return prompt[:at], prompt[at + len(subject):]


def _target_id(tokenizer: Any, target: str | int | None) -> int | None:
    if target is None or isinstance(target, int):
        return target
    return target_ids(tokenizer, target)[0]


def _true_ids(tokenizer: Any, true: str | None) -> tuple[int, ...]:
    """First-token ids accepted as "the model knows the fact": the object with a leading space (as edit targets
    are tokenised) or as written."""
    if true is None or not true.strip():
        return ()
    ids = {target_ids(tokenizer, true)[0]}
    raw = tokenizer(true, add_special_tokens=False)["input_ids"]
    if raw:
        ids.add(raw[0])
    return tuple(sorted(ids))


def _make_fact(tokenizer: Any, prompt: str, subject: str, target: str | int | None = None,
               true: str | None = None, case_id: Any = None) -> _Fact:
    if not subject:
        raise InvalidRequestError("The subject is empty.")
    prefix, suffix = _split_prompt(prompt, subject)
    enc = encode_with_subject(tokenizer, prefix, subject, suffix)
    return _Fact(prompt=prefix + subject + suffix, subject=subject, ids=tuple(enc.ids),
                 span=(enc.subject_first, enc.subject_last + 1), target_id=_target_id(tokenizer, target),
                 true_ids=_true_ids(tokenizer, true), case_id=case_id)


def _record_fact(tokenizer: Any, record: EditRequest | Mapping[str, Any]) -> _Fact:
    """A fact from an EditRequest, a reference/EasyEdit dict, a CounterFact record or a ROME ``known`` record
    (``prompt`` with the subject filled in, ``subject``, ``attribute``)."""
    if isinstance(record, Mapping) and "attribute" in record and "target_new" not in record:
        return _make_fact(tokenizer, record["prompt"], record["subject"], true=record["attribute"],
                          case_id=record.get("known_id", record.get("case_id")))
    request = as_request(record)
    return _make_fact(tokenizer, request.prompt, request.subject, true=request.target_true, case_id=request.case_id)


def _position(fact: _Fact, token: str) -> int:
    first, end = fact.span
    return {"subject_first": first, "subject_last": end - 1, "first_after_subject": min(end, len(fact.ids) - 1),
            "last": len(fact.ids) - 1}[token]


def noise_level(model: nn.Module, tokenizer: Any, subjects: Iterable[str], factor: float = 3.0) -> float:
    """``factor`` × the standard deviation of all elements of the subjects' token embeddings (the reference's
    ``--noise_level s3`` for ``factor=3``).

    Each subject is tokenised alone without special tokens (the reference tokenises it as a whole input, which
    for tokenizers that add a BOS would include the BOS embedding).  The embeddings are the input-embedding
    module's output, where the noise is added.
    """
    ids = [i for s in subjects for i in tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise InvalidRequestError("The subjects tokenise to nothing: cannot estimate the embedding std; pass noise=.")
    embed = unwrap_model(model).get_input_embeddings()
    with torch.no_grad():
        vectors = embed(torch.tensor([ids], device=embed.weight.device))
    return float(factor * vectors.double().std().item())


# --------------------------------------------------------------------------------------------------------------
# The batched engine
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _GroupTrace:
    """Traces of a group of facts, before they become results."""

    sums: torch.Tensor      # (G, T, L) summed restored probabilities
    counts: torch.Tensor    # (G, T, L) number of samples summed
    low: torch.Tensor       # (G,)
    high: torch.Tensor      # (G,)
    answer_ids: list[int]
    top_ids: list[int]


class _Tracer:
    """Runs the clean pass and the batched corrupted passes of a group of facts."""

    def __init__(self, model: nn.Module, tokenizer: Any, kind: str, samples: int, window: int, seed: int,
                 batch_size: int) -> None:
        if kind not in _KINDS:
            raise ConfigError(f"kind must be one of {_KINDS}, got {kind!r}.")
        if samples < 1:
            raise ConfigError(f"samples must be at least 1, got {samples}.")
        if window < 1:
            raise ConfigError(f"window must be at least 1, got {window}.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        self.model, self.kind, self.samples, self.window, self.seed = model, kind, samples, window, seed
        self.batch_size = batch_size
        base = unwrap_model(model)
        self.embed = base.get_input_embeddings()
        self.head = base.get_output_embeddings()
        if self.head is None:
            raise UnsupportedArchitectureError(f"{type(base).__name__} has no output embeddings (LM head).")
        self.modules = _traced_modules(model, kind)
        self.n_layers = len(self.modules)
        self.device = self.embed.weight.device
        self.pad_id = pad_token_id(tokenizer)

    def _noise_draws(self, n_tokens: int, noise: float) -> torch.Tensor:
        """ν·ε for every sample, shape (samples, n_tokens, d), float64 on the CPU (RandomState(seed) draws)."""
        dim = int(self.embed.weight.shape[-1])
        draws = np.random.RandomState(self.seed).randn(self.samples, n_tokens, dim)
        return torch.from_numpy(draws) * noise

    def run(self, facts: Sequence[_Fact], noise: float, positions: Sequence[Sequence[int]],
            keep: Sequence[Callable[[int], bool]] | None = None) -> _GroupTrace:
        """Trace the facts at the given token positions (per fact).  ``keep`` decides, after the clean pass
        (given its clean top prediction), whether a fact's corrupted passes run."""
        G, L, S = len(facts), self.n_layers, self.samples
        batch = pad_batch([f.ids for f in facts], self.pad_id)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        T = ids.shape[1]
        lengths = mask.sum(1)
        clean, probs = self._clean(ids, mask, lengths)
        top_ids = probs.argmax(-1).tolist()
        answer_ids = [f.target_id if f.target_id is not None else top for f, top in zip(facts, top_ids)]
        high = probs[torch.arange(G), torch.tensor(answer_ids)]
        selected = [True] * G if keep is None else [bool(k(top)) for k, top in zip(keep, top_ids)]

        # Per-fact noise on the padded grid: (G, S, T, d).
        dim = int(self.embed.weight.shape[-1])
        noise_grid = torch.zeros(G, S, T, dim, dtype=torch.float64)
        for g, fact in enumerate(facts):
            first, end = fact.span
            noise_grid[g, :, first:end] = self._noise_draws(end - first, noise)

        # Rows: (fact, sample, layer, token); layer = -1 is the baseline with nothing restored.
        rows = [(g, s, -1, -1) for g in range(G) if selected[g] for s in range(S)]
        rows += [(g, s, layer, t) for g in range(G) if selected[g] for t in positions[g]
                 for layer in range(L) for s in range(S)]
        table = torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
        answers = torch.tensor(answer_ids, dtype=torch.long)
        row_probs = torch.cat([self._corrupted(table[i: i + self.batch_size], ids, mask, lengths, clean, noise_grid,
                                               answers) for i in range(0, len(table), self.batch_size)]) \
            if len(table) else torch.zeros(0)

        base = table[:, 2] < 0
        low = torch.zeros(G, dtype=torch.float64).index_add_(0, table[base, 0], row_probs[base].double()) / S
        sums = torch.zeros(G * T * L, dtype=torch.float64)
        counts = torch.zeros(G * T * L, dtype=torch.float64)
        cells = table[~base]
        flat = (cells[:, 0] * T + cells[:, 3]) * L + cells[:, 2]
        sums.index_add_(0, flat, row_probs[~base].double())
        counts.index_add_(0, flat, torch.ones(len(flat), dtype=torch.float64))
        low[~torch.tensor(selected, dtype=torch.bool)] = float("nan")
        return _GroupTrace(sums.reshape(G, T, L), counts.reshape(G, T, L), low, high.double(), answer_ids, top_ids)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Next-token probabilities at each row's last real token, (B, V) float32 on the logits' device."""
        rows = torch.arange(len(ids))
        with only_positions(self.head, rows, lengths - 1):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        return out.logits[0].float().softmax(-1)

    def _clean(self, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Clean states of every traced module, each (G, T, d), and the clean probabilities (G, V)."""
        captured: list[torch.Tensor | None] = [None] * self.n_layers
        shape = (ids.shape[0], ids.shape[1])

        def recorder(index: int) -> Any:
            def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                # clone: some layers (Falcon) add to the MLP output in place afterwards.
                captured[index] = as_batch_seq(_first(output), shape).detach().clone()
            return hook

        with ExitStack() as stack:
            for index, module in enumerate(self.modules):
                stack.enter_context(forward_hook(module, recorder(index)))
            probs = self._forward(ids, mask, lengths).cpu()
        if any(c is None for c in captured):
            raise UnsupportedArchitectureError("A traced module did not run during the forward pass.")
        return captured, probs  # type: ignore[return-value]

    def _corrupted(self, table: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor,
                   clean: list[torch.Tensor], noise_grid: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """The answer's probability for each row of ``table`` (fact, sample, layer, token)."""
        fact, sample, layer, token = table.unbind(1)
        B, T = len(table), ids.shape[1]
        shape = (B, T)
        add = noise_grid[fact, sample]  # (B, T, d)

        def corrupt(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + add.to(device=output.device, dtype=output.dtype)

        start = (layer - self.window // 2).clamp(min=0)
        end = (layer - self.window // 2 + self.window).clamp(max=self.n_layers)
        restored = layer >= 0

        def restorer(index: int, rows: torch.Tensor) -> Any:
            toks = token[rows]
            values = clean[index][fact[rows], toks]

            def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
                state = _first(output)
                patched = as_batch_seq(state, shape).clone()
                patched[rows.to(patched.device), toks.to(patched.device)] = values.to(patched.device, patched.dtype)
                return _replace_first(output, patched.reshape(state.shape))
            return hook

        with ExitStack() as stack:
            stack.enter_context(forward_hook(self.embed, corrupt))
            for index, module in enumerate(self.modules):
                rows = torch.nonzero(restored & (start <= index) & (index < end)).reshape(-1)
                if len(rows):
                    stack.enter_context(forward_hook(module, restorer(index, rows)))
            probs = self._forward(ids[fact], mask[fact], lengths[fact])
        return probs.gather(1, answers[fact].to(probs.device)[:, None])[:, 0].cpu()


def _resolve(kind: str, window: int | None) -> int:
    if kind not in _KINDS:
        raise ConfigError(f"kind must be one of {_KINDS}, got {kind!r}.")
    return (1 if kind == "hidden" else DEFAULT_WINDOW) if window is None else int(window)


def scaled_window(n_layers: int) -> int:
    """The reference's window scaled to the model's depth: 10 layers of GPT-2 XL's 48, i.e.
    ``max(1, min(10, round(10 · n_layers / 48)))`` (48 layers: 10; 28: 6; 12: 2; 6: 1).

    The fixed window of 10 covers every layer of a model with 10 layers or fewer, and then every MLP cell restores
    the same states and the profile cannot tell layers apart; :func:`suggest_layers` uses this window instead.
    """
    return max(1, min(DEFAULT_WINDOW, round(DEFAULT_WINDOW * n_layers / 48)))


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------
def trace(model: nn.Module, tokenizer: Any, prompt: str, subject: str, target: str | int | None = None, *,
          kind: Kind = "hidden", samples: int = 10, noise: float | None = None, window: int | None = None,
          seed: int = 0, positions: Sequence[int] | None = None,
          batch_size: int = DEFAULT_BATCH_SIZE) -> TraceResult:
    """Causal trace of one fact: the answer's probability with one state restored at each (token, layer).

    Args:
        model: a transformers causal LM (or a ``PeftModel``; its adapters stay active).
        tokenizer: its fast tokenizer.
        prompt: the prompt with ``{}`` where the subject goes, or with the subject already in it (its first
            occurrence is corrupted).
        subject: the subject whose tokens are corrupted.
        target: the answer whose probability is measured: a string (its first token, a leading space added as for
            edit targets) or a token id.  ``None``: the clean top prediction (the reference's choice).
        kind: ``"hidden"`` (decoder-layer output), ``"mlp"`` or ``"attn"`` (module outputs).
        samples: number of noise draws.
        noise: noise scale ν; ``None``: 3 × the std of the subject's token embeddings (:func:`noise_level`).
            :func:`trace_dataset` computes it over all subjects, as the reference does; pass that value here to
            match.
        window: layers restored at once, centred as in :func:`restore_window`; ``None``: 1 for ``"hidden"``, 10 for
            ``"mlp"``/``"attn"`` (the reference's settings).
        seed: seed of the noise (``numpy.random.RandomState``); 1 gives the reference's draws.
        positions: token indices to trace (default: all); the other rows of ``scores`` are NaN.
        batch_size: rows (restoration points × samples) per forward pass.

    Returns:
        A :class:`TraceResult`.

    Raises:
        SubjectNotFoundError: the subject is not in the prompt.
        ConfigError: invalid kind, samples, window or batch size.
    """
    width = _resolve(kind, window)
    fact = _make_fact(tokenizer, prompt, subject, target)
    if noise is None:
        noise = noise_level(model, tokenizer, [subject])
    n_tokens = len(fact.ids)
    chosen = list(range(n_tokens)) if positions is None else sorted({int(p) % n_tokens for p in positions})
    tracer = _Tracer(model, tokenizer, kind, samples, width, seed, batch_size)
    with torch.no_grad(), eval_mode(model):
        group = tracer.run([fact], float(noise), [chosen])
    counts = group.counts[0, :n_tokens]
    scores = torch.where(counts > 0, group.sums[0, :n_tokens] / counts.clamp(min=1), float("nan")).float()
    return TraceResult(scores=scores, low_score=float(group.low[0]), high_score=float(group.high[0]),
                       input_ids=list(fact.ids), tokens=[tokenizer.decode([i]) for i in fact.ids],
                       subject_range=fact.span, answer=tokenizer.decode([group.answer_ids[0]]),
                       answer_id=group.answer_ids[0], kind=kind, window=width, noise=float(noise), samples=samples,
                       seed=seed, prompt=fact.prompt, subject=subject)


def _as_records(records: Any) -> list[Any]:
    if isinstance(records, (EditRequest, Mapping)):
        return [records]
    return list(records)


def trace_dataset(model: nn.Module, tokenizer: Any, records: Iterable[EditRequest | Mapping[str, Any]], *,
                  kind: Kind = "mlp", samples: int = 10, noise: float | None = None, window: int | None = None,
                  seed: int = 0, token: TokenChoice = "subject_last", require_correct: bool = True,
                  batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> TraceProfile:
    """Average indirect effect per layer at one token over many facts.

    Each fact is traced at one token only (the subject's last by default: every layer, ``samples`` draws), which
    costs ``samples · (n_layers + 1)`` rows per fact; rows of several facts share forward passes.

    Args:
        model, tokenizer: as for :func:`trace`.
        records: :class:`~hf_edit.EditRequest` objects, reference/EasyEdit dicts, CounterFact records or ROME
            ``known_1000`` records (``prompt``, ``subject``, ``attribute``).  The fact traced is the true one: the
            answer is the clean top prediction.
        kind, samples, window, seed, batch_size: as for :func:`trace`.
        noise: ν; ``None``: 3 × the std of the token embeddings of all the records' subjects (reference ``s3``).
        token: the restored token: ``"subject_last"``, ``"subject_first"``, ``"first_after_subject"`` (the last
            token if the subject ends the prompt) or ``"last"``.
        require_correct: skip facts whose clean top prediction is not the first token of the true object
            (``target_true``/``attribute``, with or without a leading space; the reference's filter compares the
            decoded answer with the whole attribute).  Records without a true object are always kept.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`TraceProfile` (per-fact effects, mean and standard error per layer).
    """
    from tqdm.auto import tqdm

    width = _resolve(kind, window)
    if token not in _TOKEN_CHOICES:
        raise ConfigError(f"token must be one of {_TOKEN_CHOICES}, got {token!r}.")
    facts = [_record_fact(tokenizer, r) for r in _as_records(records)]
    if not facts:
        raise InvalidRequestError("trace_dataset needs at least one record.")
    if noise is None:
        noise = noise_level(model, tokenizer, [f.subject for f in facts])
    tracer = _Tracer(model, tokenizer, kind, samples, width, seed, batch_size)
    per_fact = samples * (tracer.n_layers + 1)
    group_size = max(1, batch_size // per_fact)
    effects, lows, highs, case_ids, skipped = [], [], [], [], 0
    with torch.no_grad(), eval_mode(model), tqdm(total=len(facts), desc=f"tracing {kind}", unit="fact",
                                                 disable=not progress) as bar:
        for start in range(0, len(facts), group_size):
            group_facts = facts[start: start + group_size]
            keep = [(lambda top, f=f: not require_correct or not f.true_ids or top in f.true_ids)
                    for f in group_facts]
            positions = [[_position(f, token)] for f in group_facts]
            group = tracer.run(group_facts, float(noise), positions, keep)
            for g, fact in enumerate(group_facts):
                if math.isnan(float(group.low[g])):
                    skipped += 1
                    continue
                t = positions[g][0]
                scores = group.sums[g, t] / group.counts[g, t]
                effects.append((scores - group.low[g]).float())
                lows.append(float(group.low[g]))
                highs.append(float(group.high[g]))
                case_ids.append(fact.case_id)
            bar.update(len(group_facts))
    n_layers = tracer.n_layers
    return TraceProfile(kind=kind, token=token,
                        effects=torch.stack(effects) if effects else torch.zeros(0, n_layers),
                        low_scores=torch.tensor(lows, dtype=torch.float32),
                        high_scores=torch.tensor(highs, dtype=torch.float32), window=width, samples=samples,
                        noise=float(noise), seed=seed, n_skipped=skipped, case_ids=case_ids)


def choose_layers(profile: TraceProfile | Sequence[float] | torch.Tensor, n_layers: int = 1) -> tuple[int, ...]:
    """Suggest edit layers from an averaged MLP profile (ROME's rule, spec §6.5).

    * ``n_layers == 1``: the layer with the largest average indirect effect of restoring MLP states at the
      subject's last token (ROME's layer choice: the peak of the MLP-window trace).
    * ``n_layers = n > 1``: the ``n`` contiguous layers whose effects have the largest sum (a MEMIT-style range).

    Ties go to the **earliest** layer / window (the lowest index), so the choice is deterministic and prefers the
    earlier of equally good layers.  Layers whose effect is NaN count as −∞.  This is a suggestion derived from
    the trace, not a guarantee of edit quality: the paper confirms it with a layer sweep.

    Args:
        profile: a :class:`TraceProfile` (a warning is issued unless it is an MLP profile at the subject's last
            token) or the per-layer mean effects directly.
        n_layers: number of contiguous layers to return.

    Returns:
        The chosen layer indices, ascending.

    Raises:
        ConfigError: ``n_layers`` is not between 1 and the number of layers, or every effect is NaN.
    """
    if isinstance(profile, TraceProfile):
        if profile.kind != "mlp" or profile.token != "subject_last":
            warnings.warn(f"choose_layers' rule is defined on MLP profiles at the subject's last token; this one is "
                          f"kind={profile.kind!r}, token={profile.token!r}.", stacklevel=2)
        values = profile.mean
    else:
        values = torch.as_tensor(profile, dtype=torch.float64)
    values = values.double().reshape(-1)
    total = len(values)
    if isinstance(profile, TraceProfile) and profile.window > 1 and profile.window > total // 2:
        warnings.warn(f"The profile's restoration window ({profile.window} layers) spans more than half of the "
                      f"model's {total} layers: neighbouring cells restore nearly the same states. Trace with a "
                      "smaller window (scaled_window(n_layers)).", stacklevel=2)
    if not 1 <= n_layers <= total:
        raise ConfigError(f"n_layers must be between 1 and {total}, got {n_layers}.")
    if torch.isnan(values).all():
        raise ConfigError("The profile has no finite effect (no fact was traced); cannot choose a layer.")
    values = torch.nan_to_num(values, nan=float("-inf"))
    best_start, best_sum = 0, float("-inf")
    for start in range(total - n_layers + 1):
        window_sum = float(values[start: start + n_layers].sum())
        if window_sum > best_sum:  # strict: ties keep the earliest window
            best_start, best_sum = start, window_sum
    return tuple(range(best_start, best_start + n_layers))


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------
def traces_cache_dir() -> Path:
    """``$HF_EDIT_CACHE/traces`` if set, else ``$HF_HOME/hf_edit/traces`` (``~/.cache/huggingface`` by default)."""
    return hf_edit_cache_dir("traces")


def _records_fingerprint(facts: Sequence[_Fact]) -> str:
    """sha256 of what the trace reads from each record: the filled prompt, its token ids (so the tokenizer is
    covered), the subject's span, and the id of the true object's first token."""
    digest = hashlib.sha256()
    for fact in facts:
        digest.update(json.dumps([fact.prompt, fact.subject, list(fact.ids), list(fact.span), list(fact.true_ids),
                                  fact.case_id], default=str).encode())
    return digest.hexdigest()


def _adapter_fingerprint(model: nn.Module) -> str | None:
    """sha256 of the LoRA parameters and active adapters of a ``PeftModel`` (which
    :func:`~hf_edit.stats.model_fingerprint` leaves out on purpose), or ``None`` for a plain model."""
    lora = sorted((name, p) for name, p in model.named_parameters() if "lora_" in name)
    if not lora:
        return None
    digest = hashlib.sha256(repr(getattr(model, "active_adapters", None)).encode())
    for name, tensor in lora:
        flat = tensor.detach().reshape(-1).to("cpu").contiguous()
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data)))


def traced_profile(model: nn.Module, tokenizer: Any, records: Iterable[EditRequest | Mapping[str, Any]], *,
                   kind: Kind = "mlp", samples: int = 10, noise: float | None = None, window: int | None = None,
                   seed: int = 0, token: TokenChoice = "subject_last", require_correct: bool = True,
                   batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                   cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> TraceProfile:
    """:func:`trace_dataset`, computed once and cached as JSON.

    The cache key covers the model's weights (:func:`hf_edit.stats.model_fingerprint`, plus the LoRA weights of a
    ``PeftModel``, which are active while tracing), the records (prompts, their token ids, subjects, true objects),
    ``kind``, ``samples``, ``noise``, ``window``, ``seed``, ``token`` and ``require_correct``.  A file that cannot be read is recomputed (with a warning) and overwritten.

    Args:
        cache_dir: folder of the cache files; default :func:`traces_cache_dir`.
        refresh: recompute even when a cached profile exists.
        Others: as for :func:`trace_dataset`.

    Returns:
        The profile; ``from_cache`` says whether it was read from the cache and ``cache_path`` where it lives.
    """
    from .stats import model_fingerprint

    width = _resolve(kind, window)
    record_list = _as_records(records)
    facts = [_record_fact(tokenizer, r) for r in record_list]
    description = {"format": _CACHE_FORMAT, "model": model_fingerprint(model),
                   "adapters": _adapter_fingerprint(model), "records": _records_fingerprint(facts),
                   "n_records": len(facts), "kind": kind, "samples": samples,
                   "noise": None if noise is None else float(noise), "window": width, "seed": seed, "token": token,
                   "require_correct": require_correct}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir).expanduser() if cache_dir is not None else traces_cache_dir()
    path = path / f"{kind}_{key[:40]}.json"
    if path.exists() and not refresh:
        try:
            data = json.loads(path.read_text())
            if data.get("key") != key:
                raise ValueError("key mismatch")
            profile = TraceProfile.from_dict(data["profile"])
            profile.from_cache, profile.cache_path = True, path
            return profile
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            warnings.warn(f"Ignoring unreadable trace cache {path} ({err}); recomputing.", stacklevel=2)
    profile = trace_dataset(model, tokenizer, record_list, kind=kind, samples=samples, noise=noise, window=width,
                            seed=seed, token=token, require_correct=require_correct, batch_size=batch_size,
                            progress=progress)
    _write_json(path, {"key": key, "description": description, "profile": profile.to_dict()})
    profile.cache_path = path
    return profile


def suggest_layers(model: nn.Module, tokenizer: Any, records: Iterable[EditRequest | Mapping[str, Any]],
                   n_layers: int = 1, *, window: int | None = None, **kwargs: Any) -> tuple[int, ...]:
    """The layers to edit suggested by the (cached) MLP trace at the subject's last token:
    ``choose_layers(traced_profile(model, tokenizer, records, kind="mlp", window=window, **kwargs), n_layers)``.

    Args:
        model, tokenizer, records: as for :func:`trace_dataset`; the records should be facts the model knows
            (records whose clean top prediction is not their true object are skipped).
        n_layers: number of contiguous layers (1 for ROME; a MEMIT-style range otherwise).
        window: MLP restoration window; ``None``: :func:`scaled_window` of the model's depth (10 for 48 layers,
            as the reference; smaller for shallower models, where a window of 10 would cover every layer).
        kwargs: passed to :func:`traced_profile` (``samples``, ``noise``, ``seed``, ``cache_dir``, ``progress``,
            ...); ``kind`` and ``token`` are fixed by the rule.

    Raises:
        ConfigError: no record was kept (the profile is empty), or ``n_layers`` is out of range.
    """
    for fixed in ("kind", "token"):
        if fixed in kwargs:
            raise ConfigError(f"suggest_layers fixes {fixed}; call traced_profile and choose_layers to change it.")
    if window is None:
        window = scaled_window(num_layers(unwrap_model(model)))
    profile = traced_profile(model, tokenizer, records, kind="mlp", token="subject_last", window=window, **kwargs)
    return choose_layers(profile, n_layers)
