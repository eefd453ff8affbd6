"""CounterFact's probability metrics (ROME, Meng et al. 2022) as an ``evaluate`` module.

Inputs are the per-prompt mean per-token NLLs that ``hf_edit.evaluation.counterfact_nll`` returns, one row per
prompt: the case id, the prompt kind (``rewrite``, ``paraphrase``, ``neighborhood``, ``attribute``), the NLL of
``target_new`` and of ``target_true``.  Outputs (×100): ES, PS, NS, their harmonic mean S, EM, PM, NM, each with its
standard error (``*_stderr``) and population standard deviation (``*_std``), exactly as
``hf_edit.evaluation.counterfact_scores`` computes them.
"""

import datasets
import evaluate

from hf_edit.evaluation.counterfact import counterfact_scores, nll_pairs_by_case

_CITATION = """\
@inproceedings{meng2022locating,
  title={Locating and Editing Factual Associations in {GPT}},
  author={Kevin Meng and David Bau and Alex Andonian and Yonatan Belinkov},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    case_id: the CounterFact case of each prompt row (string).
    kind: "rewrite", "paraphrase", "neighborhood" or "attribute".
    nll_new: mean per-token NLL of " " + target_new after the prompt.
    nll_true: mean per-token NLL of " " + target_true after the prompt.
Returns:
    ES, PS, NS, S, EM, PM, NM (x100), *_stderr, *_std, n_cases.
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class Counterfact(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"case_id": datasets.Value("string"), "kind": datasets.Value("string"),
                                        "nll_new": datasets.Value("float64"),
                                        "nll_true": datasets.Value("float64")}),
            reference_urls=["https://rome.baulab.info/"])

    def _compute(self, case_id, kind, nll_new, nll_true):
        return counterfact_scores(list(nll_pairs_by_case(case_id, kind, nll_new, nll_true).values()))
