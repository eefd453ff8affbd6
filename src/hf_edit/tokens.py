"""Token-level arithmetic for edits: subject positions, target ids, padded batches.

Positions are found by **offset mapping**: the text is tokenised once, exactly as the forward pass sees it (special
tokens included), and the subject's token is the last one whose character span overlaps the subject's span.  This is
tokenizer-agnostic (BPE with or without BOS, SentencePiece) and gives the same positions as the reference's
arithmetic on GPT-2 BPE (:func:`reference_subject_last` reimplements that arithmetic for parity tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .errors import InvalidRequestError, SubjectNotFoundError, TokenizerError

__all__ = ["Encoded", "encode_with_subject", "target_ids", "pad_batch", "pad_token_id", "reference_subject_last"]


@dataclass(frozen=True)
class Encoded:
    """Token ids of a text and the indices of its subject's first and last tokens."""

    ids: list[int]
    subject_first: int
    subject_last: int


def _require_fast(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: hf_edit needs offset mappings to find the "
            "subject's tokens. Load it with AutoTokenizer.from_pretrained(..., use_fast=True).")


def encode_with_subject(tokenizer: PreTrainedTokenizerBase, prefix: str, subject: str, suffix: str) -> Encoded:
    """Tokenise ``prefix + subject + suffix`` and locate the last token covering the subject.

    Raises:
        SubjectNotFoundError: no token covers the subject (e.g. it was truncated away).
    """
    _require_fast(tokenizer)
    start, end = len(prefix), len(prefix) + len(subject)
    enc = tokenizer(prefix + subject + suffix, return_offsets_mapping=True)
    covering = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    if not covering:
        raise SubjectNotFoundError(
            f"No token of {prefix + subject + suffix!r} covers the subject {subject!r}.")
    return Encoded(ids=list(enc["input_ids"]), subject_first=covering[0], subject_last=covering[-1])


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Ids of ``" " + target`` (space added unless present, as the reference does), without special tokens."""
    text = target if target.startswith(" ") else " " + target
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidRequestError(f"The target {target!r} tokenises to nothing.")
    return ids


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used to pad batches: the tokenizer's pad token, else EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
              ) -> dict[str, torch.Tensor]:
    """Right-pad id lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def reference_subject_last(tokenizer: PreTrainedTokenizerBase, template: str, word: str) -> int:
    """The reference implementation's ``subject_last`` index (``get_words_idxs_in_templates``).

    Tokenises prefix, word and suffix separately; valid only for tokenizers that add no special tokens and for which
    separate tokenisation equals joint tokenisation (GPT-2 BPE).  Kept for parity tests.
    """
    if template.count("{}") != 1:
        raise InvalidRequestError(f"Template {template!r} must contain exactly one '{{}}'.")
    prefix, _ = template.split("{}")
    if prefix:
        if not prefix.endswith(" "):
            raise InvalidRequestError(f"Reference arithmetic needs a space before the subject in {template!r}.")
        prefix = prefix[:-1]
        word = " " + word.strip()
    prefix_len = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    word_len = len(tokenizer(word, add_special_tokens=False)["input_ids"])
    return prefix_len + word_len - 1
