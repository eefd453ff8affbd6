"""Context templates: short texts sampled from the model, put before the prompt when computing ROME's key.

The reference samples, for each ``(length, n)`` in ``context_template_length_params``, ``n`` continuations of a
single start token with top-k sampling (``length`` counts the start token), and builds the templates
``["{}"] + [sample + ". {}" ...]``.  hf_edit does the same with a seeded local generator (never the global RNG), the
tokenizer's BOS (else EOS) as start token, and braces removed from the samples.  Row 0 is always the bare ``"{}"``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .errors import ConfigError
from .hooks import kv_cache_arguments
from .requests import EditRequest
from .tokens import Encoded, encode_with_subject

__all__ = ["BARE_TEMPLATE", "sample_context_templates", "normalise_templates", "encode_templated", "fact_position",
           "value_positions"]

BARE_TEMPLATE = "{}"


def _start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ConfigError("The tokenizer has neither a BOS nor an EOS token to start template sampling from; pass "
                      "ROMEConfig(context_templates=[...]) explicitly.")


@torch.no_grad()
def _sample_continuations(model: nn.Module, start: int, n: int, new_tokens: int, top_k: int,
                          generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` rows of ``new_tokens`` ids sampled top-k after ``start``, with a KV cache and no EOS stop."""
    ids = torch.full((n, 1), start, dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True)
    sampled = []
    for step in range(new_tokens):
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        choice = torch.multinomial(top_p / top_p.sum(-1, keepdim=True), 1, generator=generator)
        next_ids = top_i.gather(-1, choice)
        sampled.append(next_ids)
        if step + 1 < new_tokens:
            out = model(input_ids=next_ids, use_cache=True, **kv_cache_arguments(model, out))
    return torch.cat(sampled, dim=1) if sampled else ids[:, :0]


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return text.replace("{", "").replace("}", "")


def sample_context_templates(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                             length_params: Sequence[Sequence[int]], *, top_k: int = 5, seed: int = 0
                             ) -> list[str]:
    """Sample the reference's context templates from ``model`` deterministically.

    Args:
        length_params: ``[[length, n], ...]``; ``length`` counts the start token, as in the reference.
        top_k: sample among the ``top_k`` most likely tokens.
        seed: seed of the local generator.

    Returns:
        ``["{}"] + [sample + ". {}" for each sample]`` (21 templates with the default ``[[5, 10], [10, 10]]``).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    start = _start_token(tokenizer)
    templates = [BARE_TEMPLATE]
    for length, n in length_params:
        if length < 1 or n < 0:
            raise ConfigError(f"Invalid context_template_length_params entry {[length, n]}.")
        if n == 0:
            continue
        rows = _sample_continuations(model, start, n, length - 1, top_k, generator, device)
        texts = tokenizer.batch_decode(rows.tolist(), skip_special_tokens=True)
        templates += [_clean(t) + ". " + BARE_TEMPLATE for t in texts]
    return templates


def normalise_templates(templates: Sequence[str]) -> tuple[list[str], bool]:
    """Validate user templates (one ``{}`` each) and put the bare ``"{}"`` first.

    Returns:
        The template list, and whether ``"{}"`` had to be prepended.
    """
    templates = list(templates)
    for t in templates:
        rest = t.replace(BARE_TEMPLATE, "") if isinstance(t, str) else "{"
        if "{" in rest or "}" in rest or t.count(BARE_TEMPLATE) != 1:
            raise ConfigError(f"Context template {t!r} must contain exactly one '{{}}' and no other brace.")
    if templates and templates[0] == BARE_TEMPLATE:
        return templates, False
    return [BARE_TEMPLATE] + [t for t in templates if t != BARE_TEMPLATE], True


def encode_templated(tokenizer: PreTrainedTokenizerBase, template: str, request: EditRequest) -> Encoded:
    """Tokenise ``template`` filled with the request's prompt and subject (by concatenation, never ``format``), with
    the subject's first and last token located by offsets."""
    before, after = template.split(BARE_TEMPLATE)
    return encode_with_subject(tokenizer, before + request.prefix, request.subject, request.suffix + after)


def fact_position(encoded: Encoded, fact_token: str, length: int | None = None) -> int:
    """The position of the fact token (``"subject_last"``, ``"subject_first"``, ``"subject_first_after_last"`` or
    ``"last"``) in a text of ``length`` tokens (default: the encoded text's length)."""
    length = len(encoded.ids) if length is None else length
    if fact_token == "subject_last":
        return encoded.subject_last
    if fact_token == "subject_first":
        return encoded.subject_first
    if fact_token == "subject_first_after_last":
        return min(encoded.subject_last + 1, length - 1)
    return length - 1


def value_positions(encoded: Encoded, fact_token: str) -> tuple[int, ...]:
    """Where a value is written: ``(fact_position,)`` for a fact token, or with ``fact_token="subject"`` every
    token of the subject, last first (slot 0 is the subject's last token, slot 1 the one before, …)."""
    if fact_token == "subject":
        return tuple(range(encoded.subject_last, encoded.subject_first - 1, -1))
    return (fact_position(encoded, fact_token),)
