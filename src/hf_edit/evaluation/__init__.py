"""Evaluation with the ROME paper's metrics, computed exactly as the reference implementation computes them.

* Data: :func:`load_eval_data` (CounterFact in ROME's or EasyEdit's format, zsRE in ROME/MEND's), giving cases;
  :func:`case_from_record` builds one case from a plain dict with only the fields the metrics read.
* CounterFact: :func:`counterfact_nll` (per-prompt ``(nll_new, nll_true)`` pairs), :func:`counterfact_case_metrics`
  (ES, EM, PS, PM, NS, NM of one case), :func:`counterfact_scores` (aggregates ×100 and S).
* zsRE: :func:`zsre_correct` (teacher-forced token correctness) and :func:`summarize_zsre`.
* Generation: :func:`generate_texts`, :func:`generation_entropy` (GE), :class:`TfidfModel` and
  :func:`reference_score` (RS).
* EasyEdit's token accuracy, under its own name: :func:`easyedit_token_accuracy`.
* The runner: :func:`evaluate_model` (protocols ``"single"``, ``"batch"`` and ``"sequential"``;
  the general-capability check :class:`CapabilityCheck`) → :class:`EvaluationResult`.
* Hyperparameter sweeps: :func:`config_grid` and :func:`sweep` (a ranked table of settings) → :class:`SweepResult`.

The same numbers are available as ``evaluate`` modules: ``evaluate.load(hf_edit.metrics.path("counterfact"))``.
"""

from .capability import CapabilityCheck
from .counterfact import (
    counterfact_case_metrics,
    counterfact_nll,
    counterfact_nlls,
    counterfact_scores,
    metric_inputs,
    summarize,
)
from .data import (
    CounterFactCase,
    EvalData,
    ZsRECase,
    case_from_record,
    load_counterfact,
    load_eval_data,
    load_zsre,
)
from .generation import (
    AttributeSnippets,
    TfidfModel,
    generate_texts,
    generation_entropy,
    reference_score,
    word_tokenize,
)
from .runner import PROTOCOLS, EvaluationResult, GenerationSettings, evaluate_model
from .scoring import ContinuationScore, score_continuations
from .sweep import SweepEntry, SweepResult, config_grid, parse_grid_values, sweep
from .token_accuracy import easyedit_locality, easyedit_token_accuracy
from .zsre import summarize_zsre, zsre_case_metrics, zsre_correct

__all__ = [
    "CapabilityCheck",
    "load_eval_data", "load_counterfact", "load_zsre", "case_from_record", "EvalData", "CounterFactCase", "ZsRECase",
    "counterfact_nll", "counterfact_nlls", "counterfact_case_metrics", "counterfact_scores", "metric_inputs",
    "summarize", "zsre_correct", "zsre_case_metrics", "summarize_zsre", "generate_texts", "generation_entropy",
    "word_tokenize", "TfidfModel", "AttributeSnippets", "reference_score", "easyedit_token_accuracy",
    "easyedit_locality", "evaluate_model", "EvaluationResult", "GenerationSettings", "PROTOCOLS",
    "score_continuations", "ContinuationScore", "sweep", "SweepResult", "SweepEntry", "config_grid",
    "parse_grid_values",
]
