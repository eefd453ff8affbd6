"""Fingerprints of what second-moment statistics depend on: the base weights and the tokenizer.

They are parts of the statistics' cache key, so they identify content, never a display name: a Hub model by its
snapshot commit and a sample of its weights, any other model by all its weights (offloaded ones included), a
tokenizer by its serialised definition.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architecture import unwrap_model
from ..errors import StatisticsError

__all__ = ["model_fingerprint", "sha256_of", "tokenizer_fingerprint"]


def sha256_of(*parts: str) -> str:
    """sha256 (hex) of the strings joined by NUL characters."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def model_fingerprint(model: nn.Module, revision: str | None = None) -> str:
    """Identity of the base weights of ``model`` (a transformers model or a ``PeftModel``).

    A model loaded from the Hub is identified by ``name@commit`` (the commit of its snapshot in the local Hugging
    Face cache for ``revision``, default ``"main"``; transformers 5 no longer records it on the config) plus a
    strided sample of every tensor, which catches weights changed in memory after loading.  Local and in-memory
    models hash the name, dtype, shape and bytes of every parameter and buffer (about a second per GB).  LoRA
    parameters are skipped and ``.base_layer`` is removed from names, so attaching an adapter changes nothing.
    """
    model = unwrap_model(model)
    name = str(getattr(model.config, "_name_or_path", "") or "")
    commit = _hub_commit(name, revision)
    digest = hashlib.sha256(f"{name}@{commit}|".encode() if commit else b"")
    for tensor_name, tensor in sorted(_base_tensors(model).items()):
        flat = tensor.detach().reshape(-1)
        if commit:
            flat = flat[:: max(1, flat.numel() // 256)]
        flat = flat.to("cpu").contiguous()
        digest.update(f"{tensor_name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def _hub_commit(name: str, revision: str | None) -> str | None:
    """The commit of the cached Hub snapshot ``name`` was loaded from, or ``None`` for local models."""
    if not name or os.path.exists(name) or name.count("/") > 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(name, "config.json", revision=revision or "main")
    except Exception:  # noqa: BLE001 (an id the cache cannot even parse: treat as local)
        return None
    return Path(path).parent.name if isinstance(path, str) else None


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer except LoRA's, by its name without PEFT's ``.base_layer``; weights offloaded by
    accelerate (meta tensors on the module) are read from the offload's weights map."""
    tensors = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "lora_" not in name:
            if tensor.is_meta:
                tensor = _offloaded_tensor(model, name)
            tensors[name.replace(".base_layer", "")] = tensor
    return tensors


def _offloaded_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The value of a tensor that accelerate offloaded (to CPU or disk): looked up in the weights map of the
    ``AlignDevicesHook`` of the closest enclosing module that has one."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        hook = getattr(module, "_hf_hook", None)
        for candidate in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(candidate, "weights_map", None)
            if weights is not None:
                try:
                    return weights[".".join(parts[depth:])]
                except KeyError:
                    continue
    raise StatisticsError(f"{name} is on the meta device and no offload map holds its value: cannot fingerprint "
                          "the model. Load it with real weights (or an accelerate device_map with offloading).")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's definition (``backend_tokenizer.to_str()``), else of its sorted vocab.

    The truncation and padding settings that transformers leaves on the backend after a call are not part of the
    definition: they are switched off while serialising and restored afterwards.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return sha256_of(json.dumps(sorted(tokenizer.get_vocab().items())))
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return sha256_of(backend.to_str())
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)
