"""zsRE's metric exactly as the ROME reference computes it: teacher-forced top-1 token accuracy.

For a record with edit target ``X`` (``answers[0]`` in the reference, ``alt`` in EasyEdit) let ``t = tok(" " + X)``.
For each prompt P of the record (the rewrite prompt ``src`` and the paraphrase ``rephrase``) and each ``i < |t|`` the
model reads ``P + decode(t[:i])``; the token is correct iff the argmax at the last position equals the **first id of
tok(decode(t[i]))** (the reference's "temporary hack" for byte tokens).  The neighbourhood test does the same with
the NQ question and its answer: ``a = tok(" " + loc_ans)``, input ``loc + "?" + decode(a[:i])``, expected the first id
of ``tok(decode(a[i]))``.  It is absolute accuracy, not agreement with the unedited model.

Per record: the mean over tokens of each kind (``rewrite_acc``, ``paraphrase_acc``, ``neighborhood_acc``); then the
mean over records ×100 and ``score`` = the harmonic mean of the three means.

Two ways to build the model inputs (rome-spec §15):

* ``"string"``: the reference's string concatenation, each input string tokenised again.  This is paper parity for
  tokenizers that add no special tokens (GPT-2).  On GPT-2 it differs from a pure id-level computation for a few
  inputs: where re-tokenising merges across the prompt/answer boundary, and where a byte token decodes to U+FFFD
  (whose first id then differs from the token's own).
* ``"ids"``: ``tok(P) + t[:i]`` expecting ``t[i]``, with ``t = tok(" " + X)`` without special tokens; one
  teacher-forced row per prompt.  This is right for tokenizers that add a BOS token: on them the string path would
  expect the first id of ``tok(decode(t[i]))``, which is BOS, so no token could ever be correct.
* ``"auto"``: ``"string"`` if ``tokenizer("a")`` equals ``tokenizer("a", add_special_tokens=False)``, else ``"ids"``.

All rows of all records are scored by one :func:`~hf_edit.evaluation.scoring.score_continuations` call, so batches
mix prompts and records.  :func:`zsre_rows` exposes the rows with the record and prompt kind of each, for callers
that need per-row forward contexts (``batch_context``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..errors import DatasetFormatError
from ..tokens import pad_token_id
from . import aggregate
from .data import ZsRECase, case_from_record
from .scoring import BatchContext, score_continuations

__all__ = ["ZSRE_KINDS", "ZSRE_METRICS", "ZSRE_PATHS", "ZsRERow", "ZsRERows", "as_zsre_case", "resolve_zsre_path",
           "summarize_zsre", "zsre_case_metrics", "zsre_correct", "zsre_scores", "correct_by_case", "metric_inputs",
           "zsre_input_strings", "zsre_inputs", "zsre_rows"]

#: Prompt kinds, in the reference's order.
ZSRE_KINDS = ("rewrite", "paraphrase", "neighborhood")

#: Per-record metric of each kind.
ZSRE_METRICS = {"rewrite": "rewrite_acc", "paraphrase": "paraphrase_acc", "neighborhood": "neighborhood_acc"}

#: Accepted values of ``path``.
ZSRE_PATHS = ("auto", "string", "ids")

ZsREPath = Literal["auto", "string", "ids"]
ResolvedPath = Literal["string", "ids"]
ZsRELike = ZsRECase | Mapping[str, Any]


def as_zsre_case(record: ZsRELike, index: int = 0) -> ZsRECase:
    """``record`` as a :class:`~hf_edit.evaluation.ZsRECase`: a case as it is, a plain dict built directly with
    :func:`~hf_edit.evaluation.case_from_record` (``src``, ``subject``, ``answers``; optional ``rephrase``,
    ``loc``/``loc_ans``, ``case_id``).  The edit target is ``answers[0]``, as in the reference.

    Raises:
        DatasetFormatError: the dict lacks a field the metric needs (named).
    """
    if isinstance(record, ZsRECase):
        return record
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"A zsRE record must be a ZsRECase or a dict, got {type(record).__name__}.")
    case = case_from_record(record, data_format="zsre", index=index)
    assert isinstance(case, ZsRECase)
    return case


class ZsRERow(NamedTuple):
    """One teacher-forced row.

    The model reads ``context + forced``; after ``context + forced[:j]`` its argmax should be ``expected[j]``, for
    ``j < len(expected)`` (always ``len(forced) + 1``).  The string path has one row per answer token (``forced``
    empty, one expected id); the id path one row per prompt (``forced = t[:-1]``, ``expected = t``).
    """

    context: list[int]
    forced: list[int]
    expected: list[int]


@dataclass(frozen=True)
class ZsRERows:
    """All rows of several records, flattened in record order, with where each came from.

    Attributes:
        path: ``"string"`` or ``"ids"``, the construction used.
        rows: the rows.
        case_index: for each row, the index of its record in the sequence of cases given.
        kind: for each row, its prompt kind (one of :data:`ZSRE_KINDS`).
    """

    path: ResolvedPath
    rows: tuple[ZsRERow, ...]
    case_index: tuple[int, ...]
    kind: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def score_rows(self) -> list[tuple[list[int], list[int]]]:
        """The ``(context_ids, target_ids)`` pairs for :func:`~hf_edit.evaluation.scoring.score_continuations`."""
        return [(row.context, row.forced) for row in self.rows]

    def case_batch_context(self, factory: Callable[[list[int]], AbstractContextManager]) -> BatchContext:
        """Turn a factory that takes record indices into a ``batch_context`` that takes row indices.

        The factory gets, for each row of a batch in the batch's order, the index of that row's record.
        """
        return lambda batch: factory([self.case_index[i] for i in batch])


def resolve_zsre_path(tokenizer: PreTrainedTokenizerBase, path: ZsREPath = "auto") -> ResolvedPath:
    """The input construction to use: ``path`` itself, or for ``"auto"`` ``"string"`` when the tokenizer adds no
    special tokens to a plain text and ``"ids"`` otherwise.

    Raises:
        ValueError: ``path`` is not one of :data:`ZSRE_PATHS`.
    """
    if path not in ZSRE_PATHS:
        raise ValueError(f"path must be one of {ZSRE_PATHS}, got {path!r}.")
    if path != "auto":
        return path
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    return "string" if list(tokenizer("a")["input_ids"]) == plain else "ids"


def _prompts(case: ZsRECase) -> dict[str, tuple[str, ...]]:
    """The prompts of the answer test by kind (the neighbourhood prompt with the reference's ``"?"``; none for a
    record without a neighbourhood question)."""
    return {"rewrite": (case.request.filled_prompt,), "paraphrase": tuple(case.paraphrase_prompts),
            "neighborhood": (case.neighborhood_question + "?",) if case.neighborhood_question else ()}


def _answers(case: ZsRECase) -> dict[str, str]:
    """The answer each kind is tested against: the edit target, or the NQ answer for the neighbourhood."""
    return {"rewrite": case.request.target_new, "paraphrase": case.request.target_new,
            "neighborhood": case.neighborhood_answer}


def zsre_input_strings(tokenizer: PreTrainedTokenizerBase, case: ZsRELike) -> dict[str, list[tuple[str, str]]]:
    """The reference's ``(input string, target string)`` pairs of a record (a case or a plain dict) by kind.

    With ``t = tok(" " + answer)`` (the tokenizer's special tokens included, as the reference calls it), the pairs
    of a prompt P are ``(P + decode(t[:i]), decode(t[i]))`` for ``i < |t|``; the neighbourhood prompt is
    ``loc + "?"``.
    """
    case = as_zsre_case(case)
    answers = _answers(case)
    pairs: dict[str, list[tuple[str, str]]] = {}
    for kind, prompts in _prompts(case).items():
        ids = list(tokenizer(" " + answers[kind])["input_ids"])
        pairs[kind] = [(prompt + tokenizer.decode(ids[:i]), tokenizer.decode(ids[i]))
                       for prompt in prompts for i in range(len(ids))]
    return pairs


def _first_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """First id of ``tok(text)``; the pad id if it is empty (what the reference's padded batch would hold)."""
    ids = tokenizer(text)["input_ids"]
    return int(ids[0]) if len(ids) else pad_token_id(tokenizer)


def _string_rows(tokenizer: PreTrainedTokenizerBase, case: ZsRECase) -> dict[str, list[ZsRERow]]:
    return {kind: [ZsRERow(list(tokenizer(text)["input_ids"]), [], [_first_id(tokenizer, target)])
                   for text, target in pairs]
            for kind, pairs in zsre_input_strings(tokenizer, case).items()}


def _id_rows(tokenizer: PreTrainedTokenizerBase, case: ZsRECase) -> dict[str, list[ZsRERow]]:
    answers = _answers(case)
    rows: dict[str, list[ZsRERow]] = {}
    for kind, prompts in _prompts(case).items():
        answer = list(tokenizer(" " + answers[kind], add_special_tokens=False)["input_ids"])
        rows[kind] = [ZsRERow(list(tokenizer(prompt)["input_ids"]), answer[:-1], answer)
                      for prompt in prompts] if answer else []
    return rows


def zsre_inputs(tokenizer: PreTrainedTokenizerBase, case: ZsRELike, path: ZsREPath = "auto"
                ) -> dict[str, list[ZsRERow]]:
    """The rows of one record (a case or a plain dict) by kind (``"rewrite"``, ``"paraphrase"``,
    ``"neighborhood"``).

    ``path="string"``: one row per :func:`zsre_input_strings` pair: context ``tok(input string)``, nothing forced,
    expected the first id of ``tok(target string)``.  ``path="ids"``: one row per prompt: context ``tok(P)``,
    forced ``t[:-1]``, expected ``t`` with ``t = tok(" " + answer)`` without special tokens (no rows for an answer
    that tokenises to nothing).  ``"auto"``: see :func:`resolve_zsre_path`.
    """
    resolved = resolve_zsre_path(tokenizer, path)
    case = as_zsre_case(case)
    return _string_rows(tokenizer, case) if resolved == "string" else _id_rows(tokenizer, case)


def zsre_rows(tokenizer: PreTrainedTokenizerBase, cases: Sequence[ZsRELike], path: ZsREPath = "auto") -> ZsRERows:
    """The rows of all records (cases or plain dicts), flattened (record by record, kinds in :data:`ZSRE_KINDS`
    order), with the record index and kind of each row: the row → record mapping for a ``batch_context``."""
    resolved = resolve_zsre_path(tokenizer, path)
    rows, case_index, kinds = [], [], []
    for c, case in enumerate(cases):
        per_kind = zsre_inputs(tokenizer, as_zsre_case(case, c), resolved)
        for kind in ZSRE_KINDS:
            rows += per_kind[kind]
            case_index += [c] * len(per_kind[kind])
            kinds += [kind] * len(per_kind[kind])
    return ZsRERows(path=resolved, rows=tuple(rows), case_index=tuple(case_index), kind=tuple(kinds))


def zsre_correct(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cases: Sequence[ZsRELike], *,
                 path: ZsREPath = "auto", batch_size: int = 64, batch_context: BatchContext | None = None,
                 rows: ZsRERows | None = None, row_cases: list[int] | None = None) -> list[dict[str, list[bool]]]:
    """Per record, per kind, whether each answer token is predicted (the reference's ``*_correct`` lists).

    Every row of every record goes through one :func:`~hf_edit.evaluation.scoring.score_continuations` call.

    Args:
        model: a causal LM, a ``PeftModel`` or an :class:`~hf_edit.EditedModel` (scored with its edits).
        cases: :class:`~hf_edit.evaluation.ZsRECase` objects or plain dicts with the fields the metric reads
            (see :func:`as_zsre_case`).
        path: ``"auto"``, ``"string"`` or ``"ids"`` (see the module docstring); record
            ``resolve_zsre_path(tokenizer, path)`` (or ``rows.path``) with the results.
        batch_size: rows per forward pass.
        batch_context: passed to ``score_continuations``: it receives indices into the rows of
            ``zsre_rows(tokenizer, cases, path)``; map them to records with that object's ``case_index`` (or wrap a
            record-level factory with :meth:`ZsRERows.case_batch_context`).
        rows: the rows, when the caller built them already with :func:`zsre_rows` for these cases.
        row_cases: if given (e.g. an empty list), filled with the record index of every row.

    Raises:
        ValueError: ``rows`` was built with another path than an explicit ``path``, or for other cases.
        DatasetFormatError: a dict lacks a field the metric needs (named).
    """
    cases = [as_zsre_case(case, index) for index, case in enumerate(cases)]
    if rows is None:
        rows = zsre_rows(tokenizer, cases, path)
    elif path != "auto" and rows.path != resolve_zsre_path(tokenizer, path):
        raise ValueError(f"rows were built with path={rows.path!r}, not {path!r}.")
    if rows.case_index and max(rows.case_index) >= len(cases):
        raise ValueError(f"rows refer to {max(rows.case_index) + 1} cases, but {len(cases)} were given.")
    if row_cases is not None:
        row_cases[:] = list(rows.case_index)
    scores = score_continuations(model, rows.score_rows(), pad_id=pad_token_id(tokenizer), batch_size=batch_size,
                                 batch_context=batch_context)
    correct: list[dict[str, list[bool]]] = [{kind: [] for kind in ZSRE_KINDS} for _ in cases]
    for row, c, kind, score in zip(rows.rows, rows.case_index, rows.kind, scores):
        predicted = score.predictions.tolist()
        correct[c][kind] += [predicted[j] == expected for j, expected in enumerate(row.expected)]
    return correct


def zsre_case_metrics(correct: Mapping[str, Sequence[bool]]) -> dict[str, float]:
    """``rewrite_acc``, ``paraphrase_acc``, ``neighborhood_acc`` of one record: the fraction of its tokens of each
    kind predicted correctly, in [0, 1] (NaN for a kind without tokens)."""
    return {metric: float(np.mean(correct[kind])) if len(correct.get(kind, ())) else math.nan
            for kind, metric in ZSRE_METRICS.items()}


def summarize_zsre(case_metrics: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Aggregate per-record metrics over records.

    For each of ``rewrite_acc``, ``paraphrase_acc``, ``neighborhood_acc``: ``mean`` ×100, ``std`` ×100 (population,
    ``ddof=0``, as the reference's summarize.py), ``stderr`` ×100 (sample standard deviation ``ddof=1`` / √n; 0 for
    one record) and ``n``.  Records where a metric is NaN are left out of it.  ``score``: ``mean`` = the harmonic
    mean of the three means ×100 (0 if any is 0), ``n`` = the smallest of their ``n``.  Nothing is rounded; a
    metric without values is absent, and so is ``score`` then.
    """
    return aggregate.summarize(case_metrics, score_of=tuple(ZSRE_METRICS.values()), score_name="score")


def correct_by_case(case_ids: Sequence[object], kinds: Sequence[str], correct: Sequence[bool]
                    ) -> dict[object, dict[str, list[bool]]]:
    """Group flat per-token rows (as the ``zsre`` ``evaluate`` module receives them) into each record's flags."""
    if not len(case_ids) == len(kinds) == len(correct):
        raise ValueError("case_ids, kinds and correct must have the same length.")
    unknown = sorted(set(kinds) - set(ZSRE_KINDS))
    if unknown:
        raise ValueError(f"Unknown zsRE kinds {unknown}; expected {ZSRE_KINDS}.")
    cases: dict[object, dict[str, list[bool]]] = {}
    for case_id, kind, flag in zip(case_ids, kinds, correct):
        cases.setdefault(case_id, {k: [] for k in ZSRE_KINDS})[kind].append(bool(flag))
    return cases


def zsre_scores(correct: Sequence[Mapping[str, Sequence[bool]]]) -> dict[str, float]:
    """The aggregate scores of many records as a flat dict (``rewrite_acc``, ``paraphrase_acc``,
    ``neighborhood_acc``, ``score`` ×100, with ``*_stderr`` and ``*_std``); what the ``zsre`` ``evaluate`` module
    returns."""
    return aggregate.flatten(summarize_zsre([zsre_case_metrics(flags) for flags in correct]), len(correct))


def metric_inputs(correct_by_id: Mapping[object, Mapping[str, Sequence[bool]]]) -> dict[str, list]:
    """Flatten ``{case_id: flags}`` into the columns the ``zsre`` ``evaluate`` module takes."""
    columns: dict[str, list] = {"case_id": [], "kind": [], "correct": []}
    for case_id, flags in correct_by_id.items():
        for kind, values in flags.items():
            for flag in values:
                columns["case_id"].append(str(case_id))
                columns["kind"].append(kind)
                columns["correct"].append(bool(flag))
    return columns
