"""The contract every editing method implements: a config, an editor, and the updates it returns.

A method is three things (compare PEFT's tuners: a ``PeftConfig`` subclass with its stored type, a tuner model and
its layers):

* an :class:`EditConfig` subclass: a frozen dataclass of hyperparameters, named by the class variable
  :attr:`EditConfig.method`, with presets by model id, ``from_dict``/``from_json`` that read the reference
  implementation's hyperparameter files, and ``to_dict`` that records the method name;
* an :class:`Editor` subclass, built as ``Editor(config, context)``, that validates requests and computes
  :class:`Update` objects (ΔW = B A of one module) without modifying the model;
* a registration, :func:`hf_edit.methods.register_method`, or an entry point in the ``hf_edit.methods`` group.

:class:`~hf_edit.EditedModel` turns updates into PEFT LoRA adapters, saves and loads them, removes them and
evaluates them, whatever the method: nothing outside a method's own folder knows its name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from ..adapters import LoraFactors
from ..architecture import EditTarget, num_layers, resolve_target, unwrap_model
from ..errors import ConfigError, HfEditError, StatisticsMismatchError
from ..requests import EditRequest
from ..tokens import target_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..stats import SecondMomentStats

__all__ = ["AUTO", "EditConfig", "Editor", "EditContext", "Update", "StatisticsProvider", "match_preset", "model_id_of"]

C = TypeVar("C", bound="EditConfig")


def model_id_of(model: nn.Module | None) -> str | None:
    """The id or path a transformers model was loaded from (``config.name_or_path``), if any."""
    if model is None:
        return None
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    name = getattr(inner, "name_or_path", None) or getattr(config, "name_or_path", None) \
        or getattr(config, "_name_or_path", None)
    return str(name) if name else None


def match_preset(presets: Mapping[str, Mapping[str, Any]], model_id: str | None) -> Mapping[str, Any] | None:
    """The preset for ``model_id``: the one rule every method uses.

    A preset key matches when it equals the id, or when the last path component of the id equals the last path
    component of the key (case-insensitive).  So ``"gpt2-xl"``, ``"openai-community/gpt2-xl"``,
    ``"/models/gpt2-xl"`` and ``"foo/gpt2-xl"`` all get the ``"gpt2-xl"`` preset, and ``"foo/gpt-j-6B"`` gets
    ``"EleutherAI/gpt-j-6B"``'s.
    """
    if not model_id:
        return None
    name = str(model_id).rstrip("/").lower()
    last = name.rsplit("/", 1)[-1]
    for key, values in presets.items():
        if name == key.lower() or last == key.lower().rsplit("/", 1)[-1]:
            return values
    return None


#: ``layers=AUTO``: the layers are chosen by causal tracing of the requests (see :class:`EditConfig`).
AUTO = "auto"


def _normalise_layers(layers: Any) -> tuple[int, ...] | str | None:
    if layers is None or layers == AUTO:
        return layers
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        return (int(layers),)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ConfigError(f"layers must be an int, a sequence of ints or 'auto', got {layers!r}.")
    values = tuple(layers)
    if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in values):
        raise ConfigError(f"layers must be integers, got {layers!r}.")
    if not values:
        raise ConfigError("layers is empty.")
    return tuple(int(x) for x in values)


def _field_docs(cls: type) -> dict[str, str]:
    """``name: text`` of the ``Args:`` section of the class docstrings (subclass first)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = klass.__doc__ or ""
        if "Args:" not in text:
            continue
        section = text.split("Args:", 1)[1]
        current = None
        for line in section.splitlines():
            match = re.match(r"^\s{4,8}([a-zA-Z_][\w, ]*):\s*(.*)$", line)
            if match and len(line) - len(line.lstrip()) <= 8:
                current = [n.strip() for n in match.group(1).split(",")]
                for name in current:
                    docs[name] = match.group(2).strip()
            elif current and line.strip():
                for name in current:
                    docs[name] = (docs[name] + " " + line.strip()).strip()
            elif not line.strip() and current:
                current = None
    return docs


@dataclass(frozen=True)
class EditConfig:
    """Base class of every method's hyperparameters (a frozen dataclass).

    Subclasses set the class variables :attr:`method` (the registry name), :attr:`label` and :attr:`description`
    (shown in model cards and ``hf-edit methods``), :attr:`presets` (hyperparameters by model id, matched with
    :func:`match_preset`) and :attr:`reference_only_keys` (keys of the reference's hyperparameter files that
    hf_edit accepts and ignores, e.g. module paths it finds by itself).  Subclasses validate their values in
    :meth:`validate`, and may override :meth:`default_layers` (used when neither ``layers`` nor a preset is given).

    Args:
        layers: decoder layer(s) to edit (0-based; negative counts from the end).  ``None``: the preset for the
            model id, else :meth:`default_layers`.  ``"auto"``: chosen by causal tracing when the config is first
            used by an ``EditedModel``: the averaged MLP indirect effect at the subject's last token over the
            requests of that call (facts whose true object the model does not predict are left out) picks the
            peak layer, or the best window of :attr:`auto_layer_count` contiguous layers
            (:func:`hf_edit.tracing.choose_layers`); the trace is cached per model.  To trace other facts, pass
            ``layers=hf_edit.tracing.suggest_layers(model, tokenizer, facts)``.
        rewrite_module_tmp: module path with ``{}`` for the layer (e.g. ``"transformer.h.{}.mlp.c_proj"``);
            default: the MLP output projection found by architecture discovery.
    """

    method: ClassVar[str] = ""
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    reference_only_keys: ClassVar[frozenset[str]] = frozenset()
    #: How many contiguous layers ``layers="auto"`` chooses (1 for ROME; a window for MEMIT-style methods).
    auto_layer_count: ClassVar[int] = 1

    layers: tuple[int, ...] | str | None = None
    rewrite_module_tmp: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _normalise_layers(self.layers))
        if self.rewrite_module_tmp is not None and not isinstance(self.rewrite_module_tmp, str):
            raise ConfigError(f"rewrite_module_tmp must be a string, got {self.rewrite_module_tmp!r}.")
        self.validate()

    def validate(self) -> None:
        """Check the values; raise :class:`~hf_edit.errors.ConfigError` naming the bad one.  Override."""

    # -- names ---------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The registry name the edits made with this config are recorded under (default :attr:`method`)."""
        return type(self).method

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each field's documentation, from the ``Args:`` sections of the class docstrings."""
        names = {f.name for f in fields(cls)}
        return {k: v for k, v in _field_docs(cls).items() if k in names}

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def preset(cls: type[C], model_id: str | None) -> C:
        """The shipped hyperparameters for ``model_id`` (see :func:`match_preset`), else the defaults."""
        values = match_preset(cls.presets, model_id)
        return cls(**dict(values)) if values is not None else cls()

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Build from a dict: :meth:`to_dict`'s output or the reference's hyperparameter file.

        A ``"method"`` key is ignored (:func:`hf_edit.methods.config_from_dict` dispatches on it); keys in
        :attr:`reference_only_keys` are ignored; any other unknown key is an error.
        """
        values = dict(values)
        values.pop("method", None)  # the registry dispatches on it
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known - set(cls.reference_only_keys)
        if unknown:
            label = cls.label or cls.method or cls.__name__
            raise ConfigError(f"Unknown {label} hyperparameters: {sorted(unknown)}. Known: {sorted(known)}.")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        """Load a JSON hyperparameter file (hf_edit's or the reference's)."""
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"No such hyperparameter file: {path}.") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}.") from err
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict with the method name; :meth:`from_dict` reads it back.

        Values JSON cannot hold (e.g. a ``datasets.Dataset``) are recorded by a description.
        """
        values: dict[str, Any] = {"method": self.name}
        for f in fields(self):
            values[f.name] = _jsonable(getattr(self, f.name))
        return values

    def resolved_for(self: C, model: nn.Module) -> C:
        """This config with ``layers`` filled in: the preset's layers for the model's id, else
        :meth:`default_layers`."""
        if self.layers == AUTO:
            raise ConfigError("layers='auto' is resolved by EditedModel from the requests of an edit; outside it, "
                              "pass layers=hf_edit.tracing.suggest_layers(model, tokenizer, facts).")
        if self.layers is not None:
            return self
        preset = match_preset(type(self).presets, model_id_of(model))
        if preset is not None and preset.get("layers") is not None:
            return replace(self, layers=_normalise_layers(preset["layers"]))
        return replace(self, layers=self.default_layers(model))

    def default_layers(self, model: nn.Module) -> tuple[int, ...]:
        """Layers for a model with no preset: ``num_hidden_layers // 3`` (the early-middle MLP where causal
        tracing locates factual recall).  Override per method."""
        return (num_layers(unwrap_model(model)) // 3,)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    fingerprint = getattr(value, "_fingerprint", "")
    return f"<{type(value).__name__} {fingerprint}>".replace(" >", ">")


@dataclass
class Update:
    """ΔW = B A (and Δb) of one module, as an editor computes it.

    Everything is in the **Linear orientation** (y = W x + B A x), whatever the module's storage layout (GPT-2's
    ``Conv1D`` stores its weight transposed; :class:`~hf_edit.EditedModel` takes care of that).

    Attributes:
        module: full name of the edited module (e.g. ``"transformer.h.17.mlp.c_proj"``).
        A: (rank, in_features), float32.
        B: (out_features, rank), float32.
        bias: Δb, (out_features,), or ``None``.
        requests: the requests this update carries (empty: the requests of the ``compute`` call).
        layer: the decoder layer of the module, if known.
        info: JSON-serialisable diagnostics, saved with the edit.
        stackable: ``True`` when the update may share one adapter with earlier stackable updates of the same
            method (their factors are concatenated, ranks add up: ROME, MEMIT); ``False`` gives every ``compute``
            call an adapter of its own (FT's dense deltas).
        tensors: tensors kept with the edit in this session only (not saved), e.g. ROME's key and value.
    """

    module: str
    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None
    requests: tuple[EditRequest, ...] = ()
    layer: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    stackable: bool = True
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"Update factors must be A (r, in) and B (out, r); got A {tuple(self.A.shape)}, "
                             f"B {tuple(self.B.shape)}.")
        if self.bias is not None and self.bias.shape != (self.B.shape[0],):
            raise ValueError(f"Update bias must have shape ({self.B.shape[0]},), got {tuple(self.bias.shape)}.")
        self.requests = tuple(self.requests)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def factors(self) -> LoraFactors:
        """The factors as float32 CPU tensors, as the adapter stores them."""
        bias = None if self.bias is None else self.bias.detach().float().cpu()
        return LoraFactors(A=self.A.detach().float().cpu(), B=self.B.detach().float().cpu(), bias=bias)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B A, float32, Linear orientation (out_features, in_features)."""
        return self.B.float() @ self.A.float()


class StatisticsProvider:
    """Second-moment statistics C = E[kkᵀ] of module inputs on the base model, shared by every method.

    Statistics come from the explicit ones given by the user (one object, or a mapping from layer index or module
    name), else from the on-disk cache, else they are computed (and cached).  Within one edited model each is
    loaded once and reused by every method that asks for the same (module, data set, sample count, dtype,
    length).

    Args:
        model: the model (edits may be active; statistics are always computed on the base model).
        tokenizer: its tokenizer.
        explicit: statistics given by the user.
        base_context: zero-argument callable giving a context under which ``model`` is the base model.
        revision: the Hub revision the model was loaded from (part of the cache key).
        progress: show a progress bar while computing.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *,
                 explicit: SecondMomentStats | Mapping[int | str, SecondMomentStats] | None = None,
                 base_context: Callable[[], AbstractContextManager] | None = None, revision: str | None = None,
                 progress: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.explicit = explicit
        self.base_context = base_context or nullcontext
        self.revision = revision
        self.progress = progress
        self._loaded: dict[tuple, SecondMomentStats] = {}

    def get(self, target: EditTarget, *, dataset: Any, n_samples: int, dtype: str = "float64",
            max_length: int | None = None) -> SecondMomentStats:
        """Statistics of ``target``'s input (explicit, cached or computed), checked against its shape.

        Raises:
            StatisticsMismatchError: explicit statistics were given, but not for this module, or of the wrong
                size.
        """
        from ..stats import load_or_compute_stats

        explicit = self._explicit_for(target)
        if explicit is not None:
            explicit.check_compatible(target)
            return explicit
        key = self._key(target, dataset, n_samples, dtype, max_length)
        if key not in self._loaded:
            stats: SecondMomentStats = load_or_compute_stats(
                self.model, self.tokenizer, target, dataset=dataset, n_samples=n_samples, dtype=dtype,
                max_length=max_length, base_context=self.base_context, progress=self.progress,
                model_revision=self.revision)
            stats.check_compatible(target)
            self._loaded[key] = stats
        return self._loaded[key]

    def prefetch(self, targets: Sequence[EditTarget], *, dataset: Any, n_samples: int, dtype: str = "float64",
                 max_length: int | None = None) -> None:
        """Make the statistics of several modules ready at once (e.g. every layer of a MEMIT edit): those not yet
        loaded nor given explicitly are read from the cache or computed together, in one pass over the texts
        (:func:`~hf_edit.stats.load_or_compute_all_stats`); :meth:`get` then returns them."""
        from ..stats import load_or_compute_all_stats

        if self.explicit is not None:
            return
        keyed = {self._key(t, dataset, n_samples, dtype, max_length): t for t in targets}
        todo = {key: target for key, target in keyed.items() if key not in self._loaded}
        if len(todo) < 2:
            return
        computed = load_or_compute_all_stats(
            self.model, self.tokenizer, list(todo.values()), dataset=dataset, n_samples=n_samples, dtype=dtype,
            max_length=max_length, base_context=self.base_context, progress=self.progress,
            model_revision=self.revision)
        for (key, target), stats in zip(todo.items(), computed):
            stats.check_compatible(target)
            self._loaded[key] = stats

    @staticmethod
    def _key(target: EditTarget, dataset: Any, n_samples: int, dtype: str, max_length: int | None) -> tuple:
        dataset_key = dataset if isinstance(dataset, (str, type(None))) else \
            f"{type(dataset).__name__}:{getattr(dataset, '_fingerprint', id(dataset))}"
        return (target.name, dataset_key, n_samples, dtype, max_length)

    def _explicit_for(self, target: EditTarget) -> SecondMomentStats | None:
        from ..stats import SecondMomentStats

        given = self.explicit
        if given is None or isinstance(given, SecondMomentStats):
            return given
        for key in (target.name, target.layer, str(target.layer)):
            if key in given:
                return given[key]
        raise StatisticsMismatchError(
            f"Statistics were given for {sorted(map(str, given))} but not for {target.name} (layer {target.layer}). "
            "Pass statistics for every edited module, or none to compute them.")


@dataclass
class EditContext:
    """What an :class:`~hf_edit.EditedModel` offers every editor.

    Attributes:
        model: the causal LM as edited so far (all edits active; may hold PEFT LoRA layers).  Editors must not
            modify it (or must restore it bit for bit).
        tokenizer: its (fast) tokenizer.
        base_context: zero-argument callable giving a context manager under which ``model`` computes as the
            unedited base model.
        revision: the Hub revision the base model was loaded from (``None`` for the default or a local model).
        progress: show progress bars.
        stats: the shared second-moment statistics provider.
        edits: the edits applied so far (read-only view), e.g. to reuse ROME's context templates.
        state: this method's persisted state (a dict of JSON values and tensors, saved with the edit folder and
            restored on load).  Editors replace values (never mutate a stored tensor in place), so that a failed
            ``edit`` call can restore the previous state.
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    base_context: Callable[[], AbstractContextManager] = nullcontext
    revision: str | None = None
    progress: bool = False
    stats: StatisticsProvider | None = None
    edits: Sequence[Any] = ()
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stats is None:
            self.stats = StatisticsProvider(self.model, self.tokenizer, base_context=self.base_context,
                                            revision=self.revision, progress=self.progress)

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *,
                  stats: SecondMomentStats | Mapping[int | str, SecondMomentStats] | None = None,
                  **kwargs: Any) -> EditContext:
        """A context for a plain model (no edits yet), e.g. to run an editor directly."""
        context = cls(model, tokenizer, **kwargs)
        context.stats.explicit = stats
        return context


class Editor(ABC):
    """Computes updates for one method on one model.

    Built as ``Editor(config, context)``: ``config`` is resolved for the model (``layers`` filled in).

    Class attributes:
        config_class: the method's :class:`EditConfig` subclass.
        joint: ``True`` when all requests of one ``edit`` call are computed together in one :meth:`compute`
            (FT, MEMIT); ``False`` when :meth:`compute` is called once per request, each on the model with the
            previous requests' updates applied (ROME).
    """

    config_class: ClassVar[type[EditConfig]] = EditConfig
    joint: ClassVar[bool] = False

    def __init__(self, config: EditConfig, context: EditContext) -> None:
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                              f"{type(config).__name__}.")
        self.context = context
        self.config = config.resolved_for(context.model)

    @property
    def model(self) -> nn.Module:
        return self.context.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.context.tokenizer

    def targets(self) -> list[EditTarget]:
        """The modules the config names, in ascending layer order (a module named twice counts once).

        Raises:
            LayerOutOfRangeError: a layer does not exist.
            UnsupportedArchitectureError, ConfigError: the module cannot be found.
        """
        found: dict[str, EditTarget] = {}
        n = num_layers(unwrap_model(self.model))
        for layer in sorted(self.config.layers, key=lambda x: x + n if x < 0 else x):
            target = resolve_target(self.model, layer, self.config.rewrite_module_tmp)
            found.setdefault(target.name, target)
        return list(found.values())

    def validate(self, request: EditRequest) -> None:
        """Fail fast, before any computation, if ``request`` cannot be edited (e.g. its target does not
        tokenise, its subject is not found).  The default checks the target and the modules; extend it."""
        target_ids(self.tokenizer, request.target_new)
        self.targets()

    def prepare(self) -> None:
        """Load or compute what the editor reads before its first request (e.g. second-moment statistics).

        Called by :meth:`hf_edit.EditedModel.prepare`; under a multi-process group (data-parallel evaluation)
        every process calls it together, before the work is shared out, because computing statistics is
        collective.  The default does nothing; editors that read statistics load them here."""

    @abstractmethod
    def compute(self, requests: Sequence[EditRequest]) -> list[Update]:
        """Compute the updates for ``requests`` on the model as it is now, without modifying it.

        For a non-joint editor ``requests`` holds one request.  Raise an :mod:`hf_edit.errors` exception (e.g.
        :class:`~hf_edit.errors.OptimizationError`) when the update cannot be computed: nothing is applied then.
        """

    def compute_each(self, requests: Sequence[EditRequest]) -> list[list[Update] | HfEditError]:
        """The updates each request would get **alone** on the model as it is now (nothing is modified): one list
        per request, or the error that request raised.

        The evaluation's single protocol uses it.  The default calls :meth:`compute` once per request; an editor
        may compute independent requests together (ROME optimises their v* in one batch), with the same result
        per request.
        """
        results: list[list[Update] | HfEditError] = []
        for request in requests:
            try:
                self.validate(request)
                results.append(self.compute([request]))
            except ConfigError:
                raise
            except HfEditError as err:
                results.append(err)
        return results


def config_fields(config_class: type[EditConfig]) -> list[dataclasses.Field]:
    """The dataclass fields of a config class (for CLIs and help texts)."""
    return list(fields(config_class))
