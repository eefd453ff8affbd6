"""Computing second-moment statistics C = E[k kᵀ] of the edited projection's input, and their cache (rome-spec §5).

ROME's left vector is u = C⁻¹k̄, where C is the uncentred second moment of the *key* (the input of the MLP output
projection) over every non-padding token of a sample of texts.  What is summed is the reference's
(``rome/layer_stats.py``): every token of the sampled texts (:func:`~hf_edit.stats.sample_texts`: the reference's
``random.Random(seed)`` permutation for local data, a seeded sample of a streamed prefix for Hub data sets), each
text truncated to the model's maximum length.  How it is summed is faster:

* the forward pass stops *before* the projection runs (a forward pre-hook), not after it;
* texts are tokenised a thousand at a time, sorted by length and cut into right-padded batches of about
  max(:data:`DEFAULT_BATCH_TOKENS`, 3 × max length) tokens (the reference: 3 × max length in groups of 100 texts).
  Padding stays at a few per cent, so texts are not packed into shared rows (on the CPU, a block-diagonal mask
  would cost more attention than the padding it saves);
* each batch's product kᵀk is computed over the upper block triangle only (blocks of :data:`GRAM_BLOCK` columns:
  5/8 of the multiply-adds of the full product for I = 1024) and added to a float64 sum; the lower triangle is
  filled in at the end, so S is exactly symmetric;
* the products are computed in ``product_dtype``, by default the statistics' dtype: float64 (exact products of the
  float32 keys) for the default ``dtype="float64"``, float32 for the reference's ``dtype="float32"``.  Float32
  products summed in float64 are faster; they put S within about 2e-7 (relative) of the exact float64 sum, against
  about 3e-7 for the reference's float32 running sum.

Statistics are cached on disk as safetensors files named by a content fingerprint (base weights, tokenizer, module,
data and its sampling scheme, sample size, maximum length, dtypes, seed), never by the model's display name.
Statistics computed from a Hub data set (keyed by its commit) are found again when the Hub cannot be reached.
Under an initialised ``torch.distributed`` group of several processes (``accelerate launch``) the batches are shared
out and the sums all-reduced (:mod:`hf_edit.stats.distributed`); the cache file and its key are the same
as a single process's.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architecture import EditTarget, base_layer, max_positions, unwrap_model
from ..errors import ConfigError, InsufficientStatisticsError, StatisticsError
from ..files import hf_edit_cache_dir
from ..hooks import StopForward, as_batch_seq, eval_mode, forward_hook, run_until
from ..tokens import pad_token_id
from ..version import __version__
from .distributed import ProcessGroup, attempt, current_group
from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .second_moment import CACHE_FORMAT, SecondMomentStats
from .texts import (
    STREAM_OVERSAMPLE,
    HubUnreachableError,
    SampledTexts,
    StreamEndedEarly,
    sample_texts,
)

__all__ = ["DEFAULT_BATCH_TOKENS", "GRAM_BLOCK", "GramSum", "compute_second_moment", "load_or_compute_stats",
           "load_or_compute_all_stats",
           "stats_cache_dir"]

logger = logging.getLogger(__name__)

_ACCUMULATION_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_TEXTS_PER_CHUNK = 1000  # texts tokenised, length-sorted and batched together (bounds memory)
#: Default tokens per batch (rows × padded width), at least 3 × the maximum length as in the reference.
DEFAULT_BATCH_TOKENS = 1024
#: Columns per block of the upper-block-triangular product kᵀk.
GRAM_BLOCK = 256


def stats_cache_dir() -> Path:
    """``$HF_EDIT_CACHE/stats`` if set, else ``$HF_HOME/hf_edit/stats`` (``~/.cache/huggingface`` by default)."""
    return hf_edit_cache_dir("stats")


def compute_second_moment(model: nn.Module, tokenizer: Any, target: EditTarget, *, dataset: Any,
                          n_samples: int | None, dtype: str = "float64", max_length: int | None = None,
                          batch_tokens: int | None = None, seed: int = 1,
                          base_context: Callable[[], AbstractContextManager] | None = None,
                          progress: bool = True, model_revision: str | None = None,
                          product_dtype: str | None = None,
                          stream_oversample: int = STREAM_OVERSAMPLE) -> SecondMomentStats:
    """Second-moment statistics of ``target``'s input over ``n_samples`` texts of ``dataset`` (no cache).

    Under an initialised ``torch.distributed`` group of several processes, every process must call this with the
    same arguments: each runs a share of the texts and every process returns the all-reduced statistics.

    Args:
        model: a transformers causal LM, possibly with LoRA layers (the module is hooked as it is).
        tokenizer: its tokenizer (default special tokens are added, as in the reference).
        target: the projection whose input is the key.
        dataset: anything :func:`~hf_edit.stats.sample_texts` accepts: a ``datasets.Dataset``, a local text file or
            folder, or a Hub dataset id (streamed; ``"wikipedia"`` means ``"wikimedia/wikipedia:20231101.en"``).
        n_samples: number of **texts** sampled (``None``: all).
        dtype: dtype of the stored sum and of the solve, ``"float64"`` (default; summed in float64, Cholesky
            solve) or ``"float32"`` (the reference's; summed in float64 and stored as float32, explicit inverse).
        max_length: truncation length, capped by the model's maximum length.
        batch_tokens: padded tokens per batch (default :data:`DEFAULT_BATCH_TOKENS`, at least 3 × max length).
            It only changes the order of the additions.
        seed: seed of the ``random.Random`` permutation of the texts (the reference uses 1).
        base_context: zero-argument callable giving a context manager under which ``model`` is the base model
            (e.g. ``peft_model.disable_adapter``).
        progress: show a tqdm progress bar (on the main process only).
        model_revision: the Hub revision ``model`` was loaded from (part of its fingerprint).
        product_dtype: dtype of each batch's products kᵀk before they are added to the float64 sum
            (default: ``dtype``).  ``"float64"``: exact products of the (float32) keys.  ``"float32"``: about 1.4×
            faster on CPU, far faster on GPUs with slow float64; S then differs from exact float64 by about 2e-7
            relative (float32 rounding), which moved u = C⁻¹k by up to 1e-5 relative on cf-facts-gpt2 (cond(C)
            ≈ 4e3) against 2e-5 for the reference's float32 running sum and inverse (benchmarks/bench_stats.py).
        stream_oversample: Hub data sets: the texts are sampled from the first ``stream_oversample × n_samples``
            rows of the stream.

    Raises:
        InsufficientStatisticsError: n ≤ I key vectors were seen.
        HubUnreachableError: a Hub data set while offline or without network (a :class:`StatisticsError`).
        ConfigError: bad dtype, data set or lengths.
        StatisticsError: another process failed, or the processes were given different arguments.
    """
    group = current_group()
    texts, descriptions = _prepare(group, model, tokenizer, [target], dataset, n_samples, dtype, max_length, seed,
                                   model_revision, product_dtype, stream_oversample, None)
    return _accumulate(group, model, tokenizer, [target], texts, descriptions, batch_tokens=batch_tokens,
                       base_context=base_context, progress=progress)[0]


def load_or_compute_stats(model: nn.Module, tokenizer: Any, target: EditTarget, *, dataset: Any,
                          n_samples: int | None, dtype: str = "float64", max_length: int | None = None,
                          batch_tokens: int | None = None, cache_dir: str | os.PathLike | None = None,
                          base_context: Callable[[], AbstractContextManager] | None = None, progress: bool = True,
                          seed: int = 1, model_revision: str | None = None, product_dtype: str | None = None,
                          stream_oversample: int = STREAM_OVERSAMPLE) -> SecondMomentStats:
    """Statistics from the content-addressed cache, or computed (see :func:`compute_second_moment`) and cached.

    The file is ``<cache_dir or stats_cache_dir()>/<module>__<key[:20]>.safetensors``; the result's ``path`` names
    it and its ``from_cache`` says whether it was read rather than computed by this call.  A Hub data set is keyed
    by the commit it resolves to; when the Hub cannot be reached, the newest cached statistics of the same data set
    with otherwise the same settings are used (and the commit they were computed from is logged).  Under an
    initialised ``torch.distributed`` group of several processes the computation is shared out, only the main
    process writes the file (atomically), and the other processes wait for it and then read it; the cache folder
    must be visible to all of them.

    Raises:
        StatisticsCacheError: the cache file exists but is corrupted or for another key (it is left untouched).
        InsufficientStatisticsError: too few key vectors (nothing is cached).
        HubUnreachableError: a Hub data set, no network (or offline mode) and nothing cached for it.
        StatisticsError: another process failed (nothing is cached), or the processes were given different
            arguments.
    """
    return load_or_compute_all_stats(
        model, tokenizer, [target], dataset=dataset, n_samples=n_samples, dtype=dtype, max_length=max_length,
        batch_tokens=batch_tokens, cache_dir=cache_dir, base_context=base_context, progress=progress, seed=seed,
        model_revision=model_revision, product_dtype=product_dtype, stream_oversample=stream_oversample)[0]


def load_or_compute_all_stats(model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget], *, dataset: Any,
                              n_samples: int | None, dtype: str = "float64", max_length: int | None = None,
                              batch_tokens: int | None = None, cache_dir: str | os.PathLike | None = None,
                              base_context: Callable[[], AbstractContextManager] | None = None,
                              progress: bool = True, seed: int = 1, model_revision: str | None = None,
                              product_dtype: str | None = None,
                              stream_oversample: int = STREAM_OVERSAMPLE) -> list[SecondMomentStats]:
    """:func:`load_or_compute_stats` for several modules (e.g. the layers of a MEMIT edit) with the same settings:
    those in the cache are read, and all the others are computed **together**, in one pass over the texts whose
    forward passes stop once the deepest of them has run.  Each result and each cache file equals what
    :func:`load_or_compute_stats` gives for that module alone (the same keys, products and additions).

    Raises:
        The errors of :func:`load_or_compute_stats`.
    """
    group = current_group()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else stats_cache_dir()
    texts, descriptions = _prepare(group, model, tokenizer, targets, dataset, n_samples, dtype, max_length, seed,
                                   model_revision, product_dtype, stream_oversample, folder)
    results: list[SecondMomentStats | None] = [None] * len(targets)
    missing: list[tuple[int, dict[str, Any], Path]] = []
    for i, (target, description) in enumerate(zip(targets, descriptions)):
        key = _cache_key(description)
        path = folder / _cache_name(target.name, key)
        exists = path.exists() if group is None or group.is_main else None
        if group is not None:
            exists = group.from_main(exists)  # one decision for all processes
        if exists:
            logger.info("Loading cached second-moment statistics from %s.", path)
            stats = SecondMomentStats.load(path, expected_key=key)
            stats.from_cache = True
            results[i] = stats
        else:
            missing.append((i, description, path))
    if missing:
        computed = _accumulate(group, model, tokenizer, [targets[i] for i, *_ in missing], texts,
                               [description for _, description, _ in missing], batch_tokens=batch_tokens,
                               base_context=base_context, progress=progress)
        for (i, description, path), stats in zip(missing, computed):
            key = _cache_key(description)
            if group is None:
                stats.save(path, key=key)
            else:
                _, error = attempt(lambda stats=stats, path=path, key=key: stats.save(path, key=key)) \
                    if group.is_main else (None, None)
                group.check_main(error, f"writing {path}")
                if not group.is_main:
                    stats = SecondMomentStats.load(path, expected_key=key)
            logger.info("Cached second-moment statistics in %s.", path)
            results[i] = stats
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# What the statistics depend on
# --------------------------------------------------------------------------------------------------------------
def _accumulation_dtype(dtype: str) -> torch.dtype:
    if dtype not in _ACCUMULATION_DTYPES:
        raise ConfigError(f"Statistics dtype must be one of {sorted(_ACCUMULATION_DTYPES)}, got {dtype!r}.")
    return _ACCUMULATION_DTYPES[dtype]


def _product_dtype(product_dtype: str) -> torch.dtype:
    if product_dtype not in _ACCUMULATION_DTYPES:
        raise ConfigError(f"product_dtype must be one of {sorted(_ACCUMULATION_DTYPES)}, got {product_dtype!r}.")
    return _ACCUMULATION_DTYPES[product_dtype]


def _max_length(model: nn.Module, max_length: int | None) -> int:
    """min(max_length, the model's n_positions / max_position_embeddings)."""
    if max_length is not None and int(max_length) < 1:
        raise ConfigError(f"max_length must be ≥ 1, got {max_length}.")
    limits = [int(x) for x in (max_length, max_positions(model)) if x]
    if not limits:
        raise ConfigError("The model config has no n_positions/max_position_embeddings: pass max_length.")
    return min(limits)


def _batch_tokens(batch_tokens: int | None, max_len: int) -> int:
    if batch_tokens is None:
        return max(DEFAULT_BATCH_TOKENS, 3 * max_len)
    if int(batch_tokens) < 1:
        raise ConfigError(f"batch_tokens must be ≥ 1, got {batch_tokens}.")
    return int(batch_tokens)


def _describe(model: nn.Module, tokenizer: Any, target: EditTarget, texts: SampledTexts, max_len: int, dtype: str,
              product_dtype: str, model_revision: str | None) -> dict[str, Any]:
    """Everything the statistics depend on (the cache key is a hash of this)."""
    return {"module": target.name, "model_fingerprint": model_fingerprint(model, model_revision),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "dataset": texts.dataset,
            "sampling": texts.sampling, "n_samples": None if texts.n_samples is None else int(texts.n_samples),
            "max_length": max_len, "dtype": dtype, "products": product_dtype, "seed": texts.seed,
            "format": CACHE_FORMAT}


class _Unreachable(SampledTexts):
    """A Hub sample that cannot be read (no network); its statistics were found in the cache."""

    def __init__(self, texts: SampledTexts, error: HubUnreachableError) -> None:
        super().__init__(texts.n_samples, texts.seed)
        self.dataset, self.sampling, self._error = texts.dataset, texts.sampling, error

    def chunks(self, size: int) -> Any:
        raise self._error

    def expected_texts(self) -> int | None:
        return self.n_samples


def _prepare_here(model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget], dataset: Any,
                  n_samples: int | None, dtype: str, max_length: int | None, seed: int, model_revision: str | None,
                  product_dtype: str | None, oversample: int,
                  cache_folder: Path | None) -> tuple[SampledTexts, list[dict[str, Any]]]:
    """The texts (sampled once) and each target's description (the model and tokenizer fingerprinted once; the
    descriptions differ only in the module)."""
    _accumulation_dtype(dtype)
    product_dtype = dtype if product_dtype is None else product_dtype
    _product_dtype(product_dtype)
    max_len = _max_length(model, max_length)

    def described(texts: SampledTexts) -> list[dict[str, Any]]:
        first = _describe(model, tokenizer, targets[0], texts, max_len, dtype, product_dtype, model_revision)
        return [{**first, "module": target.name} for target in targets]

    try:
        texts = sample_texts(dataset, n_samples, seed, oversample=oversample)
    except HubUnreachableError as unreachable:
        if cache_folder is None:
            raise
        unresolved = sample_texts(dataset, n_samples, seed, oversample=oversample, resolve=False)
        cached = [_cached_hub_description(cache_folder, target, description)
                  for target, description in zip(targets, described(unresolved))]
        if any(description is None for description in cached):
            raise
        logger.warning("The Hub cannot be reached; using the cached statistics of %s (the newest computed with "
                       "these settings). A newer commit of the data set cannot be checked for offline.",
                       ", ".join(sorted({d["dataset"] for d in cached})))
        return _Unreachable(unresolved, unreachable), cached  # type: ignore[return-value]
    return texts, described(texts)


def _prepare(group: ProcessGroup | None, *args: Any) -> tuple[SampledTexts, list[dict[str, Any]]]:
    """The texts and the descriptions of the statistics.  Several processes: the main process first (it may fill
    the datasets cache that the others then read), then the others; all must arrive at the same cache keys."""
    if group is None:
        return _prepare_here(*args)
    prepared, error = attempt(lambda: _prepare_here(*args)) if group.is_main else (None, None)
    group.check_main(error, "loading the statistics' data")
    if not group.is_main:
        prepared, error = attempt(lambda: _prepare_here(*args))
    group.check_all(error, "working out what the statistics are of (their cache key)",
                    agreed=None if prepared is None else ",".join(_cache_key(d) for d in prepared[1]))
    assert prepared is not None
    return prepared


def _cache_key(description: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what the statistics depend on."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _cache_name(module: str, key: str) -> str:
    return f"{module}__{key[:20]}.safetensors"


def _cached_hub_description(folder: Path, target: EditTarget, description: dict[str, Any]) -> dict[str, Any] | None:
    """The description of the newest cache file computed from the same Hub data set (any commit) with otherwise
    the same settings as ``description`` (whose ``dataset`` is the data set's fingerprint without the commit)."""
    prefix = description["dataset"]
    found: list[tuple[float, dict[str, Any]]] = []
    for path in folder.glob(f"{target.name}__*.safetensors") if folder.is_dir() else ():
        recorded = SecondMomentStats.read_metadata(path).get("dataset")
        if isinstance(recorded, str) and recorded.startswith(prefix) and len(recorded) > len(prefix):
            candidate = {**description, "dataset": recorded}
            if path.name == _cache_name(target.name, _cache_key(candidate)):
                found.append((path.stat().st_mtime, candidate))
    return max(found, key=lambda item: item[0])[1] if found else None


# --------------------------------------------------------------------------------------------------------------
# Accumulation
# --------------------------------------------------------------------------------------------------------------
def _length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group indices, longest first, into batches with rows × width ≤ batch_tokens (a longer text goes alone)."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _token_batches(texts: list[str], tokenizer: Any, max_len: int, batch_tokens: int) -> list[list[list[int]]]:
    """Tokenise ``texts`` (truncated, default special tokens), drop empty ones, group them into batches."""
    rows = [ids for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"] if ids]
    return [[rows[i] for i in batch] for batch in _length_batches([len(r) for r in rows], batch_tokens)]


def _accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(unwrap_model(model).forward).parameters


class GramSum:
    """S = Σ kᵀk over batches of key vectors, kept in float64.

    Each batch's product is computed in ``product_dtype`` over the upper block triangle only (row blocks of
    ``block`` columns times the columns from the block's diagonal on), then added to the float64 sum;
    :meth:`result` fills in the lower triangle from the upper one, so S is exactly symmetric.  With float32
    products, each entry's rounding error is of the order of ε₃₂ = 6e-8 times Σ|k_i k_j| over the batch; summing
    the batches in float64 adds nothing measurable, unlike a float32 running sum over millions of tokens.

    Args:
        dim: key width I.
        device: where the sum is kept (the module's device).
        product_dtype: ``torch.float32`` or ``torch.float64``.
        block: columns per block (:data:`GRAM_BLOCK`).
    """

    def __init__(self, dim: int, device: torch.device | str, product_dtype: torch.dtype = torch.float32,
                 block: int = GRAM_BLOCK) -> None:
        self.dim, self.block, self.product_dtype = int(dim), max(1, int(block)), product_dtype
        self.total = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, keys: torch.Tensor) -> None:
        """Add kᵀk of ``keys`` (n, I) and count its n vectors."""
        keys = keys.to(device=self.total.device, dtype=self.product_dtype)
        for start in range(0, self.dim, self.block):
            stop = min(start + self.block, self.dim)
            self.total[start:stop, start:] += keys[:, start:stop].T @ keys[:, start:]
        self.count += int(keys.shape[0])

    def result(self) -> torch.Tensor:
        """The symmetric float64 sum S."""
        return torch.triu(self.total) + torch.triu(self.total, 1).T


def _accumulate(group: ProcessGroup | None, model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget],
                texts: SampledTexts, descriptions: Sequence[dict[str, Any]], *, batch_tokens: int | None,
                base_context: Callable[[], Any] | None, progress: bool) -> list[SecondMomentStats]:
    """Run the sampled texts through the base model and sum k kᵀ over their non-padding tokens, for every target
    from the same forward passes; with several processes, each runs its share of the batches and their sums are
    added up.  ``descriptions``: one per target (they differ only in the module)."""
    description = descriptions[0]
    acc_dtype = _accumulation_dtype(description["dtype"])
    product_dtype = _product_dtype(description["products"])
    max_len = description["max_length"]
    tokens_per_batch = _batch_tokens(batch_tokens, max_len)
    expected = texts.expected_texts()
    names = ", ".join(t.name for t in targets)
    logger.info("Computing second-moment statistics of %s over %s texts of %s (%s%s).", names,
                "all" if expected is None else expected, description["dataset"], description["dtype"],
                "" if group is None else f", {group.size} processes")
    if torch.get_float32_matmul_precision() != "highest":
        logger.warning("torch.set_float32_matmul_precision(%r) is in effect: the keys and their products are "
                       "computed with reduced precision (TF32/bf16), which degrades the statistics. Set it to "
                       "'highest' to compute them.", torch.get_float32_matmul_precision())

    def local_sums() -> tuple[list[torch.Tensor], list[int], int]:
        context: AbstractContextManager = base_context() if base_context is not None else contextlib.nullcontext()
        with context, eval_mode(model), torch.no_grad():
            while True:
                try:
                    return _sum_keys(model, tokenizer, targets, texts.chunks(_TEXTS_PER_CHUNK), texts.expected_texts(),
                                     product_dtype, max_len, tokens_per_batch,
                                     progress and (group is None or group.is_main), group)
                except StreamEndedEarly as short:
                    texts.redraw(short.rows)

    if group is None:
        totals, counts, n_texts = local_sums()
    else:
        sums, error = attempt(local_sums)
        group.check_all(error, f"computing its share of the statistics of {names}")
        assert sums is not None
        n_texts = sums[2]
        reduced = [group.all_sum(total, count) for total, count in zip(sums[0], sums[1])]
        totals, counts = [r[0] for r in reduced], [r[1] for r in reduced]
    results = []
    for target, this, total, count in zip(targets, descriptions, totals, counts):
        if count <= target.in_features:
            raise InsufficientStatisticsError(
                f"Only {count} key vectors from {n_texts} texts for the {target.in_features}-dimensional second "
                f"moment of {target.name}; more than {target.in_features} are needed. Use more text "
                "(mom2_n_samples, a larger data set or a larger max_length).")
        metadata = {**this, **texts.details(), "texts_read": n_texts, "hf_edit_version": __version__,
                    "source": "computed", "world_size": 1 if group is None else group.size}
        results.append(SecondMomentStats(total.to(acc_dtype).cpu(), count, metadata))
    return results


def _sum_keys(model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget], chunks: Iterable[list[str]],
              expected: int | None, product_dtype: torch.dtype, max_len: int, batch_tokens: int, progress: bool,
              group: ProcessGroup | None = None) -> tuple[list[torch.Tensor], list[int], int]:
    """(Σ k kᵀ in float64 and n vectors of each target, texts read) over the texts, each sum on the device of its
    module's weight, all targets from the same forward passes; with a ``group``, over this process's share only.

    Every process forms the same batches as a single process would and runs every ``group.size``-th of them, so
    each key vector and each batch's product is computed exactly as a single process computes it: only the order
    of the float64 additions differs from the single-process result.
    """
    modules = [unwrap_model(model).get_submodule(t.name) for t in targets]
    grams = [GramSum(t.in_features, base_layer(m).weight.device, product_dtype) for t, m in zip(targets, modules)]
    device = base_layer(modules[0]).weight.device
    pad_id = pad_token_id(tokenizer)
    with_positions = _accepts(model, "position_ids")
    batch_number = n_texts = 0
    label = targets[0].name if len(targets) == 1 else f"{targets[0].name} (+{len(targets) - 1} modules)"
    with tqdm(total=expected, disable=not progress, desc=f"mom2 {label}", unit="text") as bar:
        for chunk in chunks:
            for rows in _token_batches(chunk, tokenizer, max_len, batch_tokens):
                batch_number += 1
                if group is not None and not group.owns(batch_number - 1):
                    continue
                keys = _batch_keys(model, modules, _padded(rows, pad_id, device, with_positions), targets)
                for gram, these in zip(grams, keys):
                    gram.add(these)
                bar.update(len(rows))
            n_texts += len(chunk)
            bar.update(n_texts - bar.n)  # texts dropped because they tokenise to nothing, and other processes'
    return [g.result() for g in grams], [g.count for g in grams], n_texts


def _padded(rows: list[list[int]], pad_id: int, device: torch.device, with_positions: bool) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` (and ``position_ids`` 0..width−1) of a batch."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    lengths = torch.tensor([len(row) for row in rows])
    inputs = {"input_ids": ids.to(device),
              "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long().to(device)}
    if with_positions:
        inputs["position_ids"] = torch.arange(width, device=device).expand(len(rows), -1)
    return inputs


def _batch_keys(model: nn.Module, modules: Sequence[nn.Module], inputs: dict[str, torch.Tensor],
                targets: Sequence[EditTarget]) -> list[torch.Tensor]:
    """Each module's input vectors at the non-padding positions of one batch, (tokens, I) each.  The forward pass
    stops as soon as the last of the modules is called, before it computes anything."""
    mask = inputs["attention_mask"]
    seen: dict[int, torch.Tensor] = {}

    def make_hook(i: int) -> Callable[[nn.Module, tuple], None]:
        def record_input(_module: nn.Module, args: tuple) -> None:
            seen[i] = args[0]
            if len(seen) == len(modules):
                raise StopForward
        return record_input

    with contextlib.ExitStack() as hooks:
        for i, module in enumerate(modules):
            hooks.enter_context(forward_hook(module, make_hook(i), pre=True))
        run_until(model, **inputs, use_cache=False)
    missing = [t.name for i, t in enumerate(targets) if i not in seen]
    if missing:
        raise StatisticsError(f"Module {', '.join(missing)} did not run during the forward pass.")
    out = []
    for i in range(len(modules)):
        keys = as_batch_seq(seen[i].detach(), tuple(mask.shape))
        out.append(keys.reshape(-1, keys.shape[-1]) if bool(mask.all())  # no padding: a view, no copy
                   else keys[mask.to(keys.device).bool()])
    return out
