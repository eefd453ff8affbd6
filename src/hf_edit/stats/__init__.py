"""Second-moment statistics C = E[k kᵀ] of the edited projection's input (rome-spec §5).

- :mod:`~hf_edit.stats.second_moment`: :class:`SecondMomentStats` and its file formats (safetensors cache files,
  the reference's ``.npz`` files).
- :mod:`~hf_edit.stats.compute`: computing C (the reference's sum, computed faster: :class:`GramSum`), and the
  content-addressed cache (:func:`load_or_compute_stats`, :func:`stats_cache_dir`); several modules' statistics
  in one pass over the texts (:func:`load_or_compute_all_stats`).
- :mod:`~hf_edit.stats.fingerprint`: what identifies the model and tokenizer in a cache key.
- :mod:`~hf_edit.stats.texts`: the text data sets statistics are computed over, and how they are sampled
  (local data: the reference's permutation; Hub data sets: streamed, a seeded sample of a prefix).
- :mod:`~hf_edit.stats.distributed`: sharing the computation among the processes of ``accelerate launch``.
"""

from ..files import file_sha256, looks_like_local_path
from .compute import (
    DEFAULT_BATCH_TOKENS,
    GRAM_BLOCK,
    GramSum,
    compute_second_moment,
    load_or_compute_all_stats,
    load_or_compute_stats,
    stats_cache_dir,
)
from .distributed import init_distributed
from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .second_moment import CACHE_FORMAT, REFERENCE_CONSTRUCTOR, SecondMomentStats
from .texts import (
    DATASET_ALIASES,
    STREAM_OVERSAMPLE,
    HubUnreachableError,
    SampledTexts,
    sample_texts,
    text_dataset,
)

__all__ = [
    "CACHE_FORMAT",
    "DATASET_ALIASES",
    "DEFAULT_BATCH_TOKENS",
    "GRAM_BLOCK",
    "REFERENCE_CONSTRUCTOR",
    "STREAM_OVERSAMPLE",
    "GramSum",
    "HubUnreachableError",
    "SampledTexts",
    "SecondMomentStats",
    "compute_second_moment",
    "file_sha256",
    "init_distributed",
    "load_or_compute_all_stats",
    "load_or_compute_stats",
    "looks_like_local_path",
    "model_fingerprint",
    "sample_texts",
    "stats_cache_dir",
    "text_dataset",
    "tokenizer_fingerprint",
]
