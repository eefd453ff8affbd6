"""The method registry: names → (config class, editor class), built-ins plus installed plugins.

Built-in methods register themselves when :mod:`hf_edit.methods` is imported.  Third-party methods register with
:func:`register_method`, or declare an entry point in the ``hf_edit.methods`` group (its object is a module that
registers on import, or a function that is called), so that a folder edited with a plugin loads in a fresh process::

    [project.entry-points."hf_edit.methods"]
    my_method = "my_package.my_method"
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from ..errors import ConfigError, UnknownMethodError
from .base import EditConfig, Editor, match_preset

__all__ = ["ENTRY_POINT_GROUP", "DEFAULT_METHOD", "NO_PRESET_METHOD", "default_method", "MethodEntry", "register_method", "available_methods",
           "get_method", "resolve_config", "config_from_dict", "MethodSpec"]

logger = logging.getLogger(__name__)

#: Entry-point group through which installed packages provide editing methods.
ENTRY_POINT_GROUP = "hf_edit.methods"
#: The method used when none is named.
DEFAULT_METHOD = "rome"
#: What ``method=None`` edits a model with when :data:`DEFAULT_METHOD` ships no preset for it (see
#: :func:`default_method`).
NO_PRESET_METHOD = "layerwise"

MethodSpec = str | EditConfig | Mapping[str, Any]


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name, config class and editor class."""

    name: str
    config_class: type[EditConfig]
    editor_class: type[Editor]

    @property
    def label(self) -> str:
        return self.config_class.label or self.name

    @property
    def description(self) -> str:
        return self.config_class.description


class _Registry:
    """Registered methods, and whether the entry points were read (once per process, lazily)."""

    def __init__(self) -> None:
        self.entries: dict[str, MethodEntry] = {}
        self.plugins_loaded = False

    def load_plugins(self) -> None:
        if self.plugins_loaded:
            return
        self.plugins_loaded = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = point.load()
                if callable(loaded) and not isinstance(loaded, type):
                    loaded()
            except Exception as err:  # a broken plugin must not break hf_edit
                logger.warning("Could not load the editing method plugin %r (%s): %s", point.name, point.value, err)


_REGISTRY = _Registry()


def register_method(config_class: type[EditConfig], editor_class: type[Editor], *,
                    aliases: tuple[str, ...] = (), replace: bool = False) -> None:
    """Register an editing method under ``config_class.method`` (and ``aliases``).

    Args:
        config_class: an :class:`EditConfig` subclass with a non-empty ``method`` name.
        editor_class: an :class:`Editor` subclass whose ``config_class`` accepts ``config_class``.
        aliases: further names (e.g. ``"ft+l"`` for FT with an L∞ constraint is its own config class instead).
        replace: allow replacing a method already registered under one of the names.

    Raises:
        ConfigError: the classes do not fit the contract, or a name is taken (and ``replace`` is false).
    """
    if not (isinstance(config_class, type) and issubclass(config_class, EditConfig)):
        raise ConfigError(f"config_class must be an EditConfig subclass, got {config_class!r}.")
    if not (isinstance(editor_class, type) and issubclass(editor_class, Editor)):
        raise ConfigError(f"editor_class must be an Editor subclass, got {editor_class!r}.")
    if not issubclass(config_class, editor_class.config_class):
        raise ConfigError(f"{editor_class.__name__}.config_class is {editor_class.config_class.__name__}, which "
                          f"{config_class.__name__} does not subclass.")
    names = (config_class.method, *aliases)
    if not config_class.method or any(not isinstance(n, str) or not n or n != n.lower() for n in names):
        raise ConfigError(f"{config_class.__name__}.method and aliases must be non-empty lowercase names, got "
                          f"{names!r}.")
    for name in names:
        existing = _REGISTRY.entries.get(name)
        if existing is not None and not replace and (existing.config_class, existing.editor_class) != (
                config_class, editor_class):
            raise ConfigError(f"An editing method named {name!r} is already registered "
                              f"({existing.config_class.__name__}); pass replace=True to replace it.")
    for name in names:
        _REGISTRY.entries[name] = MethodEntry(name, config_class, editor_class)


def available_methods() -> list[str]:
    """Names of every registered method (built-ins and installed plugins), sorted."""
    _REGISTRY.load_plugins()
    return sorted(_REGISTRY.entries)


def get_method(name: str) -> MethodEntry:
    """The registered method called ``name`` (case-insensitive).

    Raises:
        UnknownMethodError: no such method; the message lists the available ones.
    """
    key = str(name).lower()
    if key not in _REGISTRY.entries:
        _REGISTRY.load_plugins()
    if key not in _REGISTRY.entries:
        raise UnknownMethodError(
            f"Unknown editing method {name!r}; available: {', '.join(available_methods())}. A method from a plugin "
            "package must be installed (entry point group 'hf_edit.methods') or registered with "
            "hf_edit.methods.register_method.")
    return _REGISTRY.entries[key]


def config_from_dict(values: Mapping[str, Any], method: str | None = None) -> EditConfig:
    """A config from a dict holding its ``"method"`` name (or ``method``; else the default method)."""
    name = method or values.get("method") or DEFAULT_METHOD
    return get_method(str(name)).config_class.from_dict(values)


def default_method(model_id: str | None) -> str:
    """The method ``method=None`` means for ``model_id``: ROME (:data:`DEFAULT_METHOD`) with the reference's values
    when it ships a preset for the model (GPT-2 XL, GPT-J, …), else :data:`NO_PRESET_METHOD`.

    Why: with its documented default layer and the reference's hyperparameters, ROME edits a model it was not tuned
    for poorly (CounterFact fact model, single protocol: S 47.5); the layer-wise method needs no per-model tuning
    and scores S ≈ 80 there (README, "A default for models without a preset").
    """
    rome = get_method(DEFAULT_METHOD).config_class
    return DEFAULT_METHOD if match_preset(rome.presets, model_id) is not None else NO_PRESET_METHOD


def resolve_config(spec: MethodSpec | None, model_id: str | None = None) -> EditConfig:
    """Turn what a user passes as ``method=`` into a config.

    Args:
        spec: a method name (the preset for ``model_id``), a config object, or a dict (see
            :func:`config_from_dict`); ``None`` means :func:`default_method` of ``model_id``.
        model_id: the model's id or path, for presets.

    Raises:
        UnknownMethodError: the name is not registered.
        ConfigError: the spec is of another type or its values are invalid.
    """
    if spec is None:
        spec = default_method(model_id)
    if isinstance(spec, EditConfig):
        return spec
    if isinstance(spec, Mapping):
        return config_from_dict(spec)
    if isinstance(spec, str):
        entry = get_method(spec)
        return entry.config_class.preset(model_id)
    raise ConfigError(f"method must be a method name ({', '.join(available_methods())}), a config object or a "
                      f"dict, got {type(spec).__name__}.")
