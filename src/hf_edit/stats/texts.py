"""Text data sets for second-moment statistics, each with a fingerprint of its content.

The reference's default corpus, ``load_dataset("wikipedia", "20200501.en")``, no longer loads with current
``datasets``; the alias ``"wikipedia"`` maps to :data:`DATASET_ALIASES` ``["wikipedia"]`` (a current English dump).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..files import file_sha256, looks_like_local_path
from .fingerprint import sha256_of

if TYPE_CHECKING:
    import datasets

__all__ = ["DATASET_ALIASES", "text_dataset"]

#: Short names for Hub datasets.  The reference's ``wikipedia``/``20200501.en`` no longer loads.
DATASET_ALIASES: dict[str, str] = {"wikipedia": "wikimedia/wikipedia:20231101.en"}

_TEXT_SUFFIXES = {".txt", ".raw", ".text", ".md"}


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
        return _load_text_files(files), sha256_of(*(f"{p.name}:{file_sha256(p)}" for p in files))
    if looks_like_local_path(text, _TEXT_SUFFIXES):
        raise ConfigError(f"Statistics data set path {text!r} does not exist.")
    return _load_hub_dataset(DATASET_ALIASES.get(text, text))


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
