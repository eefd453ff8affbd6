"""The fast ROME mode's trade-off on the CounterFact fact model: quality (single protocol, ``--n`` shared cases)
and time per edit of each configuration, against the reference's per-edit time, in one process.

Configurations: the default (the reference's 21 template rows, 20 v* steps) and cheaper ones (fewer/shorter
templates, fewer steps, a larger step size).  Per-edit time: median over the evaluation's edits (one at a time,
``cases_per_batch=1``, so no batching helps); the reference's: ``bench_rome.reference_style_edit`` on the first
``--ref-edits`` cases with the default config.  Threads pinned and printed.

    python benchmarks/bench_fast_rome.py --n 200 --out benchmarks/results/rome_fast.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch
from bench_rome import reference_style_edit
from bench_single import rome_on_fact_model

from hf_edit import ROMEConfig
from hf_edit.evaluation import evaluate_model
from hf_edit.methods import EditContext
from hf_edit.methods.rome import ROMEEditor


def candidates(base: ROMEConfig) -> dict[str, ROMEConfig]:
    return {
        "default": base,
        "fast()": ROMEConfig.fast(base),
        "templates 5x3, 20 steps": replace(base, context_template_length_params=((5, 3),)),
        "templates 5x3, 10 steps lr 1.0": replace(base, context_template_length_params=((5, 3),), v_num_grad_steps=10,
                                                  v_lr=1.0),
        "templates 10x5, 10 steps": replace(base, context_template_length_params=((10, 5),), v_num_grad_steps=10),
        "templates 5x5 + 10x5": replace(base, context_template_length_params=((5, 5), (10, 5))),
        "templates 5x10": replace(base, context_template_length_params=((5, 10),)),
    }


def interleaved_timing(edited, editor, target, base: ROMEConfig, data, n: int) -> dict:
    """Per-edit seconds of the reference-style edit, the default and ``fast()``, interleaved case by case (so load
    changes hit all three alike); medians and min–max."""
    fast = ROMEConfig.fast(base)
    times: dict[str, list[float]] = {"reference-style": [], "default": [], "fast()": []}
    edited.preview_edits([data.cases[0].request], method=fast)  # sample fast()'s templates outside the timings
    for case in data.cases[:n]:
        started = time.perf_counter()
        reference_style_edit(editor, case.request, target)
        times["reference-style"].append(time.perf_counter() - started)
        for name, config in (("default", base), ("fast()", fast)):
            started = time.perf_counter()
            edited.preview_edits([case.request], method=config)
            times[name].append(time.perf_counter() - started)
    ref = statistics.median(times["reference-style"])
    out = {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                  "speedup_vs_reference": ref / statistics.median(v)} for name, v in times.items()}
    for name, row in out.items():
        print(f"{name:<16} {row['median_s']:.3f} s ({row['min_s']:.3f}–{row['max_s']:.3f})  "
              f"x{row['speedup_vs_reference']:.2f} vs reference-style", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ref-edits", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="only these configurations")
    parser.add_argument("--timing", type=int, default=0, metavar="N",
                        help="only time N edits of the reference-style, default and fast() configs, interleaved")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, data, base, edited, target, stats = rome_on_fact_model(args.n)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(data)} cases, layer {base.layers}")
    editor = ROMEEditor(base, EditContext.for_model(model, tokenizer, stats=stats))
    _ = editor.templates
    if args.timing:
        timing = interleaved_timing(edited, editor, target, base, data, args.timing)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"threads": args.threads, "edits": args.timing, "timing": timing}, f, indent=1)
        return
    ref = []
    for case in data.cases[:args.ref_edits]:
        started = time.perf_counter()
        reference_style_edit(editor, case.request, target)
        ref.append(time.perf_counter() - started)
    ref_median = statistics.median(ref)
    print(f"reference-style edit: {ref_median:.3f} s ({min(ref):.3f}–{max(ref):.3f}), {len(ref)} edits")
    rows = {}
    for name, config in candidates(base).items():
        if args.only and name not in args.only:
            continue
        result = evaluate_model(edited, data, method=config, protocol="single", cases_per_batch=1, progress=False)
        seconds = [c["edit"]["seconds"] for c in result.cases if c.get("edit", {}).get("ok")]
        post = result.summary["post"]
        row = {m: post[m]["mean"] for m in ("ES", "PS", "NS", "S")} | {
            "n": result.counts.get("post"), "not_applied": result.counts.get("failed", 0) + result.counts.get(
                "refused", 0),
            "edit_s_median": statistics.median(seconds), "speedup_vs_reference": ref_median / statistics.median(
                seconds), "config": {k: v for k, v in config.to_dict().items() if k in (
                    "context_template_length_params", "v_num_grad_steps", "v_lr")}}
        rows[name] = row
        print(f"{name:<32} ES {row['ES']:6.2f} PS {row['PS']:6.2f} NS {row['NS']:6.2f} S {row['S']:6.2f} "
              f"(n={row['n']}, not applied {row['not_applied']})  {row['edit_s_median']:.3f} s/edit  "
              f"x{row['speedup_vs_reference']:.1f} vs reference", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"threads": args.threads, "n": len(data), "reference_edit_s": ref_median, "rows": rows}, f,
                          indent=1)


if __name__ == "__main__":
    main()
