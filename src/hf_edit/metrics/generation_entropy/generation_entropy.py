"""Generation entropy (GE, "fluency" in the ROME paper) as an ``evaluate`` module.

Inputs: generated texts and the case each belongs to.  Per text GE = H₂/3 + 2H₃/3, the entropies (bits) of the
word bigram and trigram frequency distributions; per case the mean over its texts; output ``GE`` = the mean over
cases ×100 (the paper's scale, ≈ 620 for GPT-2 XL) with ``GE_stderr``/``GE_std``, as
``hf_edit.evaluation.generation_entropy`` computes it.  ``word_tokenizer`` (``"regex"``, no data download,
approximate; or ``"nltk"``, exact, needs ``punkt_tab``) is given to ``compute``.
"""

import datasets
import evaluate

from hf_edit.evaluation import aggregate
from hf_edit.evaluation.generation import generation_entropy

_KWARGS_DESCRIPTION = """
Args:
    case_id: the case each text belongs to (string).
    text: a generated text (prompt included).
    word_tokenizer: "regex" (default) or "nltk".
Returns:
    GE, GE_stderr, GE_std (x100), n_cases, word_tokenizer.
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class GenerationEntropy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"case_id": datasets.Value("string"), "text": datasets.Value("string")}),
            reference_urls=["https://rome.baulab.info/"])

    def _compute(self, case_id, text, word_tokenizer="regex"):
        by_case = {}
        for case, generated in zip(case_id, text):
            by_case.setdefault(case, []).append(generated)
        per_case = [{"GE": generation_entropy(texts, tokenizer=word_tokenizer)} for texts in by_case.values()]
        scores = aggregate.flatten(aggregate.summarize(per_case), len(by_case))
        scores["word_tokenizer"] = word_tokenizer
        return scores
