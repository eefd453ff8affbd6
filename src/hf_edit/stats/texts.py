"""Text data sets for second-moment statistics, each with a fingerprint of its content, and the samples drawn
from them (:func:`sample_texts`).

The reference's default corpus, ``load_dataset("wikipedia", "20200501.en")``, no longer loads with current
``datasets``; the alias ``"wikipedia"`` maps to :data:`DATASET_ALIASES` ``["wikipedia"]`` (a current English dump).

Two sampling schemes, recorded in the statistics' cache key and metadata (``sampling``):

* ``"permutation"`` (a ``datasets.Dataset``, a local file or folder): the reference's rule, a ``random.Random(seed)``
  shuffle of all row indices, the first ``n_samples`` kept.
* ``"stream-prefix"`` (a Hub dataset id): the data set is streamed (``load_dataset(..., streaming=True)``) at the
  commit it resolves to now, and the sample is the reference's rule applied to the first ``W = oversample ×
  n_samples`` rows of the stream (all rows if the split is shorter): a ``random.Random(seed)`` shuffle of
  ``range(W)``, the first ``n_samples`` indices kept.  Only those ``W`` rows are read and only the sampled texts are
  kept in memory (a chunk at a time), so nothing is downloaded in full.  When the split has at most ``W`` rows the
  sample is exactly the ``"permutation"`` sample of the whole split.  The sample is uniform within the prefix, not
  over the whole split: the first rows of a Wikipedia dump are its oldest articles (lowest page ids).
"""

from __future__ import annotations

import logging
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, StatisticsError
from ..files import file_sha256, looks_like_local_path
from .fingerprint import sha256_of

if TYPE_CHECKING:
    import datasets

__all__ = ["DATASET_ALIASES", "STREAM_OVERSAMPLE", "HubUnreachableError", "SampledTexts", "StreamEndedEarly",
           "hub_prefix", "offline_message", "reference_sample", "sample_texts", "text_dataset"]

logger = logging.getLogger(__name__)

#: Short names for Hub datasets.  The reference's ``wikipedia``/``20200501.en`` no longer loads.
DATASET_ALIASES: dict[str, str] = {"wikipedia": "wikimedia/wikipedia:20231101.en"}

#: Default ratio of streamed rows to sampled texts for Hub data sets (the ``"stream-prefix"`` scheme).
STREAM_OVERSAMPLE = 10

#: Seconds to wait for the Hub before declaring it unreachable (one request, no retries).
HUB_TIMEOUT_S = 10.0

_TEXT_SUFFIXES = {".txt", ".raw", ".text", ".md"}
_STREAM_SPLIT = "train"
_STREAM_READ_BATCH = 1000  # rows read from a stream at a time


class HubUnreachableError(StatisticsError):
    """The statistics' data set is a Hub dataset id, but the Hub cannot be reached (offline mode, no network)."""


def text_dataset(source: Any) -> tuple[datasets.Dataset, str]:
    """A ``datasets.Dataset`` with a ``"text"`` column and a fingerprint of its content.

    ``source`` may be a ``datasets.Dataset``; a local text file (one row per line); a local folder (its
    ``*.txt``/``*.raw``/``*.text``/``*.md`` files, sorted by name); or a Hub dataset id ``"owner/name"`` or
    ``"owner/name:config"`` (split ``train``, downloaded in full; statistics stream it instead, see
    :func:`sample_texts`).  ``"wikipedia"`` means ``"wikimedia/wikipedia:20231101.en"``.

    Raises:
        ConfigError: no ``"text"`` column, a missing local path, an empty folder, or a data set that cannot load.
    """
    local = _local_dataset(source)
    if local is not None:
        return local
    return _load_hub_dataset(DATASET_ALIASES.get(os.fspath(source), os.fspath(source)))


class SampledTexts(ABC):
    """The texts statistics are computed over: a sample of a data set, and what identifies it.

    Attributes:
        dataset: fingerprint of the data set's content (a content hash, or a Hub id with its commit).
        sampling: the sampling scheme and its parameters (besides ``n_samples`` and ``seed``), e.g.
            ``{"scheme": "permutation"}``.
        n_samples: texts requested (``None``: all).
        seed: seed of the ``random.Random`` shuffle.
    """

    dataset: str
    sampling: dict[str, Any]

    def __init__(self, n_samples: int | None, seed: int) -> None:
        self.n_samples = n_samples
        self.seed = int(seed)

    @abstractmethod
    def chunks(self, size: int) -> Iterator[list[str]]:
        """The sampled texts, ``size`` at a time (the last chunk may be shorter)."""

    @abstractmethod
    def expected_texts(self) -> int | None:
        """How many texts :meth:`chunks` yields, if known before reading them."""

    def details(self) -> dict[str, Any]:
        """What was learnt while reading the sample (recorded in the statistics' metadata, not in the key)."""
        return {}

    def redraw(self, rows: int) -> None:
        """Draw the sample again over the ``rows`` rows a stream really has (after :class:`StreamEndedEarly`)."""
        raise StatisticsError(f"{self.dataset} ended after {rows} rows, which this sample cannot handle.")


class _PermutationSample(SampledTexts):
    """The reference's rule on a ``datasets.Dataset``: a ``Random(seed)`` permutation, the first ``n`` rows."""

    def __init__(self, ds: datasets.Dataset, fingerprint: str, n_samples: int | None, seed: int) -> None:
        super().__init__(n_samples, seed)
        self.dataset = fingerprint
        self.sampling = {"scheme": "permutation"}
        self._ds = ds
        self.indices = reference_sample(len(ds), n_samples, seed)

    def chunks(self, size: int) -> Iterator[list[str]]:
        texts = self._ds.select(self.indices)
        for start in range(0, len(texts), size):
            yield list(texts[start:start + size]["text"])

    def expected_texts(self) -> int:
        return len(self.indices)


class StreamEndedEarly(Exception):
    """A stream had fewer rows than the sampling window (internal: the sample is drawn again over ``rows``)."""

    def __init__(self, rows: int) -> None:
        super().__init__(f"the stream ended after {rows} rows")
        self.rows = rows


class _StreamSample(SampledTexts):
    """The ``"stream-prefix"`` scheme over a Hub dataset, streamed at a fixed commit."""

    def __init__(self, dataset_id: str, config: str | None, revision: str, n_samples: int | None, seed: int,
                 oversample: int) -> None:
        super().__init__(n_samples, seed)
        self.dataset_id, self.config, self.revision = dataset_id, config, revision
        self.dataset = f"{hub_prefix(dataset_id, config)}{revision}"
        self.sampling = {"scheme": "stream-prefix", "oversample": int(oversample)}
        self.window: int | None = None  # rows the sample is drawn from; None: all rows (n_samples is None)
        self._rows_seen: int | None = None

    def open(self) -> datasets.IterableDataset:
        """The split as a stream of its ``text`` column (``datasets.load_dataset(..., streaming=True)``)."""
        import datasets

        try:
            stream = datasets.load_dataset(self.dataset_id, self.config, split=_STREAM_SPLIT, streaming=True,
                                           revision=self.revision)
        except Exception as exc:  # datasets raises many kinds; all mean the same to the user
            raise ConfigError(f"Cannot stream the statistics data set {self.dataset_id!r}"
                              f"{f' (config {self.config!r})' if self.config else ''}: {type(exc).__name__}: "
                              f"{exc}") from exc
        columns = getattr(stream, "column_names", None)
        if columns is not None:
            if "text" not in columns:
                raise ConfigError(f"{self.dataset_id} has no 'text' column (columns: {columns}).")
            stream = stream.select_columns(["text"])
        return stream

    def chunks(self, size: int) -> Iterator[list[str]]:
        stream = self.open()
        if self.window is None and self.n_samples is not None:
            self.window = self.sampling["oversample"] * self.n_samples
            known = _known_length(stream)
            if known is not None and known < self.window:
                self.window = known
        wanted = None if self.window is None else set(reference_sample(self.window, self.n_samples, self.seed))
        chunk: list[str] = []
        row = self._rows_seen = 0
        for batch in self._read(stream):
            texts = batch.get("text") if isinstance(batch, dict) else None
            if texts is None:
                raise ConfigError(f"{self.dataset_id} has no 'text' column (columns: {sorted(batch)}).")
            for text in texts:
                if wanted is None or row in wanted:
                    chunk.append(text or "")
                    if len(chunk) == size:
                        yield chunk
                        chunk = []
                row += 1
                if self.window is not None and row >= self.window:
                    break
            self._rows_seen = row
            if self.window is not None and row >= self.window:
                break
        self._rows_seen = row
        if self.window is not None and row < self.window:
            raise StreamEndedEarly(row)
        if chunk:
            yield chunk

    def _read(self, stream: datasets.IterableDataset) -> Iterator[dict[str, Any]]:
        """The stream's batches; a failure while reading (a dropped connection) names the data set and the row."""
        batches = iter(stream.iter(batch_size=_STREAM_READ_BATCH))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:  # network and decoding errors of datasets/fsspec/pyarrow
                raise StatisticsError(f"Streaming the statistics data set {self.dataset} failed after "
                                      f"{self._rows_seen} rows ({type(exc).__name__}: {exc}). Nothing was cached; "
                                      "run again, or pass local text (--stats-data PATH, stats_data=PATH, "
                                      "mom2_dataset=PATH).") from exc
            yield batch

    def redraw(self, rows: int) -> None:
        """Draw the sample again over the ``rows`` rows the stream really has."""
        logger.warning("%s has only %d rows, fewer than the %d-row sampling window: drawing the %s texts again "
                       "from all of them.", self.dataset, rows, self.window, self.n_samples)
        self.window = rows

    def expected_texts(self) -> int | None:
        if self.n_samples is None:
            return None
        return min(self.n_samples, self.window) if self.window is not None else self.n_samples

    def details(self) -> dict[str, Any]:
        return {"stream_rows_read": self._rows_seen, "stream_window": self.window}


def sample_texts(source: Any, n_samples: int | None, seed: int = 1, *, oversample: int = STREAM_OVERSAMPLE,
                 resolve: bool = True) -> SampledTexts:
    """The sample of ``source`` that statistics over ``n_samples`` texts use (see the module's schemes).

    ``source`` may be anything :func:`text_dataset` accepts.  A Hub dataset id is streamed: nothing is downloaded
    here, only its current commit is looked up (one request of at most :data:`HUB_TIMEOUT_S` seconds).

    Args:
        source: a ``datasets.Dataset``, a local text file or folder, or a Hub dataset id ``"owner/name[:config]"``.
        n_samples: number of texts (``None``: all rows).
        seed: seed of the ``random.Random`` shuffle (the reference uses 1).
        oversample: Hub data sets: the sample is drawn from the first ``oversample × n_samples`` rows.
        resolve: look up the Hub commit (``False``: only validate the arguments; used for offline cache lookups).

    Raises:
        HubUnreachableError: a Hub dataset id while offline (``HF_HUB_OFFLINE=1``) or without network.  Its message
            says how to pass local text instead.
        ConfigError: a missing local path, no ``text`` column, an unknown Hub dataset, bad arguments.
    """
    if n_samples is not None and int(n_samples) < 1:
        raise ConfigError(f"n_samples must be ≥ 1 (a number of texts), got {n_samples}.")
    if int(oversample) < 1:
        raise ConfigError(f"oversample must be ≥ 1, got {oversample}.")
    local = _local_dataset(source)
    if local is not None:
        return _PermutationSample(*local, n_samples, seed)
    spec = DATASET_ALIASES.get(os.fspath(source), os.fspath(source))
    dataset_id, _, config = spec.partition(":")
    revision = _hub_revision(spec, dataset_id) if resolve else ""
    return _StreamSample(dataset_id, config or None, revision, n_samples, seed, oversample)


def hub_prefix(dataset_id: str, config: str | None) -> str:
    """The part of a streamed data set's fingerprint before its commit: ``"owner/name:config:train@"``."""
    return f"{dataset_id}:{config or ''}:{_STREAM_SPLIT}@"


def reference_sample(n_rows: int, n_samples: int | None, seed: int) -> list[int]:
    """The reference's sampling: ``Random(seed)`` shuffle of all row indices, first ``n_samples`` kept."""
    indices = list(range(n_rows))
    random.Random(seed).shuffle(indices)
    return indices if n_samples is None else indices[:n_samples]


def offline_message(spec: str, reason: str) -> str:
    """Why a Hub data set cannot be used, and how to pass local text instead (CLI and Python)."""
    return (f"Cannot reach the Hugging Face Hub to stream the statistics data set {spec!r} ({reason}). Second-moment "
            "statistics need text: give a local text file, or a folder of .txt/.raw files (e.g. WikiText-2 raw), "
            "instead. Command line: --stats-data PATH (hf-edit stats compute: --data PATH). Python: "
            "EditedModel.from_pretrained(..., stats_data=PATH), or the method's config, e.g. "
            "ROMEConfig(mom2_dataset=PATH). Statistics already computed from this data set are found in the cache "
            "(HF_EDIT_CACHE) even offline.")


# --------------------------------------------------------------------------------------------------------------
def _local_dataset(source: Any) -> tuple[datasets.Dataset, str] | None:
    """``(dataset, fingerprint)`` for a Dataset, file or folder; ``None`` for a Hub id."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return _with_text_column(source, "the given Dataset"), source._fingerprint
    if isinstance(source, datasets.IterableDataset):
        raise ConfigError("A datasets.IterableDataset has no content fingerprint to cache statistics by: pass a Hub "
                          "dataset id (it is streamed), a datasets.Dataset, or a local file or folder.")
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
    return None


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


def _offline() -> bool:
    """Whether offline mode is on (``HF_HUB_OFFLINE``, as huggingface_hub and datasets read it, or as set now)."""
    import datasets.config
    import huggingface_hub.constants

    from_env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE or from_env)


def _hub_revision(spec: str, dataset_id: str) -> str:
    """The commit ``dataset_id``'s default branch points at, from one Hub request without retries.

    Raises:
        HubUnreachableError: offline mode, or no answer within :data:`HUB_TIMEOUT_S` (no network, DNS failure).
        ConfigError: the Hub answered that there is no such (accessible) dataset.
    """
    if _offline():
        raise HubUnreachableError(offline_message(spec, "offline mode is on: HF_HUB_OFFLINE=1"))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        info = HfApi().dataset_info(dataset_id, timeout=HUB_TIMEOUT_S)
    except OfflineModeIsEnabled as exc:
        raise HubUnreachableError(offline_message(spec, "offline mode is on: HF_HUB_OFFLINE=1")) from exc
    except HfHubHTTPError as exc:  # the Hub answered: unknown, gated or private dataset, server error
        raise ConfigError(f"The statistics data set {spec!r} cannot be streamed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}. Check the dataset id (owner/name or "
                          "owner/name:config) and your access to it, or pass local text (--stats-data PATH, "
                          "stats_data=PATH, mom2_dataset=PATH).") from exc
    except Exception as exc:  # connection refused, DNS failure, timeout: httpx/requests/OS errors
        raise HubUnreachableError(offline_message(spec, f"{type(exc).__name__}: {exc}")) from exc
    if not getattr(info, "sha", None):
        raise HubUnreachableError(offline_message(spec, "the Hub returned no commit for it"))
    return str(info.sha)


def _known_length(stream: datasets.IterableDataset) -> int | None:
    """Rows of the streamed split according to the data set's card, if it says."""
    splits = getattr(getattr(stream, "info", None), "splits", None)
    try:
        split = splits[_STREAM_SPLIT] if splits else None
    except (KeyError, TypeError):
        return None
    rows = getattr(split, "num_examples", None)
    return int(rows) if rows else None
