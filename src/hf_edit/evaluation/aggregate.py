"""Aggregation over cases, as the reference's ``experiments/summarize.py`` does it: per-case values are averaged over
cases and reported ×100 with their spread; a headline score is the harmonic mean of some of the means."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["harmonic_mean", "summarize", "flatten"]

Summary = dict[str, dict[str, float]]


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (as ``scipy.stats.hmean`` gives), NaN if any is NaN."""
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summarize(case_metrics: Sequence[Mapping[str, float]], score_of: Sequence[str] = (),
              score_name: str | None = None) -> Summary:
    """For each metric: ``mean`` ×100, ``std`` ×100 (population, ``ddof=0``, as the reference's summarize.py),
    ``stderr`` ×100 (sample standard deviation / √n; 0 for one case) and ``n``; plus, if given, ``score_name`` whose
    ``mean`` is the harmonic mean of the means of ``score_of`` ×100 (absent unless all of them are present).

    Cases where a metric is NaN (e.g. no prompts of that kind) are left out of that metric; nothing is rounded.
    """
    names = list(dict.fromkeys(name for metrics in case_metrics for name in metrics))
    summary: Summary = {}
    for name in names:
        values = np.array([m[name] for m in case_metrics if name in m and not math.isnan(m[name])],
                          dtype=np.float64)
        if len(values) == 0:
            continue
        stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
        summary[name] = {"mean": 100 * float(values.mean()), "std": 100 * float(values.std()),
                         "stderr": 100 * stderr, "n": len(values)}
    if score_name and score_of and all(name in summary for name in score_of):
        score = harmonic_mean([summary[name]["mean"] / 100 for name in score_of])
        summary[score_name] = {"mean": 100 * score, "n": min(summary[name]["n"] for name in score_of)}
    return summary


def flatten(summary: Summary, n_cases: int) -> dict[str, float]:
    """A summary as the flat dict an ``evaluate`` module returns: ``<name>`` (the mean), ``<name>_stderr``,
    ``<name>_std`` and ``n_cases``."""
    flat: dict[str, float] = {}
    for name, values in summary.items():
        flat[name] = values["mean"]
        for key in ("stderr", "std"):
            if key in values:
                flat[f"{name}_{key}"] = values[key]
    flat["n_cases"] = n_cases
    return flat
