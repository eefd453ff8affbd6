"""zsRE's metric as the ROME reference computes it (teacher-forced top-1 token accuracy), as an ``evaluate`` module.

Inputs are the per-token correctness flags that ``hf_edit.evaluation.zsre_correct`` returns, one row per answer
token: the case id, the kind (``rewrite``, ``paraphrase``, ``neighborhood``) and whether the token was predicted.
Outputs (×100): ``rewrite_acc``, ``paraphrase_acc``, ``neighborhood_acc`` (per-case means averaged over cases), their
harmonic mean ``score``, with ``*_stderr`` and ``*_std``, exactly as ``hf_edit.evaluation.zsre_scores`` computes.
"""

import datasets
import evaluate

from hf_edit.evaluation.zsre import correct_by_case, zsre_scores

_KWARGS_DESCRIPTION = """
Args:
    case_id: the zsRE record of each answer token (string).
    kind: "rewrite", "paraphrase" or "neighborhood".
    correct: whether the model's argmax was the expected token.
Returns:
    rewrite_acc, paraphrase_acc, neighborhood_acc, score (x100), *_stderr, *_std, n_cases.
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class Zsre(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"case_id": datasets.Value("string"), "kind": datasets.Value("string"),
                                        "correct": datasets.Value("bool")}),
            reference_urls=["https://rome.baulab.info/"])

    def _compute(self, case_id, kind, correct):
        return zsre_scores(list(correct_by_case(case_id, kind, correct).values()))
