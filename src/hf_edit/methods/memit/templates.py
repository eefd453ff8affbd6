"""MEMIT's context templates: grouped, and sampled from seed words.

MEMIT averages a request's key over **groups** of templates: group 0 is the bare ``"{}"``, group 1 five short texts
the model generates from the words "The", "Therefore", "Because", "I", "You" (10 tokens each, top-k 5), each
followed by ``". {}"``.  A key is the mean of the group means, so the bare prompt weighs ½ and every generated
context 1/10.  z is optimised on every template once (the flattened list).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...errors import ConfigError
from ...hooks import kv_cache_arguments
from ...templates import BARE_TEMPLATE, sample_context_templates

__all__ = ["GroupedTemplates", "flatten_templates", "normalise_grouped_templates", "sample_grouped_templates"]

GroupedTemplates = tuple[tuple[str, ...], ...]


def _check(template: object) -> str:
    if not isinstance(template, str):
        raise ConfigError(f"Context templates must be strings, got {template!r}.")
    rest = template.replace(BARE_TEMPLATE, "")
    if template.count(BARE_TEMPLATE) != 1 or "{" in rest or "}" in rest:
        raise ConfigError(f"Context template {template!r} must contain exactly one '{{}}' and no other brace.")
    return template


def normalise_grouped_templates(templates: Sequence[str] | Sequence[Sequence[str]]) -> GroupedTemplates:
    """Templates in the grouped form ``(("{}",), ("A. {}", ...), ...)``.

    A flat list is read as ``[["{}"], [every other template]]`` (``"{}"`` is added when missing); a grouped list is
    kept as given (empty groups dropped).

    Raises:
        ConfigError: a template without exactly one ``{}``, or mixed strings and lists.
    """
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
        raise ConfigError(f"context_templates must be a non-empty list of templates or of template groups, got "
                          f"{templates!r}.")
    if all(isinstance(t, str) for t in templates):
        rest = tuple(_check(t) for t in templates if t != BARE_TEMPLATE)
        return ((BARE_TEMPLATE,), rest) if rest else ((BARE_TEMPLATE,),)
    if any(isinstance(t, str) or not isinstance(t, Sequence) for t in templates):
        raise ConfigError(f"context_templates mixes templates and template groups: {templates!r}.")
    groups = tuple(tuple(_check(t) for t in group) for group in templates if len(group))
    if not groups:
        raise ConfigError("context_templates holds only empty groups.")
    return groups


def flatten_templates(groups: GroupedTemplates) -> list[str]:
    """Every template once, group by group (the rows of the z optimisation)."""
    return [t for group in groups for t in group]


def _clean(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    for special in (tokenizer.eos_token, tokenizer.bos_token):
        if special:
            text = text.replace(special, "")
    return text.replace("{", " ").replace("}", " ")


@torch.no_grad()
def _continue(model: nn.Module, ids: list[int], n: int, length: int, top_k: int, generator: torch.Generator,
              device: torch.device) -> list[list[int]]:
    """``n`` rows of ``ids`` continued by top-k sampling to ``length`` tokens in all (KV cache, no EOS stop)."""
    rows = torch.tensor([ids] * n, dtype=torch.long, device=device)
    if rows.shape[1] >= length:
        return rows.tolist()
    out = model(input_ids=rows, use_cache=True)
    while rows.shape[1] < length:
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        choice = torch.multinomial(top_p / top_p.sum(-1, keepdim=True), 1, generator=generator)
        next_ids = top_i.gather(-1, choice)
        rows = torch.cat([rows, next_ids], dim=1)
        if rows.shape[1] < length:
            out = model(input_ids=next_ids, use_cache=True, **kv_cache_arguments(model, out))
    return rows.tolist()


def sample_grouped_templates(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                             length_params: Sequence[Sequence[int]], *, seeds: Sequence[str] | None,
                             top_k: int = 5, seed: int = 0) -> GroupedTemplates:
    """MEMIT's templates ``(("{}",), (one group per (length, n)))`` sampled from ``model`` deterministically.

    With ``seeds`` (MEMIT: "The", "Therefore", "Because", "I", "You"), each of the ``n // len(seeds)`` samples per
    seed word starts from the word (tokenised as the tokenizer does by default, so with a BOS where it adds one) and
    is continued to ``length`` tokens in all, then decoded without special tokens, NFKD-normalised, braces replaced
    by spaces, and followed by ``". {}"``.  Without seeds, :func:`hf_edit.templates.sample_context_templates`
    samples ``n`` continuations of BOS as ROME does.  Sampling uses a local seeded generator, never the global RNG.

    Raises:
        ConfigError: a seed word tokenises to nothing, or an invalid ``[length, n]`` pair.
    """
    if seeds is None:
        groups = [tuple(sample_context_templates(model, tokenizer, [(length, n)], top_k=top_k, seed=seed)[1:])
                  for length, n in length_params]
        return ((BARE_TEMPLATE,), *(g for g in groups if g))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    groups = []
    for length, n in length_params:
        if length < 1 or n < 0:
            raise ConfigError(f"Invalid context_template_length_params entry {[length, n]}.")
        group = []
        for word in seeds:
            ids = list(tokenizer(word)["input_ids"])
            if not ids:
                raise ConfigError(f"The template seed word {word!r} tokenises to nothing.")
            per_seed = n // len(seeds)
            if per_seed == 0:
                continue
            for row in _continue(model, ids, per_seed, length, top_k, generator, device):
                text = tokenizer.decode(row, skip_special_tokens=True)
                group.append(_clean(text, tokenizer) + ". " + BARE_TEMPLATE)
        if group:
            groups.append(tuple(group))
    return ((BARE_TEMPLATE,), *groups)
