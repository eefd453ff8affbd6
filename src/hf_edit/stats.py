"""Second-moment statistics C = E[k kᵀ] of the edited projection's input (rome-spec §5).

ROME's left vector is u = C⁻¹ k̄, where C is the uncentred second moment of the *key* (the input of the MLP output
projection) over every non-padding token of a sample of texts.  This module computes C faithfully to the reference
(``rome/layer_stats.py``): ``random.Random(seed)`` permutation of the texts, the first ``n_samples`` kept, each text
truncated to the model's maximum length, length-sorted right-padded batches, forward pass stopped after the module.

Statistics are cached on disk as safetensors files named by a content fingerprint (base weights, tokenizer, module,
data, sample size, maximum length, dtype, seed), never by the model's display name.  The reference's ``.npz`` files
can be read (:meth:`SecondMomentStats.from_npz`) and written (:meth:`SecondMomentStats.to_npz`).

The reference's default corpus, ``load_dataset("wikipedia", "20200501.en")``, no longer loads with current
``datasets``; the alias ``"wikipedia"`` maps to :data:`DATASET_ALIASES` ``["wikipedia"]`` (a current English dump).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import EditTarget, base_layer, max_positions, unwrap_model
from .errors import (
    ConfigError,
    InsufficientStatisticsError,
    StatisticsCacheError,
    StatisticsError,
    StatisticsMismatchError,
)
from .hooks import capture, eval_mode, run_until

if TYPE_CHECKING:
    import datasets

__all__ = [
    "SecondMomentStats",
    "DATASET_ALIASES",
    "model_fingerprint",
    "tokenizer_fingerprint",
    "text_dataset",
    "compute_second_moment",
    "load_or_compute_stats",
    "stats_cache_dir",
]

logger = logging.getLogger(__name__)

#: Version tag of the safetensors cache format (part of every cache key).
CACHE_FORMAT = "hf_edit.mom2.v1"
#: What the reference writes as ``mom2.constructor`` (informational; never read back).
REFERENCE_CONSTRUCTOR = "util.runningstats.SecondMoment()"
#: Short names for Hub datasets.  The reference's ``wikipedia``/``20200501.en`` no longer loads.
DATASET_ALIASES: dict[str, str] = {"wikipedia": "wikimedia/wikipedia:20231101.en"}

_SUM_KEY, _COUNT_KEY, _CONSTRUCTOR_KEY, _SAMPLE_KEY, _META_KEY = (
    "mom2.mom2", "mom2.count", "mom2.constructor", "sample_size", "hf_edit.metadata")
_ACCUMULATION_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_TEXT_SUFFIXES = {".txt", ".raw", ".text", ".md"}
_TEXTS_PER_CHUNK = 1000  # texts tokenised, length-sorted and batched together (bounds memory)


# --------------------------------------------------------------------------------------------------------------
# The statistics object
# --------------------------------------------------------------------------------------------------------------
class SecondMomentStats:
    """The un-normalised sum S = Σ k kᵀ of ``count`` key vectors, with its provenance.

    Args:
        mom2_sum: (I, I) tensor S (stored on the CPU; float32 or float64).
        count: number of key vectors n; C = S / n.
        metadata: JSON-serialisable provenance (module, fingerprints, data set, sample size, dtype, ...).
    """

    def __init__(self, mom2_sum: torch.Tensor, count: int, metadata: dict[str, Any] | None = None) -> None:
        if mom2_sum.dim() != 2 or mom2_sum.shape[0] != mom2_sum.shape[1]:
            raise StatisticsMismatchError(f"Second-moment sum must be a square (I, I) matrix, got shape "
                                          f"{tuple(mom2_sum.shape)}.")
        if mom2_sum.dtype not in (torch.float32, torch.float64):
            raise StatisticsMismatchError(f"Second-moment sum must be float32 or float64, got {mom2_sum.dtype}.")
        if int(count) < 0:
            raise StatisticsMismatchError(f"count must be non-negative, got {count}.")
        self.mom2_sum = mom2_sum.detach().to("cpu").contiguous()
        self.count = int(count)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._solvers: dict[tuple[str, float], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"SecondMomentStats(dim={self.dim}, count={self.count}, dtype={self.dtype}, "
                f"module={self.metadata.get('module')!r})")

    @property
    def dim(self) -> int:
        """Key width I."""
        return int(self.mom2_sum.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """Accumulation dtype (float64: Cholesky solve; float32: the reference's explicit inverse)."""
        return self.mom2_sum.dtype

    def second_moment(self) -> torch.Tensor:
        """C = S / n, in the statistics' dtype."""
        return self.mom2_sum / self.count

    def solve(self, k: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
        """C⁻¹ k as float32 on ``k``'s device; ``k`` is (I,) or (n, I).

        float64 statistics: Cholesky factor of C (float64, computed once per device and damping, then cached),
        no explicit inverse.  float32 statistics: ``torch.inverse(C)`` in float32, the reference's parity mode.
        ``damping`` λ > 0 solves with C + λ·(tr C / I)·Identity instead (off by default, as the reference).

        Raises:
            InsufficientStatisticsError: n ≤ I or C is not positive definite.
            StatisticsMismatchError: ``k``'s last dimension is not I.
            ConfigError: negative damping.
        """
        if k.shape[-1] != self.dim or k.dim() not in (1, 2):
            raise StatisticsMismatchError(f"Expected keys of shape ({self.dim},) or (n, {self.dim}), got "
                                          f"{tuple(k.shape)}.")
        factor = self._solver(k.device, float(damping))
        rhs = k.reshape(-1, self.dim).T.to(factor.dtype)
        x = torch.cholesky_solve(rhs, factor) if self.dtype == torch.float64 else factor @ rhs
        return x.T.reshape(k.shape).to(torch.float32)

    def _solver(self, device: torch.device, damping: float) -> torch.Tensor:
        """Cached Cholesky factor (float64) or inverse (float32) of the (damped) C on ``device``.

        Positive definiteness is checked with a float64 Cholesky factorisation in both modes.
        """
        cache_key = (str(device), damping)
        if cache_key not in self._solvers:
            c = self._damped(damping).to(device)
            factor, info = torch.linalg.cholesky_ex(c.double())
            if int(info) != 0:
                raise InsufficientStatisticsError(
                    f"The second moment C of {self.metadata.get('module', 'the module')} ({self.dim}×{self.dim}, "
                    f"{self.count} key vectors) is not positive definite. Use more text "
                    "(mom2_n_samples) or a small damping (mom2_damping, e.g. 1e-4).")
            self._solvers[cache_key] = factor if self.dtype == torch.float64 else torch.inverse(c)
        return self._solvers[cache_key]

    def _damped(self, damping: float) -> torch.Tensor:
        """C + λ·(tr C / I)·Identity; without damping, C needs more than I vectors."""
        if damping < 0 or not math.isfinite(damping):
            raise ConfigError(f"damping must be a finite number ≥ 0, got {damping}.")
        if self.count <= (self.dim if damping == 0 else 0):
            raise InsufficientStatisticsError(
                f"Only {self.count} key vectors for a {self.dim}-dimensional second moment "
                f"({self.metadata.get('module', 'module')}): C needs more than {self.dim} to be invertible. Use "
                "more text (mom2_n_samples) or a small damping (mom2_damping).")
        c = self.second_moment()
        if damping:
            c = c + damping * (torch.trace(c) / self.dim) * torch.eye(self.dim, dtype=c.dtype)
        return c

    def fingerprint(self) -> str:
        """sha256 (hex) of the tensor's dtype, shape and bytes and of the count; stable across processes."""
        return _content_checksum(self.mom2_sum, self.count)

    def check_compatible(self, target: EditTarget) -> None:
        """Raise :class:`StatisticsMismatchError` unless these statistics belong to ``target``."""
        expected = (target.in_features, target.in_features)
        if tuple(self.mom2_sum.shape) != expected:
            raise StatisticsMismatchError(
                f"Statistics of shape {tuple(self.mom2_sum.shape)} do not fit {target.name}: its input width is "
                f"{target.in_features}, so C must be {expected}.")
        module = self.metadata.get("module")
        if module is not None and module != target.name:
            raise StatisticsMismatchError(
                f"These are statistics for another layer: computed for {module!r}, but the edited module is "
                f"{target.name!r}.")

    # -- reference .npz files --------------------------------------------------------------------------------
    @classmethod
    def from_npz(cls, path: str | os.PathLike, module_name: str | None = None) -> SecondMomentStats:
        """Read a reference ``.npz`` file (``mom2.mom2``, ``mom2.count``; ``sample_size`` optional).

        Raises:
            StatisticsCacheError: unreadable file, missing key, non-square or non-finite sum, count ≤ 0.
            StatisticsMismatchError: the file's own metadata names a module other than ``module_name``.
        """
        path = Path(path)
        arrays = _read_npz(path)
        mom2_sum, count = _validated(arrays, path)
        metadata = _json_metadata(arrays.get(_META_KEY), path)
        if _SAMPLE_KEY in arrays:
            metadata.setdefault("n_samples", _sample_size(arrays[_SAMPLE_KEY]))
        if module_name is not None:
            if metadata.get("module", module_name) != module_name:
                raise StatisticsMismatchError(f"{path} holds statistics for {metadata['module']!r}, not "
                                              f"{module_name!r}.")
            metadata["module"] = module_name
        metadata["source"] = "npz"
        logger.info("Loaded second-moment statistics from %s (%d vectors).", path, count)
        return cls(mom2_sum, count, metadata)

    def to_npz(self, path: str | os.PathLike) -> None:
        """Write the reference's keys plus ``hf_edit.metadata`` (JSON string); loads with ``allow_pickle=False``."""
        n_samples = self.metadata.get("n_samples")
        arrays = {
            _SUM_KEY: self.mom2_sum.numpy(),
            _COUNT_KEY: np.array(self.count, dtype=np.int64),
            _CONSTRUCTOR_KEY: np.array(REFERENCE_CONSTRUCTOR),
            _SAMPLE_KEY: np.array(np.nan if n_samples is None else int(n_samples)),
            _META_KEY: np.array(json.dumps(self.metadata, sort_keys=True)),
        }

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)

        _atomic_write(Path(path), write)

    # -- hf_edit cache files (safetensors) --------------------------------------------------------------------
    def save(self, path: str | os.PathLike, key: str | None = None) -> None:
        """Write a safetensors cache file atomically (temporary file + ``os.replace``).

        Args:
            path: destination file.
            key: cache key recorded in the file and checked by :meth:`load` (``expected_key``).
        """
        from safetensors.torch import save_file

        tensors = {_SUM_KEY: self.mom2_sum, _COUNT_KEY: torch.tensor([self.count], dtype=torch.int64)}
        header = {"format": CACHE_FORMAT, "key": key or "", "checksum": self.fingerprint(),
                  "metadata": json.dumps(self.metadata, sort_keys=True)}
        _atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike, expected_key: str | None = None) -> SecondMomentStats:
        """Read a file written by :meth:`save`, verifying its format, checksum and (if given) key.

        Raises:
            StatisticsCacheError: the file is unreadable, truncated, corrupted or for another key.  The file is
                never modified; delete it to recompute.
        """
        path = Path(path)
        header, tensors = _read_safetensors(path)
        if header.get("format") != CACHE_FORMAT:
            raise _cache_error(path, f"unknown format {header.get('format')!r} (expected {CACHE_FORMAT!r})")
        if expected_key is not None and header.get("key") != expected_key:
            raise _cache_error(path, f"it was written for cache key {header.get('key')!r}, not {expected_key!r}")
        mom2_sum, count = _validated(tensors, path)
        stats = cls(mom2_sum, count, _json_metadata(header.get("metadata"), path))
        if stats.fingerprint() != header.get("checksum"):
            raise _cache_error(path, "its checksum does not match its content (corrupted)")
        return stats


# --------------------------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------------------------
def _content_checksum(mom2_sum: torch.Tensor, count: int) -> str:
    array = mom2_sum.detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(memoryview(array).cast("B"))
    digest.update(f"|{int(count)}".encode())
    return digest.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file next to ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cache_error(path: Path, reason: str) -> StatisticsCacheError:
    return StatisticsCacheError(f"Statistics file {path} is unusable: {reason}. Delete it to recompute.")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except Exception as exc:  # zipfile, OSError, ValueError (pickled objects), ...
        raise _cache_error(path, f"cannot read it as an .npz file ({type(exc).__name__}: {exc})") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {}), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # SafetensorError, OSError, truncated or corrupted header
        raise _cache_error(path, f"cannot read it ({type(exc).__name__}: {exc})") from exc


def _validated(arrays: dict[str, Any], path: Path) -> tuple[torch.Tensor, int]:
    """The (sum, count) of a file's arrays, checked: both keys, square finite float sum, count > 0."""
    missing = [name for name in (_SUM_KEY, _COUNT_KEY) if name not in arrays]
    if missing:
        raise _cache_error(path, f"missing key(s) {missing} (found {sorted(arrays)})")
    try:
        mom2_sum = torch.as_tensor(arrays[_SUM_KEY])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _cache_error(path, f"'{_SUM_KEY}' is not a numeric array ({exc})") from exc
    if mom2_sum.dim() != 2 or mom2_sum.shape[0] != mom2_sum.shape[1]:
        raise _cache_error(path, f"'{_SUM_KEY}' must be a square (I, I) matrix, got shape {tuple(mom2_sum.shape)}")
    if mom2_sum.dtype not in (torch.float32, torch.float64):
        raise _cache_error(path, f"'{_SUM_KEY}' must be float32 or float64, got {mom2_sum.dtype}")
    if not torch.isfinite(mom2_sum).all():
        raise _cache_error(path, f"'{_SUM_KEY}' contains NaN or infinite values")
    return mom2_sum, _count(arrays[_COUNT_KEY], path)


def _count(value: Any, path: Path) -> int:
    try:
        number = float(np.asarray(value).item())
    except (ValueError, TypeError) as exc:
        raise _cache_error(path, f"'{_COUNT_KEY}' must be one integer, got {value!r}") from exc
    if not math.isfinite(number) or number != int(number):
        raise _cache_error(path, f"'{_COUNT_KEY}' must be one integer, got {value!r}")
    if number <= 0:
        raise _cache_error(path, f"'{_COUNT_KEY}' must be positive, got {int(number)}")
    return int(number)


def _json_metadata(raw: Any, path: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        metadata = json.loads(str(np.asarray(raw).item()) if isinstance(raw, np.ndarray) else raw)
    except (ValueError, TypeError) as exc:
        raise _cache_error(path, f"its metadata is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise _cache_error(path, "its metadata is not a JSON object")
    return metadata


def _sample_size(value: np.ndarray) -> int | None:
    number = float(np.asarray(value).item())
    return None if math.isnan(number) else int(number)


# --------------------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------------------
def _sha256(*parts: str) -> str:
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
    except Exception:  # an id the cache cannot even parse: treat as local
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
        return _sha256(json.dumps(sorted(tokenizer.get_vocab().items())))
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return _sha256(backend.to_str())
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


# --------------------------------------------------------------------------------------------------------------
# Text data
# --------------------------------------------------------------------------------------------------------------
def text_dataset(source: Any) -> tuple[datasets.Dataset, str]:
    """A ``datasets.Dataset`` with a ``"text"`` column and a fingerprint of its content.

    ``source`` may be a ``datasets.Dataset``; a local text file (one row per line); a local folder (its
    ``*.txt``/``*.raw``/``*.text``/``*.md`` files, sorted by name); or a Hub dataset id ``"owner/name"`` or
    ``"owner/name:config"`` (split ``train``).  ``"wikipedia"`` means ``"wikimedia/wikipedia:20231101.en"``.

    Raises:
        ConfigError: no ``"text"`` column, a missing local path, an empty folder, or a data set that cannot load.
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        return _with_text_column(source, "the given Dataset"), source._fingerprint
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"Unsupported statistics data set {source!r}: pass a datasets.Dataset, a local "
                          "file or folder, or a Hub dataset id.")
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return _load_text_files([path]), file_sha256(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"Folder {path} holds no {sorted(_TEXT_SUFFIXES)} files.")
        return _load_text_files(files), _sha256(*(f"{p.name}:{file_sha256(p)}" for p in files))
    if looks_like_local_path(text, _TEXT_SUFFIXES):
        raise ConfigError(f"Statistics data set path {text!r} does not exist.")
    return _load_hub_dataset(DATASET_ALIASES.get(text, text))


def looks_like_local_path(text: str, suffixes: Collection[str]) -> bool:
    """A string meant as a local path rather than a Hub id ``owner/name[:config]``: it starts like a path, has
    more than one ``/``, uses the OS separator, or ends in one of ``suffixes``."""
    return (text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)
            or Path(text).suffix.lower() in suffixes)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_text_files(files: list[Path]) -> datasets.Dataset:
    from datasets import load_dataset

    return load_dataset("text", data_files=[str(p) for p in files], split="train")


def _load_hub_dataset(spec: str) -> tuple[datasets.Dataset, str]:
    from datasets import load_dataset

    dataset_id, _, config = spec.partition(":")
    try:
        ds = load_dataset(dataset_id, config or None, split="train")
    except Exception as exc:
        raise ConfigError(f"Cannot load the statistics data set {spec!r} ({type(exc).__name__}: {exc}). Pass a "
                          "local text file or folder, or a datasets.Dataset with a 'text' column.") from exc
    return _with_text_column(ds, spec), f"{dataset_id}:{config}:train:{ds._fingerprint}"


def _with_text_column(ds: datasets.Dataset, what: str) -> datasets.Dataset:
    if "text" not in ds.column_names:
        raise ConfigError(f"{what} has no 'text' column (columns: {ds.column_names}).")
    return ds


# --------------------------------------------------------------------------------------------------------------
# Computation
# --------------------------------------------------------------------------------------------------------------
def stats_cache_dir() -> Path:
    """``$HF_EDIT_CACHE/stats`` if set, else ``$HF_HOME/hf_edit/stats`` (``~/.cache/huggingface`` by default)."""
    root = os.environ.get("HF_EDIT_CACHE")
    if not root:
        root = os.path.join(os.environ.get("HF_HOME", os.path.join("~", ".cache", "huggingface")), "hf_edit")
    return Path(root).expanduser() / "stats"


def _accumulation_dtype(dtype: str) -> torch.dtype:
    if dtype not in _ACCUMULATION_DTYPES:
        raise ConfigError(f"Statistics dtype must be one of {sorted(_ACCUMULATION_DTYPES)}, got {dtype!r}.")
    return _ACCUMULATION_DTYPES[dtype]


def _max_length(model: nn.Module, max_length: int | None) -> int:
    """min(max_length, the model's n_positions / max_position_embeddings)."""
    if max_length is not None and int(max_length) < 1:
        raise ConfigError(f"max_length must be ≥ 1, got {max_length}.")
    limits = [int(x) for x in (max_length, max_positions(model)) if x]
    if not limits:
        raise ConfigError("The model config has no n_positions/max_position_embeddings: pass max_length.")
    return min(limits)


def _hf_edit_version() -> str:
    try:
        return importlib.metadata.version("hf_edit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _describe(model: nn.Module, tokenizer: Any, target: EditTarget, dataset_fingerprint: str,
              n_samples: int | None, max_len: int, dtype: str, seed: int,
              model_revision: str | None) -> dict[str, Any]:
    """Everything the statistics depend on (the cache key is a hash of this)."""
    if n_samples is not None and int(n_samples) < 1:
        raise ConfigError(f"n_samples must be ≥ 1 (a number of texts), got {n_samples}.")
    return {"module": target.name, "model_fingerprint": model_fingerprint(model, model_revision),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "dataset": dataset_fingerprint,
            "n_samples": None if n_samples is None else int(n_samples), "max_length": max_len, "dtype": dtype,
            "seed": int(seed), "format": CACHE_FORMAT}


def _prepare(model: nn.Module, tokenizer: Any, target: EditTarget, dataset: Any, n_samples: int | None,
             dtype: str, max_length: int | None, seed: int,
             model_revision: str | None = None) -> tuple[datasets.Dataset, dict[str, Any]]:
    _accumulation_dtype(dtype)
    ds, dataset_fingerprint = text_dataset(dataset)
    max_len = _max_length(model, max_length)
    return ds, _describe(model, tokenizer, target, dataset_fingerprint, n_samples, max_len, dtype, seed,
                         model_revision)


def _sample_indices(n_rows: int, n_samples: int | None, seed: int) -> list[int]:
    """The reference's sampling: ``Random(seed)`` shuffle of all row indices, first ``n_samples`` kept."""
    indices = list(range(n_rows))
    random.Random(seed).shuffle(indices)
    return indices if n_samples is None else indices[:n_samples]


def _length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group indices, longest first, into batches with rows × width ≤ batch_tokens (a longer text goes alone)."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _padded(rows: list[list[int]], pad_id: int, device: torch.device,
            with_positions: bool) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if with_positions:
        inputs["position_ids"] = torch.arange(width, device=device).expand(len(rows), width)
    return inputs


def _token_batches(texts: list[str], tokenizer: Any, max_len: int, batch_tokens: int) -> list[list[list[int]]]:
    """Tokenise ``texts`` (truncated, default special tokens), drop empty ones, group them into batches."""
    rows = [ids for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"] if ids]
    return [[rows[i] for i in batch] for batch in _length_batches([len(r) for r in rows], batch_tokens)]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's training flag restored afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(unwrap_model(model).forward).parameters


def _accumulate(model: nn.Module, tokenizer: Any, target: EditTarget, ds: datasets.Dataset,
                description: dict[str, Any], *, batch_tokens: int | None, base_context: Callable[[], Any] | None,
                progress: bool) -> SecondMomentStats:
    """Run the sampled texts through the base model and sum k kᵀ over their non-padding tokens."""
    texts = ds.select(_sample_indices(len(ds), description["n_samples"], description["seed"]))
    logger.info("Computing second-moment statistics of %s over %d texts (%s).", target.name, len(texts),
                description["dtype"])
    context: AbstractContextManager = base_context() if base_context is not None else contextlib.nullcontext()
    with context, eval_mode(model), torch.no_grad():
        total, count = _sum_keys(model, tokenizer, target, texts, _accumulation_dtype(description["dtype"]),
                                 description["max_length"], int(batch_tokens or 3 * description["max_length"]),
                                 progress)
    if count <= target.in_features:
        raise InsufficientStatisticsError(
            f"Only {count} key vectors from {len(texts)} texts for the {target.in_features}-dimensional second "
            f"moment of {target.name}; more than {target.in_features} are needed. Use more text (mom2_n_samples, "
            "a larger data set or a larger max_length).")
    metadata = {**description, "hf_edit_version": _hf_edit_version(), "source": "computed"}
    return SecondMomentStats(total.cpu(), count, metadata)


def _sum_keys(model: nn.Module, tokenizer: Any, target: EditTarget, texts: datasets.Dataset,
              acc_dtype: torch.dtype, max_len: int, batch_tokens: int, progress: bool) -> tuple[torch.Tensor, int]:
    """(Σ k kᵀ, n) over the texts, on the device of the module's weight."""
    module = unwrap_model(model).get_submodule(target.name)
    device = base_layer(module).weight.device
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    with_positions = _accepts(model, "position_ids")
    total = torch.zeros(target.in_features, target.in_features, dtype=acc_dtype, device=device)
    count = 0
    with tqdm(total=len(texts), disable=not progress, desc=f"mom2 {target.name}") as bar:
        for start in range(0, len(texts), _TEXTS_PER_CHUNK):
            chunk = texts[start:start + _TEXTS_PER_CHUNK]["text"]
            for rows in _token_batches(chunk, tokenizer, max_len, batch_tokens):
                keys = _batch_keys(model, module, _padded(rows, pad_id, device, with_positions), target)
                keys = keys.to(device=device, dtype=acc_dtype)
                total += keys.T @ keys
                count += keys.shape[0]
                bar.update(len(rows))
            bar.update(start + len(chunk) - bar.n)  # texts dropped because they tokenise to nothing
    return total, count


def _batch_keys(model: nn.Module, module: nn.Module, inputs: dict[str, torch.Tensor],
                target: EditTarget) -> torch.Tensor:
    """The module's input vectors at the non-padding positions of one batch, (tokens, I)."""
    mask = inputs["attention_mask"]
    with capture(module, tuple(mask.shape), stop=True) as record:
        run_until(model, **inputs, use_cache=False)
    if record.calls == 0:
        raise StatisticsError(f"Module {target.name} did not run during the forward pass.")
    return record.inputs[mask.to(record.inputs.device).bool()]


def compute_second_moment(model: nn.Module, tokenizer: Any, target: EditTarget, *, dataset: Any,
                          n_samples: int | None, dtype: str = "float64", max_length: int | None = None,
                          batch_tokens: int | None = None, seed: int = 1,
                          base_context: Callable[[], AbstractContextManager] | None = None,
                          progress: bool = True, model_revision: str | None = None) -> SecondMomentStats:
    """Second-moment statistics of ``target``'s input over ``n_samples`` texts of ``dataset`` (no cache).

    Args:
        model: a transformers causal LM, possibly with LoRA layers (the module is hooked as it is).
        tokenizer: its tokenizer (default special tokens are added, as in the reference).
        target: the projection whose input is the key.
        dataset: anything :func:`text_dataset` accepts.
        n_samples: number of **texts** sampled (``None``: all).
        dtype: accumulation dtype, ``"float64"`` (default) or ``"float32"`` (the reference's).
        max_length: truncation length, capped by the model's maximum length.
        batch_tokens: padded tokens per batch (default 3 × max length, as the reference).
        seed: seed of the ``random.Random`` permutation of the texts (the reference uses 1).
        base_context: zero-argument callable giving a context manager under which ``model`` is the base model
            (e.g. ``peft_model.disable_adapter``).
        progress: show a tqdm progress bar.

    Raises:
        InsufficientStatisticsError: n ≤ I key vectors were seen.
        ConfigError: bad dtype, data set or lengths.
    """
    ds, description = _prepare(model, tokenizer, target, dataset, n_samples, dtype, max_length, seed,
                               model_revision)
    return _accumulate(model, tokenizer, target, ds, description, batch_tokens=batch_tokens,
                       base_context=base_context, progress=progress)


def _cache_key(description: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what the statistics depend on."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_or_compute_stats(model: nn.Module, tokenizer: Any, target: EditTarget, *, dataset: Any,
                          n_samples: int | None, dtype: str = "float64", max_length: int | None = None,
                          batch_tokens: int | None = None, cache_dir: str | os.PathLike | None = None,
                          base_context: Callable[[], AbstractContextManager] | None = None, progress: bool = True,
                          seed: int = 1, model_revision: str | None = None) -> SecondMomentStats:
    """Statistics from the content-addressed cache, or computed (see :func:`compute_second_moment`) and cached.

    The file is ``<cache_dir or stats_cache_dir()>/<module>__<key[:20]>.safetensors``.

    Raises:
        StatisticsCacheError: the cache file exists but is corrupted or for another key (it is left untouched).
        InsufficientStatisticsError: too few key vectors (nothing is cached).
    """
    ds, description = _prepare(model, tokenizer, target, dataset, n_samples, dtype, max_length, seed,
                               model_revision)
    key = _cache_key(description)
    path = Path(cache_dir).expanduser() if cache_dir is not None else stats_cache_dir()
    path = path / f"{target.name}__{key[:20]}.safetensors"
    if path.exists():
        logger.info("Loading cached second-moment statistics from %s.", path)
        return SecondMomentStats.load(path, expected_key=key)
    stats = _accumulate(model, tokenizer, target, ds, description, batch_tokens=batch_tokens,
                        base_context=base_context, progress=progress)
    stats.save(path, key=key)
    logger.info("Cached second-moment statistics in %s.", path)
    return stats
