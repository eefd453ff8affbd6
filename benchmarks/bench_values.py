"""What running each row's prefix once (``ValueSettings.reuse_prefix``, the default) saves in single edits.

Every method that optimises a value (ROME's v*, MEMIT's z, the layer-wise δ) runs its rows at every step; the
tokens before a row's first δ position do not depend on δ, so hf_edit runs them once into a key/value cache.  This
script times one edit at a time (``editor.compute([request])``, keys, values and solve) on the CounterFact fact
model with hf_edit's defaults for ROME, MEMIT and the layer-wise method, with the prefix cache and with whole rows
at every step, interleaved request by request, and prints medians, spreads and the ratio::

    python benchmarks/bench_values.py --n 20 --threads 2 [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from _shared import COUNTERFACT, WIKITEXT, fact_model_path
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_edit.values
from hf_edit import LayerwiseConfig, MEMITConfig, ROMEConfig
from hf_edit.errors import DisablingEditError
from hf_edit.evaluation import load_eval_data
from hf_edit.methods import EditContext
from hf_edit.methods.layerwise import LayerwiseEditor
from hf_edit.methods.memit import MEMITEditor
from hf_edit.methods.rome import ROMEEditor

EDITORS = {"rome": (ROMEConfig, ROMEEditor), "memit": (MEMITConfig, MEMITEditor),
           "layerwise": (LayerwiseConfig, LayerwiseEditor)}


@contextmanager
def whole_rows():
    """Every value optimisation runs whole rows (as if no model could continue from a cache)."""
    saved = hf_edit.values._prefix_cache_argument
    hf_edit.values._prefix_cache_argument = lambda model: None
    try:
        yield
    finally:
        hf_edit.values._prefix_cache_argument = saved


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="requests (edits) per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(EDITORS), choices=list(EDITORS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    path = fact_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    requests = [c.request for c in load_eval_data(COUNTERFACT, n=args.n).cases]
    print(f"one edit at a time on {path.name}, {args.n} requests, torch threads = {torch.get_num_threads()}; "
          "seconds per edit, median (min–max); whole rows / prefix cache")
    results = {}
    for method in args.methods:
        config_class, editor_class = EDITORS[method]
        editor = editor_class(config_class(mom2_dataset=str(WIKITEXT), mom2_n_samples=1000, mom2_max_length=64),
                              EditContext(model, tok))
        editor.compute(requests[:1])  # warm-up: statistics, templates
        times: dict[str, list[float]] = {"prefix cache": [], "whole rows": []}
        for request in requests:
            for name in times:
                with whole_rows() if name == "whole rows" else nullcontext():
                    start = time.perf_counter()
                    try:
                        editor.compute([request])
                    except DisablingEditError:  # ROME's guard refused the update: computed all the same
                        pass
                    times[name].append(time.perf_counter() - start)
        ratio = statistics.median(times["whole rows"]) / statistics.median(times["prefix cache"])
        results[method] = {"seconds": times, "ratio": ratio}
        print(f"  {method:<10} prefix cache {spread(times['prefix cache']):<26} whole rows "
              f"{spread(times['whole rows']):<26} {ratio:.2f}x", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "values_prefix_cache.json").write_text(
            json.dumps({"n": args.n, "threads": torch.get_num_threads(), "methods": results}, indent=1))


if __name__ == "__main__":
    main()
