"""Causal tracing of the CounterFact fact model (``../shared/data/models/cf-facts-gpt2``).

    python benchmarks/trace_fact_model.py [--n 50] [--samples 10] [--threads 1] [--mlp-windows 1 3]

Traces the true facts of the first N CounterFact cases (``requested_rewrite``: prompt, subject, true object;
facts whose clean top prediction is not the true object's first token are skipped, as the reference does), prints
the average indirect effect per layer of restoring the hidden state, the MLP output and the attention output at
the subject's last token (and at the prompt's last token), and the layer :func:`hf_edit.tracing.choose_layers`
picks from the MLP profile.  The reference's 10-layer MLP/attention window spans the whole 6-layer model, so the
MLP profile is traced with the windows given by ``--mlp-windows`` (default: 1, the depth-scaled window, and 3)
and attention with ``--attn-window`` (default 1).

Writes to ``benchmarks/results/``: ``trace_fact_heatmap.png`` (hidden/MLP/attention heatmaps of one fact),
``trace_fact_profile.png`` (the profiles) and ``trace_fact_model.json`` (all numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_edit.tracing import choose_layers, noise_level, scaled_window, trace, trace_dataset

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
MODEL = SHARED / "models" / "cf-facts-gpt2"
COUNTERFACT = SHARED / "counterfact" / "counterfact-subset.json"
RESULTS = HERE / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="number of CounterFact cases")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per fact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (1: steadiest on a shared machine)")
    parser.add_argument("--mlp-windows", type=int, nargs="+", default=None,
                        help="MLP restoration windows (default: the depth-scaled window and 3)")
    parser.add_argument("--attn-window", type=int, default=1)
    parser.add_argument("--case", type=int, default=None, help="index (among the N) of the fact for the heatmap")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads = {torch.get_num_threads()}")
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    cases = json.loads(COUNTERFACT.read_text())[: args.n]
    L = model.config.num_hidden_layers
    noise = noise_level(model, tokenizer, [c["requested_rewrite"]["subject"] for c in cases])
    windows = args.mlp_windows or sorted({scaled_window(L), 3})
    print(f"model {MODEL.name}: {L} layers; {len(cases)} cases; samples {args.samples}; noise nu = 3 sigma = "
          f"{noise:.4f}; MLP windows {windows}, attention window {args.attn_window}")

    runs = [("hidden", 1, "subject_last"), *[("mlp", w, "subject_last") for w in windows],
            ("attn", args.attn_window, "subject_last"), ("hidden", 1, "last"), ("mlp", windows[0], "last"),
            ("attn", args.attn_window, "last")]
    profiles, timings = {}, {}
    for kind, window, token in runs:
        name = f"{kind}/w{window}/{token}"
        start = time.perf_counter()
        profiles[name] = trace_dataset(model, tokenizer, cases, kind=kind, samples=args.samples, noise=noise,
                                       window=window, seed=args.seed, token=token, batch_size=args.batch_size,
                                       progress=not args.no_progress)
        timings[name] = time.perf_counter() - start

    first = next(iter(profiles.values()))
    print(f"\nfacts kept {first.n}, skipped {first.n_skipped} (clean top prediction is not the true object); "
          f"mean clean p = {first.high_scores.mean():.3f}, mean corrupted p = {first.low_scores.mean():.3f}, "
          f"total effect = {first.total_effect:.3f}")
    print("\naverage indirect effect per layer (mean ± standard error)")
    header = f"{'profile':<28}" + "".join(f"{'layer ' + str(i):>16}" for i in range(L)) + f"{'time':>9}"
    print(header)
    for name, profile in profiles.items():
        cells = "".join(f"{m:>9.4f} ±{s:.4f}" for m, s in zip(profile.mean.tolist(), profile.stderr.tolist()))
        print(f"{name:<28}{cells}{timings[name]:>8.1f}s")

    choices = {}
    print("\nchoose_layers on the MLP profiles at the subject's last token")
    for w in windows:
        profile = profiles[f"mlp/w{w}/subject_last"]
        choices[f"w{w}"] = {str(n): list(choose_layers(profile, n)) for n in (1, 2, 3)}
        print(f"  window {w}: single layer {choices[f'w{w}']['1']}, 2 layers {choices[f'w{w}']['2']}, "
              f"3 layers {choices[f'w{w}']['3']}")

    args.out.mkdir(parents=True, exist_ok=True)
    index = args.case if args.case is not None else 0
    case = cases[index]["requested_rewrite"]
    single = {kind: trace(model, tokenizer, case["prompt"], case["subject"], kind=kind, samples=args.samples,
                          noise=noise, window=(windows[0] if kind == "mlp" else args.attn_window if kind == "attn"
                                               else 1), seed=args.seed, batch_size=args.batch_size)
              for kind in ("hidden", "mlp", "attn")}
    print(f"\nheatmap fact: {case['prompt'].format(case['subject'])!r} -> {single['hidden'].answer!r} "
          f"(true {case['target_true']['str']!r}); p clean {single['hidden'].high_score:.3f}, corrupted "
          f"{single['hidden'].low_score:.3f}")
    written = {}
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no figures (pip install matplotlib)", file=sys.stderr)
    else:
        fig = Figure(figsize=(13, 0.6 + 0.35 * len(single["hidden"].tokens)))
        for ax, (kind, result) in zip(fig.subplots(1, 3), single.items()):
            result.plot(ax, model_name=MODEL.name)
        fig.tight_layout()
        written["heatmap"] = args.out / "trace_fact_heatmap.png"
        fig.savefig(written["heatmap"], dpi=110)
        shown = ["hidden/w1/subject_last", f"mlp/w{windows[0]}/subject_last", f"attn/w{args.attn_window}/subject_last",
                 "hidden/w1/last", f"mlp/w{windows[0]}/last", f"attn/w{args.attn_window}/last"]
        fig = Figure(figsize=(12, 6))
        for ax, name in zip(fig.subplots(2, 3).ravel(), shown):
            profiles[name].plot(ax)
        fig.tight_layout()
        written["profile"] = args.out / "trace_fact_profile.png"
        fig.savefig(written["profile"], dpi=110)
    summary = {
        "model": MODEL.name, "n_cases": len(cases), "samples": args.samples, "seed": args.seed, "noise": noise,
        "threads": torch.get_num_threads(), "seconds": timings, "choose_layers": choices,
        "profiles": {name: {"mean": p.mean.tolist(), "stderr": p.stderr.tolist(), "n": p.n, "n_skipped": p.n_skipped,
                            "window": p.window, "token": p.token, "kind": p.kind, "total_effect": p.total_effect}
                     for name, p in profiles.items()},
        "heatmap_fact": {kind: r.to_dict() for kind, r in single.items()},
    }
    written["json"] = args.out / "trace_fact_model.json"
    written["json"].write_text(json.dumps(summary, indent=1, allow_nan=False))
    print("\nwrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
