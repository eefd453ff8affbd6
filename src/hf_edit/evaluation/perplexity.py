"""Perplexity of a causal LM on plain text, the standard check that edits leave the model's language intact."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..architecture import max_positions
from ..hooks import eval_mode
from .scoring import input_device

__all__ = ["perplexity", "token_windows"]


def token_windows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], window: int,
                  max_windows: int | None = None) -> list[list[int]]:
    """The texts' tokens (joined by newlines, no special tokens) cut into non-overlapping windows of ``window``
    tokens (the last partial window is dropped)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}.")
    ids = tokenizer("\n".join(t for t in texts if t.strip()), add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    return windows[:max_windows] if max_windows is not None else windows


def perplexity(model: nn.Module, windows: Sequence[Sequence[int]], *, batch_size: int = 16) -> float:
    """exp of the mean next-token NLL over every predicted token of the windows (float32 log-softmax).

    Each window is scored on its own (no context from the previous one), all windows of a batch having the same
    length, so no padding is involved.
    """
    if not windows:
        raise ValueError("No text windows to compute a perplexity on.")
    limit = max_positions(model)
    if limit is not None and max(len(w) for w in windows) > limit:
        raise ValueError(f"Windows are longer than the model's {limit} positions.")
    device = input_device(model)
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(windows), batch_size):
            batch = [list(w) for w in windows[start:start + batch_size]]
            for length in sorted({len(w) for w in batch}):
                ids = torch.tensor([w for w in batch if len(w) == length], device=device)
                logprobs = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
                total -= logprobs.gather(-1, ids[:, 1:, None]).sum().item()
                count += ids[:, 1:].numel()
    return math.exp(total / count)
