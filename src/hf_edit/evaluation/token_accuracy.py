"""EasyEdit-style token metrics.  These are **not** the ROME paper's metrics (see :mod:`.counterfact` and
:mod:`.zsre` for those); they exist to compare with numbers reported by EasyEdit (zjunlp/EasyEdit).

Definitions, for a prompt P and a target X with ``x = tok(" " + X)`` (no special tokens):

* **token accuracy** (EasyEdit's ``rewrite_acc``/``rephrase_acc``): run ``tok(P) + x`` teacher-forced and take the
  fraction of ``j < |x|`` where the argmax after ``tok(P) + x[:j]`` equals ``x[j]``.
* **locality** (EasyEdit's ``locality_acc``): for an unrelated prompt and its answer, the same argmax ids are taken
  from the unedited and the edited model; locality is the fraction of positions where they agree (agreement with
  the unedited model, not correctness).

EasyEdit joins the strings (``P + " " + X``), tokenises the whole and reads the positions after ``len(tok(P))``
tokens.  hf_edit joins at the id level (``tok(P)``, the tokenizer's special tokens included, then ``x``), which
gives the same ids on GPT-2 whenever tokenising the joined string does not merge across the boundary, and avoids
misaligned positions for tokenizers (SentencePiece) where it does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..tokens import pad_token_id, target_ids
from .scoring import BatchContext, score_continuations

__all__ = ["easyedit_locality", "easyedit_predictions", "easyedit_rows", "easyedit_token_accuracy"]


def _as_list(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def easyedit_rows(tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str], targets: str | Sequence[str]
                  ) -> list[tuple[list[int], list[int]]]:
    """``(tok(prompt), tok(" " + target) without special tokens)`` for each pair.

    Raises:
        ValueError: the numbers of prompts and targets differ.
    """
    prompts, targets = _as_list(prompts), _as_list(targets)
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets.")
    return [(list(tokenizer(prompt)["input_ids"]), target_ids(tokenizer, target))
            for prompt, target in zip(prompts, targets)]


def easyedit_predictions(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str],
                         targets: str | Sequence[str], *, batch_size: int = 64,
                         batch_context: BatchContext | None = None) -> list[torch.Tensor]:
    """For each pair, the ``(|x|,)`` argmax ids after ``tok(prompt) + x[:j]``, ``j < |x|`` (teacher-forced), with
    ``x = tok(" " + target)``; all pairs batched together (``batch_context``: see ``score_continuations``)."""
    return _predict(model, tokenizer, easyedit_rows(tokenizer, prompts, targets), batch_size, batch_context)


def _predict(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[tuple[list[int], list[int]]],
             batch_size: int, batch_context: BatchContext | None) -> list[torch.Tensor]:
    scores = score_continuations(model, rows, pad_id=pad_token_id(tokenizer), batch_size=batch_size,
                                 batch_context=batch_context)
    return [score.predictions[: len(target)] for (_, target), score in zip(rows, scores)]


def easyedit_token_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: str | Sequence[str],
                            targets: str | Sequence[str], *, batch_size: int = 64,
                            batch_context: BatchContext | None = None) -> list[float]:
    """EasyEdit's teacher-forced token accuracy of each pair: the fraction of the tokens of ``x = tok(" " + target)``
    that the model's argmax after ``tok(prompt) + x[:j]`` reproduces, in [0, 1]."""
    rows = easyedit_rows(tokenizer, prompts, targets)
    predictions = _predict(model, tokenizer, rows, batch_size, batch_context)
    return [float((predicted == torch.tensor(target)).float().mean())
            for (_, target), predicted in zip(rows, predictions)]


def easyedit_locality(pre_predictions: Sequence[torch.Tensor | Sequence[int]],
                      post_predictions: Sequence[torch.Tensor | Sequence[int]]) -> float:
    """EasyEdit's locality: for each prompt the fraction of positions where the edited model's argmax (from
    :func:`easyedit_predictions`) equals the unedited model's, then the mean over prompts.

    Raises:
        ValueError: no prompts, different numbers of prompts, or a prompt with different or zero lengths.
    """
    if len(pre_predictions) != len(post_predictions) or not pre_predictions:
        raise ValueError(f"Need the same positive number of pre- and post-edit predictions, got "
                         f"{len(pre_predictions)} and {len(post_predictions)}.")
    fractions = []
    for pre, post in zip(pre_predictions, post_predictions):
        pre_ids, post_ids = torch.as_tensor(pre).flatten(), torch.as_tensor(post).flatten()
        if len(pre_ids) != len(post_ids) or len(pre_ids) == 0:
            raise ValueError(f"Pre- and post-edit predictions must have the same positive length, got "
                             f"{len(pre_ids)} and {len(post_ids)}.")
        fractions.append(float((pre_ids == post_ids).float().mean()))
    return float(np.mean(fractions))
