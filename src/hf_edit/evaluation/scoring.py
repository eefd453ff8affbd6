"""Teacher-forced scoring of continuations, batched across prompts and cases.

Every probability metric of the ROME paper reduces to one primitive: run ``context + target`` through the model and
read, at each position that predicts a target token, that token's log-probability and the model's argmax.
A row longer than the model's positions loses the first tokens of its context (with a logged warning).
:func:`score_continuations` does this for many rows at once: rows are sorted by length, right-padded into batches
of at most ``batch_size`` rows, and the LM head runs only at the positions read.  Log-softmax is taken in float32
whatever the model's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..architecture import max_positions, unwrap_model
from ..hooks import eval_mode, only_positions
from ..tokens import pad_batch

logger = logging.getLogger(__name__)

__all__ = ["ContinuationScore", "score_continuations", "input_device"]

#: Called with the indices (into ``rows``) of the rows of a batch; returns a context entered around its forward.
BatchContext = Callable[[list[int]], AbstractContextManager]


@dataclass(frozen=True)
class ContinuationScore:
    """Scores of one ``(context, target)`` row.

    Attributes:
        target_logprobs: ``(len(target),)`` float32 log-probabilities of each target token given everything before.
        predictions: ``(len(target) + 1,)`` argmax ids after ``context + target[:j]`` for ``j = 0 … len(target)``.
    """

    target_logprobs: torch.Tensor
    predictions: torch.Tensor

    @property
    def mean_nll(self) -> float:
        """The mean per-token negative log-likelihood of the target (the reference's ``*_probs`` value)."""
        return float(-self.target_logprobs.mean()) if len(self.target_logprobs) else float("nan")


def input_device(model: nn.Module) -> torch.device:
    """The device of the input embedding (where input ids must go), also under ``device_map`` dispatch."""
    embeddings = unwrap_model(model).get_input_embeddings()
    return embeddings.weight.device


def score_continuations(model: nn.Module, rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int,
                        batch_size: int = 64, batch_context: BatchContext | None = None
                        ) -> list[ContinuationScore]:
    """Teacher-forced scores of ``target`` after ``context`` for every row, in the order given.

    Args:
        model: a causal LM (a ``PeftModel`` or an ``EditedModel``'s model works too).
        rows: ``(context_ids, target_ids)`` pairs; the context must be non-empty, the target may be empty.
        pad_id: the id used for right padding (masked out).
        batch_size: rows per forward pass.
        batch_context: optional factory of a context manager entered around each batch's forward pass; it gets
            the indices of the rows in that batch (used to apply per-row edits).
    """
    if any(len(context) == 0 for context, _ in rows):
        raise ValueError("Every row needs a non-empty context to condition on.")
    rows = _fit_positions(rows, max_positions(model))
    head = unwrap_model(model).get_output_embeddings()
    device = input_device(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    results: list[ContinuationScore | None] = [None] * len(rows)
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for index, score in zip(batch, _score_batch(model, head, [rows[i] for i in batch], pad_id, device,
                                                        batch_context(batch) if batch_context else nullcontext())):
                results[index] = score
    return results  # type: ignore[return-value]


def _fit_positions(rows: Sequence[tuple[Sequence[int], Sequence[int]]], limit: int | None
                   ) -> Sequence[tuple[Sequence[int], Sequence[int]]]:
    """Rows longer than the model's positions lose their context's first tokens (with a warning): only models
    with very short contexts (e.g. 64 positions) meet CounterFact prompts that long."""
    if limit is None or all(len(c) + len(t) <= limit for c, t in rows):
        return rows
    if any(len(t) >= limit for _, t in rows):
        raise ValueError(f"A target is at least as long as the model's {limit} positions; it cannot be scored.")
    cut = [(c[len(c) + len(t) - limit:] if len(c) + len(t) > limit else c, t) for c, t in rows]
    longer = sum(len(c) + len(t) > limit for c, t in rows)
    logger.warning("%d of %d scored rows are longer than the model's %d positions; their prompts were cut from "
                   "the left to fit.", longer, len(rows), limit)
    return cut


def _score_batch(model: nn.Module, head: nn.Module, rows: list[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                 device: torch.device, context: AbstractContextManager) -> list[ContinuationScore]:
    inputs = pad_batch([list(c) + list(t) for c, t in rows], pad_id, device)
    read_rows, read_positions = [], []
    for r, (c, t) in enumerate(rows):
        read_rows += [r] * (len(t) + 1)
        read_positions += range(len(c) - 1, len(c) + len(t))
    row_index, positions = torch.tensor(read_rows), torch.tensor(read_positions)
    with context, only_positions(head, row_index, positions):
        logits = model(**inputs).logits[0].float()
    logprobs = logits.log_softmax(-1)
    predictions = logits.argmax(-1).cpu()
    scores, offset = [], 0
    for c, t in rows:
        span = slice(offset, offset + len(t) + 1)
        targets = torch.tensor(list(t), dtype=torch.long, device=logprobs.device)
        token_logprobs = logprobs[span][torch.arange(len(t), device=logprobs.device), targets]
        scores.append(ContinuationScore(target_logprobs=token_logprobs.cpu(), predictions=predictions[span]))
        offset += len(t) + 1
    return scores
