"""Lifelong editing (issue 11, goal 6): N CounterFact edits in batches of B on the fact model, each batch computed
on the model edited so far, with ROME (both key modes), MEMIT, EMMET or AlphaEdit.

Every ``--every`` edits (and at the end) a checkpoint records

* **retention**: ES of every edit so far on its rewrite prompt (P(new) > P(true)), in %;
* **NS** of the edited cases' neighbourhood prompts (P(true) > P(new)), in %, over all cases and over the full
  CounterFact records only (the EasyEdit cases' single locality prompt is a fact the model was not trained on), with
  the unedited model's NS on the same cases for comparison;
* **perplexity** on WikiText-2 (test split, ``--ppl-windows`` 64-token windows) and its ratio to the unedited model's;
* **KL**: mean next-token KL(unedited ‖ edited) over every position of ``--kl-windows`` 64-token windows of the
  WikiText-2 validation split (unrelated text).

The goal: 1,000 edits in batches of 10 keep retention ≥ 90 %, NS ≥ 85 % and perplexity ≤ 1.2× the unedited model.

Edits: the 900 full CounterFact records (``counterfact-subset.json``), then EasyEdit-format cases
(``counterfact-{train,edit,val}.easyedit.json``) to reach ``--n``; a case whose subject already occurs earlier in
the sequence (or whose case_id does) is skipped, since two edits of one subject share a key.  ROME edits one request
at a time; its "batch" is ``--batch`` sequential edits.  The JSON (``--out``/lifelong-<label>.json) is rewritten
after every checkpoint, so a partial run is usable.  ``--plot`` draws every lifelong-*.json of ``--out`` on one PNG
and writes their checkpoints as one table (``lifelong.md``).

Usage::

    python benchmarks/bench_lifelong.py --method alphaedit --n 1000 --batch 10 --every 100
    python benchmarks/bench_lifelong.py --method alphaedit --set prompt_preservation=1.0 --label alphaedit-pp1
    python benchmarks/bench_lifelong.py --method memit
    python benchmarks/bench_lifelong.py --method rome-consistent --n 300
    python benchmarks/bench_lifelong.py --plot
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from _shared import WIKITEXT, edit_sequence, fact_model_path, parse_overrides
from bench_memit import CONFIGS, load, stats_settings
from long_run import _only

from hf_edit import EditedModel, ROMEConfig
from hf_edit.evaluation import CounterFactCase, counterfact_case_metrics, counterfact_nlls
from hf_edit.evaluation.perplexity import perplexity, token_windows

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = {"retention_es": 90.0, "ns": 85.0, "perplexity_ratio": 1.2}


def case_scores(model, tok, cases: list[CounterFactCase]) -> tuple[list[float], list[float]]:
    """Per case: ES of the rewrite prompt and NS (mean over the neighbourhood prompts)."""
    es = [counterfact_case_metrics(x)["ES"] for x in counterfact_nlls(model, tok, [_only(c, "rewrite")
                                                                                   for c in cases])]
    ns = [counterfact_case_metrics(x)["NS"] for x in counterfact_nlls(model, tok, [_only(c, "neighborhood")
                                                                                   for c in cases])]
    return es, ns


@torch.no_grad()
def next_token_logprobs(model, windows: list[list[int]]) -> torch.Tensor:
    model.eval()
    ids = torch.tensor(windows)
    return torch.cat([model(input_ids=ids[i:i + 16]).logits.float().log_softmax(-1) for i in range(0, len(ids), 16)])


def kl_from(base: torch.Tensor, model, windows: list[list[int]]) -> float:
    """Mean over positions of KL(base ‖ model) of the next-token distributions."""
    edited = next_token_logprobs(model, windows)
    return (base.exp() * (base - edited)).sum(-1).mean().item()


def make_config(args, model):
    overrides = parse_overrides(args.set)
    if args.method.startswith("rome"):
        key_mode = args.method.split("-", 1)[1]
        # long_run.py's settings: the model's preset, WikiText-2 statistics, the disabling-edit guard off
        return replace(ROMEConfig.preset(str(fact_model_path())), key_mode=key_mode, mom2_dataset=str(WIKITEXT),
                       mom2_n_samples=100_000, guard=False, **overrides)
    return CONFIGS[args.method](**stats_settings(args), **overrides)


def run(args) -> Path:
    model, tok = load(args.threads)
    cases, skipped = edit_sequence(args.n)
    n_full = sum(c.data_format != "counterfact-easyedit" for c in cases)
    texts = (WIKITEXT / "wiki.test.raw").read_text().splitlines()
    windows = token_windows(tok, texts, 64, max_windows=args.ppl_windows)
    kl_windows = token_windows(tok, (WIKITEXT / "wiki.valid.raw").read_text().splitlines(), 64,
                               max_windows=args.kl_windows)
    t0 = time.perf_counter()
    base_ppl = perplexity(model, windows)
    base_logprobs = next_token_logprobs(model, kl_windows)
    base_es, base_ns = case_scores(model, tok, cases)
    eval_seconds = time.perf_counter() - t0
    config = make_config(args, model)
    label = args.label or args.method
    edited = EditedModel(model, tok, method=config, progress=False)
    out = {"label": label, "method": args.method, "model": fact_model_path().name, "n": len(cases),
           "n_full_records": n_full, "n_easyedit": len(cases) - n_full, "skipped_data": skipped,
           "batch": args.batch, "every": args.every, "threads": torch.get_num_threads(),
           "config": config.to_dict(), "overrides": parse_overrides(args.set), "base_perplexity": base_ppl,
           "unedited": {"es_all": 100 * statistics.mean(base_es), "ns_all": 100 * statistics.mean(base_ns),
                        "ns_full": 100 * statistics.mean(base_ns[:n_full])},
           "unedited_eval_seconds": eval_seconds, "goal": GOAL, "checkpoints": [], "batches": [],
           "skipped_edits": [], "finished": False}
    target = Path(args.out) / f"lifelong-{label}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"lifelong {label}: {len(cases)} edits ({n_full} full records) in batches of {args.batch}; unedited "
          f"perplexity {base_ppl:.2f}, NS {out['unedited']['ns_all']:.1f}; data skipped {skipped}", flush=True)
    edit_seconds = 0.0
    start = time.perf_counter()
    for first in range(0, len(cases), args.batch):
        batch = cases[first:first + args.batch]
        t = time.perf_counter()
        result = edited.edit([c.request for c in batch], on_error="skip", check=False)
        seconds = time.perf_counter() - t
        edit_seconds += seconds
        out["batches"].append({"first": first, "seconds": round(seconds, 2)})
        for s in result.skipped:
            out["skipped_edits"].append({"index": first + s.index, "case_id": s.request.case_id,
                                         "error": f"{type(s.error).__name__}: {s.error}"[:300]})
        done = first + len(batch)
        crossed = done // args.every > (done - len(batch)) // args.every  # a multiple of --every in this batch
        if not crossed and done < len(cases) and done not in args.extra_checkpoints:
            continue
        t = time.perf_counter()
        es, ns = case_scores(edited.model, tok, cases[:done])
        k = min(done, n_full)
        point = {"edits": done, "retention_es": 100 * statistics.mean(es), "ns": 100 * statistics.mean(ns),
                 "ns_full": 100 * statistics.mean(ns[:k]) if k else None,
                 "ns_unedited": 100 * statistics.mean(base_ns[:done]),
                 "es_last_batch": 100 * statistics.mean(es[first:]),
                 "perplexity": perplexity(edited.model, windows), "kl": kl_from(base_logprobs, edited.model,
                                                                                 kl_windows),
                 "skipped_edits": len(out["skipped_edits"]), "edit_seconds": edit_seconds}
        point["perplexity_ratio"] = point["perplexity"] / base_ppl
        point["eval_seconds"] = time.perf_counter() - t
        point["seconds"] = time.perf_counter() - start
        point["meets_goal"] = (point["retention_es"] >= GOAL["retention_es"] and point["ns"] >= GOAL["ns"]
                               and point["perplexity_ratio"] <= GOAL["perplexity_ratio"])
        out["checkpoints"].append(point)
        out["finished"] = done == len(cases)
        target.write_text(json.dumps(out, indent=1, default=str))
        print(f"  {done:5d} edits: retention {point['retention_es']:5.1f}  NS {point['ns']:5.1f} (full "
              f"{point['ns_full']:5.1f}, unedited {point['ns_unedited']:5.1f})  ppl {point['perplexity']:.2f} "
              f"({point['perplexity_ratio']:.3f}x)  KL {point['kl']:.4f}  last-batch ES {point['es_last_batch']:.0f}"
              f"  skipped {point['skipped_edits']}  edit {edit_seconds:.0f} s, total {point['seconds']:.0f} s",
              flush=True)
    print(f"wrote {target}")
    return target


#: Short names of the overridden settings in the plot's legend.
SHORT = {"clamp_norm_factor": "clamp", "v_num_grad_steps": "steps", "prompt_preservation": "μ",
         "mom2_update_weight": "λ", "nullspace_threshold": "threshold"}


def legend(run: dict) -> str:
    """A run's label with its overridden settings, e.g. ``alphaedit (clamp 4, steps 40, μ 10)``."""
    settings = ", ".join(f"{SHORT.get(k, k)} {f'{v:g}' if isinstance(v, (int, float)) else v}"
                         for k, v in run.get("overrides", {}).items())
    stopped = "" if run.get("finished", True) else f", stopped before {run['n']} edits"
    return f"{run['label']} ({settings or 'defaults'}{stopped})"


def plot(folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("lifelong-*.json"))]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    panels = [("retention_es", "retention: ES of all edits so far (%)", False, GOAL["retention_es"]),
              ("ns", "NS of the edited cases (%)", False, GOAL["ns"]),
              ("perplexity_ratio", "WikiText-2 perplexity / unedited", True, GOAL["perplexity_ratio"]),
              ("kl", "next-token KL(unedited ‖ edited), WikiText-2 valid", True, None)]
    for ax, (key, title, log, goal) in zip(axes, panels):
        for r in runs:
            points = [(0, {"retention_es": None, "ns": r["unedited"]["ns_all"], "perplexity_ratio": 1.0,
                           "kl": None}[key])] + [(c["edits"], c[key]) for c in r["checkpoints"]]
            points = [p for p in points if p[1] is not None and (not log or p[1] > 0)]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=4, label=legend(r))
        if goal is not None:
            ax.axhline(goal, color="grey", ls="--", lw=1, label="goal")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits")
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        else:
            ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    model = runs[0]["model"] if runs else "?"
    batch = sorted({r["batch"] for r in runs})
    fig.suptitle(f"Lifelong editing on {model}: batches of {batch} (ROME: sequential single edits)")
    fig.tight_layout()
    target = folder / "lifelong.png"
    fig.savefig(target, dpi=100)
    return target


def table(folder: Path) -> Path:
    """``lifelong.md``: every run's checkpoints (retention, NS, perplexity ratio, KL) as one Markdown table."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("lifelong-*.json"))]
    lines = ["# Lifelong editing on the fact model", "",
             f"Goal: retention ≥ {GOAL['retention_es']:g} %, NS ≥ {GOAL['ns']:g} %, perplexity ≤ "
             f"{GOAL['perplexity_ratio']:g}× the unedited model's. Written by `python benchmarks/bench_lifelong.py "
             "--plot` from the lifelong-*.json here; n = edits so far (every edit's rewrite prompt for retention, "
             "every edited case's neighbourhood prompts for NS).", "",
             "| run (overridden settings) | edits | retention ES | NS (unedited) | perplexity ratio | KL | "
             "last batch ES | edit time |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for c in r["checkpoints"]:
            lines.append(f"| {legend(r)} | {c['edits']} | {c['retention_es']:.1f} | {c['ns']:.1f} "
                         f"({c['ns_unedited']:.1f}) | {c['perplexity_ratio']:.2f} | {c['kl']:.3f} | "
                         f"{c['es_last_batch']:.0f} | {c['edit_seconds']:.0f} s |")
    target = folder / "lifelong.md"
    target.write_text("\n".join(lines) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="alphaedit", choices=[*sorted(CONFIGS), "rome-original",
                                                                  "rome-consistent"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--extra-checkpoints", type=int, nargs="*", default=[], help="more checkpoints (edits)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value (e.g. "
                                                            "prompt_preservation=1.0)")
    parser.add_argument("--label", default=None, help="name of the run (default: the method)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stats-texts", type=int, default=10000, help="MEMIT/EMMET/AlphaEdit statistics texts")
    parser.add_argument("--ppl-windows", type=int, default=200)
    parser.add_argument("--kl-windows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", action="store_true", help="only draw lifelong.png (and write lifelong.md) from "
                                                              "--out's lifelong-*.json")
    args = parser.parse_args()
    if args.plot:
        print(f"wrote {plot(args.out)} and {table(args.out)}")
        return
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    run(args)
    print(f"(python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
