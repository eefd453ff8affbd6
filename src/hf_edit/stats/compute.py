"""Computing second-moment statistics C = E[k kᵀ] of the edited projection's input, and their cache (rome-spec §5).

ROME's left vector is u = C⁻¹ k̄, where C is the uncentred second moment of the *key* (the input of the MLP output
projection) over every non-padding token of a sample of texts.  C is computed faithfully to the reference
(``rome/layer_stats.py``): ``random.Random(seed)`` permutation of the texts, the first ``n_samples`` kept, each text
truncated to the model's maximum length, length-sorted right-padded batches, forward pass stopped after the module.

Statistics are cached on disk as safetensors files named by a content fingerprint (base weights, tokenizer, module,
data, sample size, maximum length, dtype, seed), never by the model's display name.  Under an initialised
``torch.distributed`` group of several processes (``accelerate launch``) the batches are shared out and the sums
all-reduced (:mod:`hf_edit.stats.distributed`); the cache file and its key are the same as a single process's.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architecture import EditTarget, base_layer, max_positions, unwrap_model
from ..errors import ConfigError, InsufficientStatisticsError, StatisticsError
from ..files import hf_edit_cache_dir
from ..hooks import capture, eval_mode, run_until
from ..tokens import pad_batch, pad_token_id
from ..version import __version__
from .distributed import ProcessGroup, attempt, current_group
from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .second_moment import CACHE_FORMAT, SecondMomentStats
from .texts import text_dataset

if TYPE_CHECKING:
    import datasets

__all__ = ["compute_second_moment", "load_or_compute_stats", "stats_cache_dir"]

logger = logging.getLogger(__name__)

_ACCUMULATION_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_TEXTS_PER_CHUNK = 1000  # texts tokenised, length-sorted and batched together (bounds memory)


def stats_cache_dir() -> Path:
    """``$HF_EDIT_CACHE/stats`` if set, else ``$HF_HOME/hf_edit/stats`` (``~/.cache/huggingface`` by default)."""
    return hf_edit_cache_dir("stats")


def compute_second_moment(model: nn.Module, tokenizer: Any, target: EditTarget, *, dataset: Any,
                          n_samples: int | None, dtype: str = "float64", max_length: int | None = None,
                          batch_tokens: int | None = None, seed: int = 1,
                          base_context: Callable[[], AbstractContextManager] | None = None,
                          progress: bool = True, model_revision: str | None = None) -> SecondMomentStats:
    """Second-moment statistics of ``target``'s input over ``n_samples`` texts of ``dataset`` (no cache).

    Under an initialised ``torch.distributed`` group of several processes, every process must call this with the
    same arguments: each runs a share of the texts and every process returns the all-reduced statistics.

    Args:
        model: a transformers causal LM, possibly with LoRA layers (the module is hooked as it is).
        tokenizer: its tokenizer (default special tokens are added, as in the reference).
        target: the projection whose input is the key.
        dataset: anything :func:`~hf_edit.stats.text_dataset` accepts.
        n_samples: number of **texts** sampled (``None``: all).
        dtype: accumulation dtype, ``"float64"`` (default) or ``"float32"`` (the reference's).
        max_length: truncation length, capped by the model's maximum length.
        batch_tokens: padded tokens per batch (default 3 × max length, as the reference).
        seed: seed of the ``random.Random`` permutation of the texts (the reference uses 1).
        base_context: zero-argument callable giving a context manager under which ``model`` is the base model
            (e.g. ``peft_model.disable_adapter``).
        progress: show a tqdm progress bar (on the main process only).
        model_revision: the Hub revision ``model`` was loaded from (part of its fingerprint).

    Raises:
        InsufficientStatisticsError: n ≤ I key vectors were seen.
        ConfigError: bad dtype, data set or lengths.
        StatisticsError: another process failed, or the processes were given different arguments.
    """
    group = current_group()
    ds, description = _prepare(group, model, tokenizer, target, dataset, n_samples, dtype, max_length, seed,
                               model_revision)
    return _accumulate(group, model, tokenizer, target, ds, description, batch_tokens=batch_tokens,
                       base_context=base_context, progress=progress)


def load_or_compute_stats(model: nn.Module, tokenizer: Any, target: EditTarget, *, dataset: Any,
                          n_samples: int | None, dtype: str = "float64", max_length: int | None = None,
                          batch_tokens: int | None = None, cache_dir: str | os.PathLike | None = None,
                          base_context: Callable[[], AbstractContextManager] | None = None, progress: bool = True,
                          seed: int = 1, model_revision: str | None = None) -> SecondMomentStats:
    """Statistics from the content-addressed cache, or computed (see :func:`compute_second_moment`) and cached.

    The file is ``<cache_dir or stats_cache_dir()>/<module>__<key[:20]>.safetensors``; the result's ``path`` names
    it and its ``from_cache`` says whether it was read rather than computed by this call.  Under an initialised
    ``torch.distributed`` group of several processes the computation is shared out, only the main process writes
    the file (atomically), and the other processes wait for it and then read it; the cache folder must be visible to
    all of them.

    Raises:
        StatisticsCacheError: the cache file exists but is corrupted or for another key (it is left untouched).
        InsufficientStatisticsError: too few key vectors (nothing is cached).
        StatisticsError: another process failed (nothing is cached), or the processes were given different
            arguments.
    """
    group = current_group()
    ds, description = _prepare(group, model, tokenizer, target, dataset, n_samples, dtype, max_length, seed,
                               model_revision)
    key = _cache_key(description)
    path = Path(cache_dir).expanduser() if cache_dir is not None else stats_cache_dir()
    path = path / f"{target.name}__{key[:20]}.safetensors"
    exists = path.exists() if group is None or group.is_main else None
    if group is not None:
        exists = group.from_main(exists)  # one decision for all processes
    if exists:
        logger.info("Loading cached second-moment statistics from %s.", path)
        stats = SecondMomentStats.load(path, expected_key=key)
        stats.from_cache = True
        return stats
    stats = _accumulate(group, model, tokenizer, target, ds, description, batch_tokens=batch_tokens,
                        base_context=base_context, progress=progress)
    if group is None:
        stats.save(path, key=key)
    else:
        _, error = attempt(lambda: stats.save(path, key=key)) if group.is_main else (None, None)
        group.check_main(error, f"writing {path}")
        if not group.is_main:
            stats = SecondMomentStats.load(path, expected_key=key)
    logger.info("Cached second-moment statistics in %s.", path)
    return stats


# --------------------------------------------------------------------------------------------------------------
# What the statistics depend on
# --------------------------------------------------------------------------------------------------------------
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


def _prepare_here(model: nn.Module, tokenizer: Any, target: EditTarget, dataset: Any, n_samples: int | None,
                  dtype: str, max_length: int | None, seed: int,
                  model_revision: str | None) -> tuple[datasets.Dataset, dict[str, Any]]:
    _accumulation_dtype(dtype)
    ds, dataset_fingerprint = text_dataset(dataset)
    max_len = _max_length(model, max_length)
    return ds, _describe(model, tokenizer, target, dataset_fingerprint, n_samples, max_len, dtype, seed,
                         model_revision)


def _prepare(group: ProcessGroup | None, *args: Any) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The texts and the description of the statistics.  Several processes: the main process first (it may fill the
    datasets cache that the others then read), then the others; all must arrive at the same cache key."""
    if group is None:
        return _prepare_here(*args)
    prepared, error = attempt(lambda: _prepare_here(*args)) if group.is_main else (None, None)
    group.check_main(error, "loading the statistics' data")
    if not group.is_main:
        prepared, error = attempt(lambda: _prepare_here(*args))
    group.check_all(error, "working out what the statistics are of (their cache key)",
                    agreed=None if prepared is None else _cache_key(prepared[1]))
    assert prepared is not None
    return prepared


def _cache_key(description: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what the statistics depend on."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Accumulation
# --------------------------------------------------------------------------------------------------------------
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


def _token_batches(texts: list[str], tokenizer: Any, max_len: int, batch_tokens: int) -> list[list[list[int]]]:
    """Tokenise ``texts`` (truncated, default special tokens), drop empty ones, group them into batches."""
    rows = [ids for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"] if ids]
    return [[rows[i] for i in batch] for batch in _length_batches([len(r) for r in rows], batch_tokens)]


def _accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(unwrap_model(model).forward).parameters


def _accumulate(group: ProcessGroup | None, model: nn.Module, tokenizer: Any, target: EditTarget,
                ds: datasets.Dataset, description: dict[str, Any], *, batch_tokens: int | None,
                base_context: Callable[[], Any] | None, progress: bool) -> SecondMomentStats:
    """Run the sampled texts through the base model and sum k kᵀ over their non-padding tokens; with several
    processes, each runs its share of the batches and their sums are added up."""
    indices = _sample_indices(len(ds), description["n_samples"], description["seed"])
    logger.info("Computing second-moment statistics of %s over %d texts (%s%s).", target.name, len(indices),
                description["dtype"], "" if group is None else f", {group.size} processes")
    acc_dtype = _accumulation_dtype(description["dtype"])
    max_len = description["max_length"]

    def local_sums() -> tuple[torch.Tensor, int]:
        texts = ds.select(indices)
        context: AbstractContextManager = base_context() if base_context is not None else contextlib.nullcontext()
        with context, eval_mode(model), torch.no_grad():
            return _sum_keys(model, tokenizer, target, texts, acc_dtype, max_len, int(batch_tokens or 3 * max_len),
                             progress and (group is None or group.is_main), group)

    if group is None:
        total, count = local_sums()
    else:
        sums, error = attempt(local_sums)
        group.check_all(error, f"computing its share of the statistics of {target.name}")
        assert sums is not None
        total, count = group.all_sum(*sums)
    if count <= target.in_features:
        raise InsufficientStatisticsError(
            f"Only {count} key vectors from {len(indices)} texts for the {target.in_features}-dimensional second "
            f"moment of {target.name}; more than {target.in_features} are needed. Use more text (mom2_n_samples, "
            "a larger data set or a larger max_length).")
    metadata = {**description, "hf_edit_version": __version__, "source": "computed",
                "world_size": 1 if group is None else group.size}
    return SecondMomentStats(total.cpu(), count, metadata)


def _sum_keys(model: nn.Module, tokenizer: Any, target: EditTarget, texts: datasets.Dataset,
              acc_dtype: torch.dtype, max_len: int, batch_tokens: int, progress: bool,
              group: ProcessGroup | None = None) -> tuple[torch.Tensor, int]:
    """(Σ k kᵀ, n) over the texts, on the device of the module's weight; with a ``group``, over this process's
    share of the batches only.

    Every process forms the same batches as a single process would and runs every ``group.size``-th of them, so
    each key vector is computed exactly as a single process computes it: only the order of the float64 additions
    differs from the single-process result.
    """
    module = unwrap_model(model).get_submodule(target.name)
    device = base_layer(module).weight.device
    pad_id = pad_token_id(tokenizer)
    with_positions = _accepts(model, "position_ids")
    total = torch.zeros(target.in_features, target.in_features, dtype=acc_dtype, device=device)
    count = batch_number = 0
    with tqdm(total=len(texts), disable=not progress, desc=f"mom2 {target.name}") as bar:
        for start in range(0, len(texts), _TEXTS_PER_CHUNK):
            chunk = texts[start:start + _TEXTS_PER_CHUNK]["text"]
            for rows in _token_batches(chunk, tokenizer, max_len, batch_tokens):
                batch_number += 1
                if group is not None and not group.owns(batch_number - 1):
                    continue
                inputs = pad_batch(rows, pad_id, device)
                if with_positions:
                    inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1], device=device).expand(
                        len(rows), -1)
                keys = _batch_keys(model, module, inputs, target).to(device=device, dtype=acc_dtype)
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
