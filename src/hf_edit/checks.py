"""Did an edit take?  The new target's probability and rank on the edit's own prompt, and the old target's.

:class:`~hf_edit.EditedModel` runs :func:`check_requests` after every edit (results in each edit's ``info["checks"]``,
a warning when the new target is not the top prediction) and in :meth:`~hf_edit.EditedModel.verify_edits`, which
tells which of many edits still hold after the later ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .architecture import unwrap_model
from .hooks import eval_mode, only_positions
from .requests import EditRequest
from .tokens import pad_batch, pad_token_id, target_ids

__all__ = ["EditCheck", "check_requests", "Verification", "VerificationRow"]


@dataclass(frozen=True)
class EditCheck:
    """The model's answer to one request's own prompt.

    Attributes:
        p_new: P(target_new | prompt), the product of its tokens' teacher-forced probabilities.
        rank_new: rank of target_new's first token among the next-token predictions (0 = top).
        p_old: P(target_true | prompt), when the request names the old target.
        rank_old: rank of target_true's first token.
        top: the model's top next token (decoded).
    """

    p_new: float
    rank_new: int
    p_old: float | None = None
    rank_old: int | None = None
    top: str = ""

    @property
    def took(self) -> bool:
        """The new target's first token is the top prediction."""
        return self.rank_new == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"took": self.took}


@torch.no_grad()
def check_requests(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], *,
                   batch_size: int = 32) -> list[EditCheck]:
    """:class:`EditCheck` of every request on ``model`` as it is (two batched passes)."""
    from .evaluation.scoring import score_continuations  # the evaluation package imports EditedModel

    if not requests:
        return []
    pad = pad_token_id(tokenizer)
    contexts = [list(tokenizer(r.filled_prompt)["input_ids"]) for r in requests]
    new = [target_ids(tokenizer, r.target_new) for r in requests]
    old = [target_ids(tokenizer, r.target_true) if r.target_true else None for r in requests]
    rows = [(c, t) for c, t in zip(contexts, new, strict=True)]
    rows += [(c, t) for c, t in zip(contexts, old, strict=True) if t is not None]
    with eval_mode(model):
        scores = score_continuations(model, rows, pad_id=pad, batch_size=batch_size)
        next_logits = _next_token_logits(model, contexts, pad, batch_size)
    old_scores = iter(scores[len(requests):])
    checks = []
    for i, request in enumerate(requests):
        logits = next_logits[i]
        rank = lambda token: int((logits > logits[token]).sum())  # noqa: E731
        old_score = next(old_scores) if old[i] is not None else None
        checks.append(EditCheck(
            p_new=math.exp(float(scores[i].target_logprobs.sum())), rank_new=rank(new[i][0]),
            p_old=None if old_score is None else math.exp(float(old_score.target_logprobs.sum())),
            rank_old=None if old[i] is None else rank(old[i][0]),
            top=tokenizer.decode([int(logits.argmax())])))
    return checks


def _next_token_logits(model: nn.Module, contexts: list[list[int]], pad: int, batch_size: int) -> torch.Tensor:
    """Float32 logits of the next token after each context, (n, vocab) on the CPU."""
    head = unwrap_model(model).get_output_embeddings()
    device = unwrap_model(model).get_input_embeddings().weight.device
    out = []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        batch = pad_batch(chunk, pad, device)
        rows = torch.arange(len(chunk))
        last = torch.tensor([len(c) - 1 for c in chunk])
        with only_positions(head, rows, last):
            out.append(model(**batch).logits[0].float().cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class VerificationRow:
    """One request of one applied edit batch, checked on the model as it is now."""

    edit: int
    method: str
    subject: str
    prompt: str
    target: str
    p_new_at_edit: float | None
    check: EditCheck

    @property
    def holds(self) -> bool:
        return self.check.took


class Verification(list):
    """The rows of :meth:`~hf_edit.EditedModel.verify_edits` (a list of :class:`VerificationRow`)."""

    @property
    def n_holding(self) -> int:
        return sum(row.holds for row in self)

    def table(self) -> str:
        """A plain-text table: one line per request."""
        header = ["#", "method", "subject", "target", "P(new) at edit", "P(new) now", "rank", "P(old) now", "holds"]
        lines = [[str(r.edit), r.method, r.subject, r.target,
                  "-" if r.p_new_at_edit is None else f"{r.p_new_at_edit:.3f}", f"{r.check.p_new:.3f}",
                  str(r.check.rank_new), "-" if r.check.p_old is None else f"{r.check.p_old:.3f}",
                  "yes" if r.holds else "NO"] for r in self]
        widths = [max(len(x) for x in column) for column in zip(header, *lines, strict=False)]
        text = [" | ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in [header, *lines]]
        text.insert(1, "-+-".join("-" * w for w in widths))
        text.append(f"{self.n_holding} of {len(self)} edited requests hold (new target is the top prediction).")
        return "\n".join(text)

    def __str__(self) -> str:
        return self.table()
