"""CounterFact's probability metrics exactly as the ROME reference computes them.

For every prefix P of a record (the rewrite prompt, its paraphrases, neighbourhood and attribute prompts) and both
targets X ∈ {target_new, target_true}, the score is the **mean per-token negative log-likelihood** of
``tok(" " + X)`` after ``tok(P)`` (float32 log-softmax), which the reference stores under keys named ``*_probs``.
The prefix and target are joined at the id level, which equals the reference's string path on GPT-2 and is also
right for tokenizers that add a BOS token.

From these pairs, per record (averaged over the record's prompts of each kind):

* ES = mean 1[NLL_true > NLL_new] on the rewrite prompt, EM = mean (e^−NLL_new − e^−NLL_true);
* PS, PM: the same over the paraphrase prompts;
* NS = mean 1[NLL_true < NLL_new] over the neighbourhood prompts, NM = mean (e^−NLL_true − e^−NLL_new);

then the mean over records ×100, and S = the harmonic mean of ES, PS and NS.  Ties count as failures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..errors import DatasetFormatError
from ..tokens import pad_token_id, target_ids
from . import aggregate
from .data import CounterFactCase, case_from_record
from .scoring import BatchContext, score_continuations

__all__ = ["PROMPT_KINDS", "CASE_METRICS", "as_counterfact_case", "counterfact_rows", "counterfact_nll",
           "counterfact_nlls", "counterfact_case_metrics", "summarize", "counterfact_scores", "nll_pairs_by_case", "metric_inputs"]

#: Prompt kinds of the probability test, in the reference's order.
PROMPT_KINDS = ("rewrite", "paraphrase", "neighborhood", "attribute")

#: Per-case metrics: (name, prompt kind, the target that should win, "success" or "magnitude").
CASE_METRICS = (
    ("ES", "rewrite", "new", "success"), ("EM", "rewrite", "new", "magnitude"),
    ("PS", "paraphrase", "new", "success"), ("PM", "paraphrase", "new", "magnitude"),
    ("NS", "neighborhood", "true", "success"), ("NM", "neighborhood", "true", "magnitude"),
)

NllPairs = dict[str, list[tuple[float, float]]]


CounterFactLike = CounterFactCase | Mapping[str, Any]


def as_counterfact_case(record: CounterFactLike, index: int = 0) -> CounterFactCase:
    """``record`` as a :class:`~hf_edit.evaluation.CounterFactCase`: a case as it is, a plain dict built directly
    with :func:`~hf_edit.evaluation.case_from_record` (only the fields the metrics read are needed).

    Raises:
        DatasetFormatError: the dict lacks a field the metrics need (named), or holds a zsRE record.
    """
    if isinstance(record, CounterFactCase):
        return record
    case = case_from_record(record, index=index)
    if not isinstance(case, CounterFactCase):
        raise DatasetFormatError("This is a zsRE record; CounterFact scoring needs a CounterFact record "
                                 "(requested_rewrite with prompt, subject, target_new, target_true). Score zsRE "
                                 "records with zsre_correct.")
    return case


def counterfact_rows(tokenizer: PreTrainedTokenizerBase, case: CounterFactLike
                     ) -> list[tuple[str, list[int], list[int]]]:
    """The rows of a record's probability test: ``(kind, context_ids, target_ids)``, for each prompt first with
    ``target_new`` then with ``target_true``.  ``case`` may be a plain dict (see :func:`as_counterfact_case`)."""
    case = as_counterfact_case(case)
    request = case.request
    if request.target_true is None:
        raise ValueError(f"Case {case.case_id} has no target_true; CounterFact scoring compares both targets.")
    new, true = target_ids(tokenizer, request.target_new), target_ids(tokenizer, request.target_true)
    rows = []
    for kind, prompts in case.prompts().items():
        for prompt in prompts:
            context = list(tokenizer(prompt)["input_ids"])
            rows += [(kind, context, new), (kind, context, true)]
    return rows


def counterfact_nlls(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cases: Sequence[CounterFactLike], *,
                     batch_size: int = 64, batch_context: BatchContext | None = None,
                     row_cases: list[int] | None = None) -> list[NllPairs]:
    """:func:`counterfact_nll` for many records, all prompts of all records batched together.

    Args:
        model: a causal LM, a ``PeftModel`` or an :class:`~hf_edit.EditedModel` (scored with its edits).
        cases: :class:`~hf_edit.evaluation.CounterFactCase` objects or plain dicts (see
            :func:`as_counterfact_case`).
        batch_context: see :func:`~hf_edit.evaluation.scoring.score_continuations`; the row indices it receives
            map to records through ``row_cases`` (filled in by this function when given as an empty list).
    """
    cases = [as_counterfact_case(case, index) for index, case in enumerate(cases)]
    per_case = [counterfact_rows(tokenizer, case) for case in cases]
    flat = [(c, kind, context, target) for c, rows in enumerate(per_case) for kind, context, target in rows]
    if row_cases is not None:
        row_cases[:] = [c for c, *_ in flat]
    scores = score_continuations(model, [(context, target) for _, _, context, target in flat],
                                 pad_id=pad_token_id(tokenizer), batch_size=batch_size, batch_context=batch_context)
    results: list[NllPairs] = [{kind: [] for kind in PROMPT_KINDS} for _ in cases]
    for i in range(0, len(flat), 2):
        c, kind = flat[i][0], flat[i][1]
        results[c][kind].append((scores[i].mean_nll, scores[i + 1].mean_nll))
    return results


def counterfact_nll(model: nn.Module, tokenizer: PreTrainedTokenizerBase, record: CounterFactLike, *,
                    batch_size: int = 64) -> NllPairs:
    """For each prompt kind (``rewrite``, ``paraphrase``, ``neighborhood``, ``attribute``) the list of
    ``(nll_new, nll_true)`` pairs, the reference's per-prompt values.

    Args:
        model: a causal LM, a ``PeftModel`` or an :class:`~hf_edit.EditedModel` (scored with its edits).
        record: a :class:`~hf_edit.evaluation.CounterFactCase`, or a plain dict: a CounterFact record (ROME or
            EasyEdit format) with only the fields the metrics read (``requested_rewrite`` with ``prompt``,
            ``subject``, ``target_new``, ``target_true``; optional ``case_id``, prompt lists and ids).

    Raises:
        DatasetFormatError: the dict lacks a field the metrics need; the message names it.
    """
    return counterfact_nlls(model, tokenizer, [as_counterfact_case(record)], batch_size=batch_size)[0]


def counterfact_case_metrics(nlls: NllPairs) -> dict[str, float]:
    """ES, EM, PS, PM, NS, NM of one record, as fractions (NaN for a kind without prompts)."""
    metrics = {}
    for name, kind, winner, measure in CASE_METRICS:
        pairs = nlls.get(kind, [])
        values = [_compare(new, true, winner, measure) for new, true in pairs]
        metrics[name] = float(np.mean(values)) if values else math.nan
    return metrics


def _compare(nll_new: float, nll_true: float, winner: str, measure: str) -> float:
    if winner == "true":
        nll_new, nll_true = nll_true, nll_new
    if measure == "success":
        return float(nll_true > nll_new)
    return math.exp(-nll_new) - math.exp(-nll_true)


def summarize(case_metrics: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Aggregate per-case CounterFact metrics (×100 ``mean``, ``std``, ``stderr``, ``n``) and S = the harmonic mean
    of ES, PS and NS; see :func:`hf_edit.evaluation.aggregate.summarize`."""
    return aggregate.summarize(case_metrics, score_of=("ES", "PS", "NS"), score_name="S")


def nll_pairs_by_case(case_ids: Sequence[Any], kinds: Sequence[str], nll_new: Sequence[float],
                      nll_true: Sequence[float]) -> dict[Any, NllPairs]:
    """Group flat per-prompt rows (as an ``evaluate`` metric receives them) into each case's NLL pairs."""
    if not len(case_ids) == len(kinds) == len(nll_new) == len(nll_true):
        raise ValueError("case_ids, kinds, nll_new and nll_true must have the same length.")
    unknown = sorted(set(kinds) - set(PROMPT_KINDS))
    if unknown:
        raise ValueError(f"Unknown prompt kinds {unknown}; expected {PROMPT_KINDS}.")
    cases: dict[Any, NllPairs] = {}
    for case_id, kind, new, true in zip(case_ids, kinds, nll_new, nll_true):
        cases.setdefault(case_id, {k: [] for k in PROMPT_KINDS})[kind].append((float(new), float(true)))
    return cases


def counterfact_scores(nlls: Sequence[NllPairs]) -> dict[str, float]:
    """The aggregate scores of many cases as a flat dict: ``ES``, ``PS``, ``NS``, ``S``, ``EM``, ``PM``, ``NM``
    (×100) and ``<name>_stderr``, ``<name>_std``; what the ``counterfact`` ``evaluate`` module returns."""
    return aggregate.flatten(summarize([counterfact_case_metrics(pairs) for pairs in nlls]), len(nlls))


def metric_inputs(nlls_by_case: Mapping[Any, NllPairs]) -> dict[str, list]:
    """Flatten ``{case_id: counterfact_nll(...)}`` into the columns the ``counterfact`` ``evaluate`` module takes."""
    columns: dict[str, list] = {"case_id": [], "kind": [], "nll_new": [], "nll_true": []}
    for case_id, pairs in nlls_by_case.items():
        for kind, values in pairs.items():
            for new, true in values:
                columns["case_id"].append(str(case_id))
                columns["kind"].append(kind)
                columns["nll_new"].append(new)
                columns["nll_true"].append(true)
    return columns
