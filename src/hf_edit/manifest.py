"""The edit manifest ``hf_edit.json``: its format, its one reader, and the method state saved beside it.

An edit folder holds PEFT adapters (the first at the root, later ones in subfolders named after them), the manifest
and, when a method keeps state (e.g. AlphaEdit's projector and key cache), ``hf_edit_state.safetensors``.

Format ``hf_edit.edits.v2``::

    {"format": "hf_edit.edits.v2", "hf_edit_version": ..., "base_model": ..., "base_model_revision": ...,
     "adapters": ["default", "edit_1", ...],
     "edits": [{"method", "module", "layer", "rank", "adapter", "group", "batch", "stackable",
                "requests": [...], "config": {"method": ..., ...}, "info": {...}}, ...],
     "state": {"<method>": {"<key>": <JSON value>, ...}}}

A tensor of a method's state is stored in the safetensors file as ``"<method>/<key>"`` and listed in the manifest as
``{"__tensor__": "<method>/<key>"}``.  Folders written before v2 (``hf_edit.edits.v1``: no ``batch``, ``stackable``
or ``state``) are read too: edits of one group with the same requests form one batch, and an edit is stackable
unless its method computes requests jointly (in v1 only FT/FT+L did, and they were never stacked).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from .adapters import ADAPTER_NAME, LoraFactors
from .edit import Edit
from .errors import EditFolderError, UnknownMethodError
from .files import atomic_write
from .requests import as_request

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "STATE_NAME", "ManifestSource", "read_manifest", "is_edit_folder", "edits_from_manifest",
           "save_state", "load_state"]

#: File written next to the adapter, listing the edits it holds.
MANIFEST_NAME = "hf_edit.json"
MANIFEST_FORMAT = "hf_edit.edits.v2"
_LEGACY_FORMATS = ("hf_edit.edits.v1",)
#: Tensors of the methods' persisted state.
STATE_NAME = "hf_edit_state.safetensors"
_TENSOR_KEY = "__tensor__"


class _HasManifest(Protocol):
    def manifest(self) -> dict[str, Any]: ...


#: What :func:`read_manifest` reads: an ``EditedModel`` (anything with ``manifest()``), a dict, a folder or a file.
ManifestSource = _HasManifest | Mapping[str, Any] | str | os.PathLike


def is_edit_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding an ``hf_edit.json``."""
    return Path(path, MANIFEST_NAME).is_file()


def read_manifest(source: ManifestSource) -> dict[str, Any]:
    """The manifest, in the current format, of an edit folder, a ``hf_edit.json`` path, a dict, or an object with a
    ``manifest()`` method (an ``EditedModel``).

    Raises:
        EditFolderError: the file is missing or unreadable, or in an unknown format.
    """
    if isinstance(source, Mapping):
        manifest = dict(source)
        where = "the manifest"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        path = path / MANIFEST_NAME if path.is_dir() else path
        where = str(path)
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise EditFolderError(f"{path} does not exist: {Path(source)} is not an hf_edit edit folder.") from err
        except (OSError, json.JSONDecodeError) as err:
            raise EditFolderError(f"Cannot read the edit manifest {path}: {err}") from err
    elif callable(getattr(source, "manifest", None)):
        return source.manifest()
    else:
        raise TypeError(f"Expected an EditedModel, a manifest dict or a path, got {type(source).__name__}.")
    if not isinstance(manifest, dict):
        raise EditFolderError(f"{where} is not a JSON object.")
    return _upgraded(manifest, where)


def _upgraded(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    version = manifest.get("format")
    if version == MANIFEST_FORMAT:
        return manifest
    if version not in _LEGACY_FORMATS:
        raise EditFolderError(f"{where} has format {version!r}, expected {MANIFEST_FORMAT!r}; it was written by a "
                              "newer hf_edit or is not an hf_edit manifest.")
    from .methods import get_method

    batches: dict[tuple[int, str], int] = {}
    entries = []
    for entry in manifest.get("edits", []):
        entry = dict(entry)
        key = (int(entry.get("group", 0)), json.dumps(entry.get("requests"), sort_keys=True))
        entry["batch"] = batches.setdefault(key, len(batches))
        try:
            entry["stackable"] = not get_method(entry["method"]).editor_class.joint
        except UnknownMethodError:
            entry["stackable"] = False
        entries.append(entry)
    return dict(manifest, format=MANIFEST_FORMAT, edits=entries, state=manifest.get("state", {}))


def edits_from_manifest(manifest: Mapping[str, Any], factors: Mapping[str, Mapping[str, LoraFactors]],
                        where: Any = "the folder") -> list[Edit]:
    """Pair the manifest's entries with the adapters' factor columns, checking that they agree.

    Args:
        manifest: a manifest in the current format (:func:`read_manifest`).
        factors: adapter name → module name → the adapter's (stacked) factors.

    Raises:
        EditFolderError: the adapters' ranks do not match the manifest.
    """
    entries = manifest.get("edits", [])
    ranks: dict[tuple[str, str], list[int]] = {}
    for entry in entries:
        ranks.setdefault((entry.get("adapter", ADAPTER_NAME), entry["module"]), []).append(int(entry["rank"]))
    found = {(a, m): f.rank for a, modules in factors.items() for m, f in modules.items()}
    expected = {key: sum(r) for key, r in ranks.items()}
    if found != expected:
        raise EditFolderError(f"The adapters in {where} do not match their manifest: (adapter, module) ranks "
                              f"{found} in the adapters, {expected} in {MANIFEST_NAME}.")
    parts = {key: iter(factors[key[0]][key[1]].split(r)) for key, r in ranks.items()}
    return [Edit(requests=tuple(as_request(r) for r in e["requests"]), method=e["method"], module=e["module"],
                 layer=e.get("layer"), factors=next(parts[(e.get("adapter", ADAPTER_NAME), e["module"])]),
                 config=e.get("config", {}), info=e.get("info", {}), group=int(e.get("group", 0)),
                 adapter=e.get("adapter", ADAPTER_NAME), batch=int(e.get("batch", 0)),
                 stackable=bool(e.get("stackable", True)))
            for e in entries]


def save_state(state: Mapping[str, Mapping[str, Any]], folder: Path) -> dict[str, dict[str, Any]]:
    """Write the tensors of every method's state to ``folder/hf_edit_state.safetensors``; return the JSON part for
    the manifest (tensors replaced by references)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, Any]] = {}
    for method, values in state.items():
        if not values:
            continue
        described[method] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                name = f"{method}/{key}"
                tensors[name] = value.detach().cpu().contiguous()
                described[method][key] = {_TENSOR_KEY: name}
            else:
                described[method][key] = value
    if tensors:
        atomic_write(folder / STATE_NAME, lambda path: save_file(tensors, str(path)))
    return described


def load_state(manifest: Mapping[str, Any], folder: Path) -> dict[str, dict[str, Any]]:
    """The methods' state recorded in ``manifest``, with tensors read from ``folder``.

    Raises:
        EditFolderError: a referenced tensor or the state file is missing.
    """
    described = manifest.get("state") or {}
    wanted = {v[_TENSOR_KEY] for values in described.values() for v in values.values()
              if isinstance(v, Mapping) and _TENSOR_KEY in v}
    tensors: dict[str, torch.Tensor] = {}
    if wanted:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(folder / STATE_NAME))
        except (OSError, ValueError) as err:
            raise EditFolderError(f"Cannot read the method state {folder / STATE_NAME}: {err}") from err
        missing = wanted - set(tensors)
        if missing:
            raise EditFolderError(f"{folder / STATE_NAME} lacks the state tensors {sorted(missing)}.")
    return {method: {key: tensors[v[_TENSOR_KEY]] if isinstance(v, Mapping) and _TENSOR_KEY in v else v
                     for key, v in values.items()}
            for method, values in described.items()}
