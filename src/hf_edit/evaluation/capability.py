"""General capability after many edits: perplexity on plain text and the next-token KL on unrelated prompts.

Long runs of edits (thousands in a row) can keep every edited fact and still damage the model's language.  A
:class:`CapabilityCheck` measures two things on the model before editing and again after (and at every checkpoint of
the sequential protocol):

* **perplexity** on text windows (WikiText-2 by default in the benchmarks; any local text file, folder or list of
  strings), as the ratio to the unedited model's;
* **KL(P_before ‖ P_after)** of the next-token distribution after unrelated prompts (the first half of some of the
  same windows), averaged over the prompts: how far the edits moved what the model says about anything else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..architecture import max_positions
from ..errors import ConfigError, DatasetFormatError
from ..hooks import eval_mode
from .perplexity import perplexity, token_windows
from .scoring import input_device

__all__ = ["CapabilityCheck", "CapabilityProbe"]


@dataclass(frozen=True)
class CapabilityCheck:
    """What the general-capability check reads.

    Attributes:
        texts: a text file (e.g. ``wikitext-2-raw/wiki.test.raw``), a folder of ``.txt``/``.raw`` files, or the
            texts themselves.
        window: tokens per perplexity window (capped at the model's positions).
        max_windows: windows scored (the first ones of the text).
        kl_prompts: unrelated prompts for the KL (the first half of the first ``kl_prompts`` windows).
        batch_size: windows per forward pass.
    """

    texts: str | os.PathLike | Sequence[str]
    window: int = 64
    max_windows: int = 200
    kl_prompts: int = 100
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.window < 4 or self.max_windows < 1 or self.kl_prompts < 0 or self.batch_size < 1:
            raise ConfigError("CapabilityCheck needs window >= 4, max_windows >= 1, kl_prompts >= 0 and "
                              f"batch_size >= 1 (got {self.window}, {self.max_windows}, {self.kl_prompts}, "
                              f"{self.batch_size}).")

    def describe(self) -> dict[str, Any]:
        source = self.texts if isinstance(self.texts, (str, os.PathLike)) else f"{len(self.texts)} texts"
        return {"texts": str(source), "window": self.window, "max_windows": self.max_windows,
                "kl_prompts": self.kl_prompts}

    def read_texts(self) -> list[str]:
        """The texts (lines of the file or files).

        Raises:
            DatasetFormatError: the path does not exist or holds no text.
        """
        if not isinstance(self.texts, (str, os.PathLike)):
            return [str(t) for t in self.texts]
        path = Path(self.texts).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".txt", ".raw"))
        elif path.is_file():
            files = [path]
        else:
            raise DatasetFormatError(f"The capability check's text {path} does not exist: pass a text file, a "
                                     "folder of .txt/.raw files, or a list of strings.")
        lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines()]
        if not any(line.strip() for line in lines):
            raise DatasetFormatError(f"{path} holds no text for the capability check.")
        return lines


class CapabilityProbe:
    """A :class:`CapabilityCheck` bound to a model and tokenizer: :meth:`measure` once on the unedited model (the
    baseline, kept), then on the edited model for perplexity, its ratio to the baseline, and the KL."""

    def __init__(self, check: CapabilityCheck, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        self.check = check
        window = min(check.window, max_positions(model) or check.window)
        self.windows = token_windows(tokenizer, check.read_texts(), window, max_windows=check.max_windows)
        if not self.windows:
            raise DatasetFormatError(f"The capability check's text has fewer than {window} tokens.")
        half = max(1, window // 2)
        self.prompts = [w[:half] for w in self.windows[:check.kl_prompts]]
        self.baseline: dict[str, float] | None = None
        self._reference: torch.Tensor | None = None  # baseline next-token log-probs, (n_prompts, vocab)

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Perplexity (and, after the baseline, its ratio and the KL) of ``model`` as it is now."""
        ppl = perplexity(model, self.windows, batch_size=self.check.batch_size)
        logprobs = self._next_token_logprobs(model)
        if self.baseline is None:
            self.baseline, self._reference = {"perplexity": ppl, "windows": len(self.windows),
                                              "kl_prompts": len(self.prompts)}, logprobs
            return dict(self.baseline)
        out = {"perplexity": ppl, "perplexity_ratio": ppl / self.baseline["perplexity"]}
        if logprobs is not None and self._reference is not None:
            ref = self._reference
            out["kl"] = float((ref.exp() * (ref - logprobs)).sum(-1).mean())
        return out

    @torch.no_grad()
    def _next_token_logprobs(self, model: nn.Module) -> torch.Tensor | None:
        if not self.prompts:
            return None
        device, rows = input_device(model), []
        with eval_mode(model):
            for start in range(0, len(self.prompts), self.check.batch_size):
                ids = torch.tensor(self.prompts[start:start + self.check.batch_size], device=device)
                rows.append(model(input_ids=ids).logits[:, -1].float().log_softmax(-1).cpu())
        result = torch.cat(rows)
        if not torch.isfinite(result).all() and self.baseline is None:
            raise ConfigError("The unedited model gives non-finite next-token probabilities on the capability "
                              "check's prompts.")
        return result
