"""The second-moment statistics object and its two file formats (rome-spec §5).

:class:`SecondMomentStats` holds S = Σ k kᵀ and n (C = S / n) with their provenance, solves C x = k, and reads and
writes hf_edit's safetensors cache files (:meth:`~SecondMomentStats.save`, :meth:`~SecondMomentStats.load`) and the
reference's ``.npz`` files (:meth:`~SecondMomentStats.from_npz`, :meth:`~SecondMomentStats.to_npz`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..architecture import EditTarget
from ..errors import ConfigError, InsufficientStatisticsError, StatisticsCacheError, StatisticsMismatchError
from ..files import atomic_write

__all__ = ["CACHE_FORMAT", "REFERENCE_CONSTRUCTOR", "SecondMomentStats"]

logger = logging.getLogger(__name__)

#: Version tag of the safetensors cache format (part of every cache key).
CACHE_FORMAT = "hf_edit.mom2.v1"
#: What the reference writes as ``mom2.constructor`` (informational; never read back).
REFERENCE_CONSTRUCTOR = "util.runningstats.SecondMoment()"

_SUM_KEY, _COUNT_KEY, _CONSTRUCTOR_KEY, _SAMPLE_KEY, _META_KEY = (
    "mom2.mom2", "mom2.count", "mom2.constructor", "sample_size", "hf_edit.metadata")


class SecondMomentStats:
    """The un-normalised sum S = Σ k kᵀ of ``count`` key vectors, with its provenance.

    Args:
        mom2_sum: (I, I) tensor S (stored on the CPU; float32 or float64).
        count: number of key vectors n; C = S / n.
        metadata: JSON-serialisable provenance (module, fingerprints, data set, sample size, dtype, ...).

    Attributes:
        path: the safetensors file these statistics were last saved to or loaded from (``None`` if neither);
            like ``from_cache``, it is not part of their content, fingerprint or metadata.
        from_cache: ``True`` when :func:`~hf_edit.stats.load_or_compute_stats` found them in its cache instead of
            computing them.
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
        self.path: Path | None = None
        self.from_cache = False
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

        atomic_write(path, write)

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
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        self.path = Path(path)

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
        """The metadata of a file written by :meth:`save`, from its header only (no tensor is read, nothing is
        verified); ``{}`` if the file cannot be read or has none."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get("metadata")
            metadata = json.loads(raw) if raw else {}
        except Exception:  # noqa: BLE001 (unreadable or foreign file: no metadata)
            return {}
        return metadata if isinstance(metadata, dict) else {}

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
        stats.path = path
        return stats


# --------------------------------------------------------------------------------------------------------------
# Reading and checking files
# --------------------------------------------------------------------------------------------------------------
def _content_checksum(mom2_sum: torch.Tensor, count: int) -> str:
    array = mom2_sum.detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(memoryview(array).cast("B"))
    digest.update(f"|{int(count)}".encode())
    return digest.hexdigest()


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
