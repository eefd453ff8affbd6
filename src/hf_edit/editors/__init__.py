"""Trainable editor networks (MEND, KE): training, the shareable artifact, and the gradient machinery.

* :func:`train_editor` trains a MEND or KE editor network for one base model on CounterFact/zsRE edits with a
  locality term on plain text (an ``accelerate`` loop: one CPU, one GPU or many; gradient accumulation, mixed
  precision, periodic evaluation, checkpoints and resume, a JSONL metrics log).
* :class:`EditorNetwork` (:class:`MENDNetwork`, :class:`KENetwork`) is the artifact: ``save_pretrained``,
  ``from_pretrained`` (folder or Hub id), ``push_to_hub``; it records the base model's weight fingerprint and
  refuses any other model (:class:`EditorMismatchError`).
* Edits are made with ``model.edit(requests, method=MENDConfig(editor=...))`` (or :class:`KEConfig`): one forward
  and one backward pass, returned as exact LoRA factors.
"""

from .matrices import (
    DEFAULT_N_LAST_LAYERS,
    EditedMatrix,
    GradientFactors,
    TokenBatch,
    default_editor_layers,
    encode_edits,
    encode_texts,
    find_edited_matrices,
    gradient_factors,
    locality_kl,
    low_rank_deltas,
    target_nll,
)
from .networks import (
    BaseModelInfo,
    EditorMismatchError,
    EditorNetwork,
    EditorNetworkError,
    KENetwork,
    KENetworkConfig,
    MENDNetwork,
    MENDNetworkConfig,
    base_weights_fingerprint,
)

#: Names loaded on first use (training pulls in the evaluation data loaders).
_LAZY = {"train_editor": "training", "EditorTrainingConfig": "training", "TrainingResult": "training",
         "evaluate_editor": "training", "prepare_training_data": "data", "EditorTrainingData": "data",
         "EditExample": "data", "read_locality_texts": "data"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "train_editor", "EditorTrainingConfig", "TrainingResult", "evaluate_editor", "prepare_training_data",
    "EditorTrainingData", "EditExample", "read_locality_texts",
    "EditorNetwork", "MENDNetwork", "KENetwork", "MENDNetworkConfig", "KENetworkConfig", "BaseModelInfo",
    "EditorMismatchError", "EditorNetworkError", "base_weights_fingerprint", "EditedMatrix", "GradientFactors",
    "TokenBatch", "find_edited_matrices", "default_editor_layers", "gradient_factors", "low_rank_deltas",
    "encode_edits", "encode_texts", "target_nll", "locality_kl", "DEFAULT_N_LAST_LAYERS",
]
