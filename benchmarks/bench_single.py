"""Cases per second of the single evaluation protocol with ROME on the CounterFact fact model, against the
reference's edit-then-score loop, in one process.

* **reference-style**: per case, the edit computed the reference's way (``bench_rome.reference_style_edit``: full
  logits at every position, a separate bare-prompt pass, one request at a time), then the update written into the
  weights, the case scored alone (rewrite, paraphrase and neighbourhood prompts) and the weights restored, as the
  reference's ``evaluate.py`` does (without its generation tests).
* **hf_edit, cases_per_batch = k**: ``evaluate_model(..., protocol="single", cases_per_batch=k)``: the k cases'
  edits computed without touching the model (``EditedModel.preview_edits``), every case's edit applied to its own
  rows while the k cases' prompts are scored together; "v* batched": with ``v_batch_size=None``, the k cases' v*
  optimised together.  Its time includes the pre-edit scoring of every case, which the
  reference does not do in the same loop.

Statistics are computed once beforehand (cached); threads are pinned and printed.  Medians (min–max) of ``--runs``.

    python benchmarks/bench_single.py --n 32 --runs 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch
from _shared import COUNTERFACT, WIKITEXT, fact_model_path
from bench_rome import reference_style_edit
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_edit import EditedModel, ROMEConfig
from hf_edit.evaluation import counterfact_nll, evaluate_model, load_eval_data
from hf_edit.methods import EditContext
from hf_edit.methods.rome import ROMEEditor


def rome_on_fact_model(n: int):
    """The fact model, its tokenizer, its first ``n`` CounterFact cases, the default ROME config (statistics from
    WikiText-2), an ``EditedModel`` with those statistics loaded, the edited module and its statistics."""
    path = fact_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_eval_data(str(COUNTERFACT), n=n)
    config = ROMEConfig(mom2_dataset=str(WIKITEXT)).resolved_for(model)
    edited = EditedModel(model, tokenizer, method=config, progress=False)
    probe = edited._editor(config)
    target = probe.targets()[0]
    return model, tokenizer, data, config, edited, target, probe.stats_for(target)  # statistics outside timings


def reference_loop(model, tokenizer, config, stats, data, updates) -> float:
    editor = ROMEEditor(config, EditContext.for_model(model, tokenizer, stats=stats))
    target = editor.targets()[0]
    module = model.get_submodule(target.name)
    started = time.perf_counter()
    for case, delta in zip(data.cases, updates):
        reference_style_edit(editor, case.request, target)
        if delta is None:  # the guard refuses it; the reference would apply it (same scoring cost)
            delta = torch.zeros(module.weight.shape[::-1])
        original = module.weight.detach().clone()
        with torch.no_grad():
            module.weight += delta.T.to(module.weight.dtype)  # GPT-2's Conv1D keeps W as (in, out)
        counterfact_nll(model, tokenizer, case)
        with torch.no_grad():
            module.weight.copy_(original)
    return len(data.cases) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, data, config, edited, _, stats = rome_on_fact_model(args.n)
    previews = edited.preview_edits([c.request for c in data.cases], method=config)
    updates = [p[0].factors.delta_weight() if isinstance(p, list) else None for p in previews]  # None: refused
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.n} cases, layer {config.layers}")
    variants = [(f"hf_edit k={k}", k, config) for k in args.batches] + [
        (f"hf_edit k={k}, v* batched", k, replace(config, v_batch_size=None)) for k in args.batches if k > 1]
    rows: dict[str, list[float]] = {"reference-style": []} | {name: [] for name, _, _ in variants}
    for _ in range(args.runs):
        rows["reference-style"].append(reference_loop(model, tokenizer, config, stats, data, updates))
        for name, k, variant in variants:
            result = evaluate_model(edited, data, method=variant, protocol="single", cases_per_batch=k,
                                    progress=False)
            rows[name].append(result.timing["cases_per_second"])
    base = statistics.median(rows["reference-style"])
    summary = {}
    for name, values in rows.items():
        med = statistics.median(values)
        summary[name] = {"median_cases_per_s": med, "min": min(values), "max": max(values), "ratio": med / base}
        print(f"{name:<18} {med:7.3f} cases/s ({min(values):.3f}–{max(values):.3f})  x{med / base:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "n": args.n, "runs": args.runs, "rows": summary}, f, indent=1)


if __name__ == "__main__":
    main()
