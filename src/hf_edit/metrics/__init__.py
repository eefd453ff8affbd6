"""``evaluate`` metric modules shipped with hf_edit, loadable offline by path.

Each module is a thin wrapper over the plain functions of :mod:`hf_edit.evaluation` and returns the same numbers::

    import evaluate
    import hf_edit.metrics

    counterfact = evaluate.load(hf_edit.metrics.path("counterfact"))
    scores = counterfact.compute(case_id=[...], kind=[...], nll_new=[...], nll_true=[...])

``evaluate`` copies the module into its cache and imports it (like ``trust_remote_code``); loading by path from the
installed package runs only hf_edit's own code.  ``evaluate`` is an optional dependency (``pip install
hf_edit[eval]``) and is imported only by :func:`load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["METRICS", "path", "load"]

#: The shipped modules: CounterFact's probability metrics, zsRE's token accuracy, generation entropy.
METRICS = ("counterfact", "zsre", "generation_entropy")


def path(name: str) -> str:
    """The file of the metric module ``name``, for ``evaluate.load(path)``."""
    if name not in METRICS:
        raise ValueError(f"Unknown hf_edit metric {name!r}; available: {METRICS}.")
    return str(Path(__file__).parent / name / f"{name}.py")


def load(name: str, **kwargs: Any):
    """``evaluate.load(path(name), **kwargs)``."""
    try:
        import evaluate
    except ImportError as err:
        raise ImportError("hf_edit.metrics.load needs the 'evaluate' package: pip install 'hf_edit[eval]'.") from err
    return evaluate.load(path(name), **kwargs)
