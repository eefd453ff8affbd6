"""KN (knowledge neurons) on the fact model: CounterFact quality, and the time and memory of one edit.

Part 1 (``--table``): KN under the single protocol on the first ``--n`` CounterFact cases of
``../shared/data/counterfact/counterfact-subset.json`` with ``cf-facts-gpt2``, as the reference wrapper computes it
(``KNConfig()``: all layers, 20 steps, 0.2 × max, no refinement, targets without a leading space, v = Σ E[t_i] −
2·E[o]), and the variant with ``target_leading_space=True`` (the tokens the evaluation scores, " Paris" rather than
"Paris").  Prints ES/PS/NS/S (and EM/PM/NM, GE with ``--generation``), the failed edits, and the selected neurons.

Part 2 (``--timing``): seconds per edit (``EditedModel.edit(request, check=False)``: the edit without hf_edit's
post-edit check; its removal is not timed)
and the peak memory the edit adds, medians over ``--runs`` runs of each of ``--cases`` requests (after one warm-up
edit), on the fact model and on a randomly initialised GPT-2-small-shaped model (12 layers, d 768, d_ff 3072, the
real GPT-2 tokenizer; the cost does not depend on the weights' values).  Peak memory as in
``bench_attribution.py``: on the CPU the resident set size sampled every 2 ms minus the RSS before the call.
``torch.set_num_threads`` is pinned (``--threads``, default 1) and printed.

Usage::

    python benchmarks/bench_kn.py --table --n 200 --out /tmp/kn-results
    python benchmarks/bench_kn.py --timing --runs 5 [--skip-small]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import torch
from _shared import COUNTERFACT, SHARED, fact_model_path
from bench_attribution import MIB, fmt, peak_memory
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_edit import EditedModel, KNConfig
from hf_edit.errors import EditDidNotTakeWarning
from hf_edit.methods import EditContext
from hf_edit.methods.kn import KNEditor
from hf_edit.requests import as_request
from hf_edit.evaluation import evaluate_model, load_eval_data

GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
METRICS = ("ES", "PS", "NS", "S", "EM", "PM", "NM")


def _load(path: Path) -> EditedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return EditedModel(model, AutoTokenizer.from_pretrained(path), progress=False)


def variants() -> dict[str, KNConfig]:
    """The configurations in the table."""
    return {"KN (reference)": KNConfig(), "KN, leading space": KNConfig(target_leading_space=True)}


def table(n: int, out: Path | None, generation: bool) -> None:
    path = fact_model_path()
    data = load_eval_data(COUNTERFACT, n=n)
    rows = []
    for name, config in variants().items():
        result = evaluate_model(_load(path), data, method=config, protocol="single", generation=generation,
                                progress=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            result.save(out / (name.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
                               + ".json"))
        summary = result.summary["post"]
        edits = [r.get("edit", {}) for r in result.cases]
        failed = sum(1 for e in edits if not e.get("ok", False))
        neurons = [next(iter(e["info"].values()))["n_neurons"] for e in edits if e.get("ok")]
        layers = [len(e["info"]) for e in edits if e.get("ok")]
        cells = [f"{summary[m]['mean']:.2f}" for m in METRICS]
        if generation:
            cells.append(f"{summary['GE']['mean']:.2f}")
        rows.append([name, *cells, str(failed), f"{statistics.median(neurons):.0f}",
                     f"{statistics.mean(layers):.2f}", f"{result.timing['cases_per_second']:.2f}"])
        print(result.table(), flush=True)
    header = ["method", *METRICS, *(["GE"] if generation else []), "failed edits", "median neurons",
              "mean layers edited", "cases/s"]
    print(f"\n{path.name}, first {n} CounterFact cases, single protocol (post-edit values x100):")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _requests(n: int) -> list[dict]:
    return [case["requested_rewrite"] for case in json.loads(COUNTERFACT.read_text())[:n]]


def time_edits(edited: EditedModel, requests: list[dict], config: KNConfig, runs: int) -> tuple[list[float],
                                                                                                 list[float]]:
    """Median over ``runs`` of each request's edit time (s) and added peak memory (MiB), all requests pooled."""
    edited.edit(requests[0], method=config, check=False)  # warm-up
    edited.remove_edit(0)
    times, peaks = [], []
    for request in requests:
        per_time, per_peak = [], []
        for _ in range(runs):
            with peak_memory("cpu") as mem:
                start = time.perf_counter()
                edited.edit(request, method=config, check=False)
                per_time.append(time.perf_counter() - start)
            per_peak.append(mem["peak"] / MIB)
            while edited.edits:
                edited.remove_edit(0)
        times.append(statistics.median(per_time))
        peaks.append(statistics.median(per_peak))
    return times, peaks


def _seconds(fn, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def timing(runs: int, n_cases: int, small_model: bool = True) -> None:
    requests = _requests(n_cases)
    path = fact_model_path()
    edited = _load(path)
    config = KNConfig()
    inner = edited.base_model
    print(f"\n## {path.name}: {inner.config.num_hidden_layers} layers, d {inner.config.n_embd}, d_ff "
          f"{4 * inner.config.n_embd}; KNConfig() (all layers, steps 20, batch 20); {n_cases} requests x {runs} runs")
    times, peaks = time_edits(edited, requests, config, runs)
    print(f"per edit: {fmt(times, 's', 3)}; peak added memory: {fmt(peaks, 'MiB', 1)} (median over requests of "
          "the per-request medians [min-max])")
    edits = edited.edit(requests[0], method=config, check=False)
    print(f"one edit's phases: {edits[0].info['timings']}")
    edited.remove_edit(0)
    editor = KNEditor(config, EditContext.for_model(edited.base_model, edited.tokenizer))
    compute = [statistics.median(_seconds(lambda r=r: editor.compute([as_request(r)]), runs)) for r in requests]
    print(f"KNEditor.compute alone (attribution + o + v, no adapter): {fmt(compute, 's', 3)}")

    if not small_model:
        return
    config_small = AutoConfig.for_model("gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024,
                                        vocab_size=50257)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_small, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    params = sum(p.numel() for p in model.parameters())
    small = EditedModel(model, tokenizer, progress=False)
    n_small = max(1, min(3, n_cases))
    print(f"\n## GPT-2-small shape (random weights, {params / 1e6:.0f} M parameters, fp32): 12 layers, d 768, d_ff "
          f"3072; KNConfig(); {n_small} requests x {runs} runs")
    times, peaks = time_edits(small, requests[:n_small], config, runs)
    print(f"per edit: {fmt(times, 's', 2)}; peak added memory: {fmt(peaks, 'MiB', 1)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="CounterFact quality (single protocol)")
    parser.add_argument("--n", type=int, default=200, help="number of CounterFact cases")
    parser.add_argument("--generation", action="store_true", help="also run the generation test (GE)")
    parser.add_argument("--out", type=Path, help="write each run's result JSON here")
    parser.add_argument("--timing", action="store_true", help="time and peak memory of one edit")
    parser.add_argument("--runs", type=int, default=5, help="timing: runs per request")
    parser.add_argument("--cases", type=int, default=5, help="timing: number of requests")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--skip-small", action="store_true", help="timing: only the fact model")
    args = parser.parse_args()
    warnings.simplefilter("ignore", EditDidNotTakeWarning)  # KN's reference tokens rarely make " Paris" the top
    logging.getLogger("hf_edit").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, torch.get_num_threads() = {torch.get_num_threads()}")
    if args.table:
        table(args.n, args.out, args.generation)
    if args.timing:
        timing(args.runs, args.cases, not args.skip_small)
    if not (args.table or args.timing):
        parser.error("choose --table and/or --timing")


if __name__ == "__main__":
    main()
