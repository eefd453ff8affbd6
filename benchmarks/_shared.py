"""What the benchmark scripts share: offline mode, the paths of ``../shared/data``, the model they measure, the
median timer, the lifelong edit sequence and config overrides from the command line.  Import it before
transformers/datasets (it sets their offline switches unless already set)."""

from __future__ import annotations

import ast
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CF_FACTS = SHARED / "models" / "cf-facts-gpt2"
STORIES = SHARED / "models" / "stories260K"
COUNTERFACT = SHARED / "counterfact" / "counterfact-subset.json"
WIKITEXT = SHARED / "corpus" / "wikitext-2-raw"
EASYEDIT = [SHARED / "counterfact" / f"counterfact-{s}.easyedit.json" for s in ("train", "edit", "val")]


def fact_model_path() -> Path:
    """The CounterFact fact model, or stories260K where it is absent."""
    return CF_FACTS if CF_FACTS.exists() else STORIES


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``runs`` calls of ``fn``."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(variants: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Wall times of ``runs`` calls of each variant, interleaved (one call of each, ``runs`` times over), so that a
    change in the machine's load falls on all variants alike."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def edit_sequence(n: int) -> tuple[list[Any], dict]:
    """The first ``n`` cases (``CounterFactCase``): the full CounterFact records, then EasyEdit cases; a case whose
    subject (two edits of one subject share a key) or case id occurs earlier is skipped, and counted."""
    from hf_edit.evaluation import load_eval_data  # here: this module is imported before transformers/datasets

    cases, subjects, ids = [], set(), set()
    skipped = {"duplicate_subject_full": [], "duplicate_subject_easyedit": 0, "duplicate_case_id_easyedit": 0}
    sources = [COUNTERFACT, *EASYEDIT]
    for source in sources:
        if len(cases) >= n:
            break
        full = source == COUNTERFACT
        for case in load_eval_data(source).cases:
            if len(cases) >= n:
                break
            r = case.request
            if r.case_id in ids:
                skipped["duplicate_case_id_easyedit"] += 1
                continue
            if r.subject in subjects:
                if full:
                    skipped["duplicate_subject_full"].append(r.case_id)
                else:
                    skipped["duplicate_subject_easyedit"] += 1
                continue
            subjects.add(r.subject)
            ids.add(r.case_id)
            cases.append(case)
    return cases, skipped


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["clamp_norm_factor=4.0", "layers=(0,1,2)", "fact_token=last"]`` → config overrides: each value a Python
    literal where it parses as one, else the string."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out
