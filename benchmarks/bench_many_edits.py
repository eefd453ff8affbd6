"""What k stacked rank-one edits cost: adapter memory and scoring time, against the unedited model.

k ROME edits of one module are one LoRA adapter of rank k: A is (k, d_in), B is (d_out, k), so memory grows as
k·(d_in + d_out) and every forward pass through the module adds two thin matrix products.  This script attaches
adapters of rank k (random factors of the size of real edits) to the fact model and times teacher-forced scoring of
CounterFact prompts (median of ``--runs``), with the ratio to the unedited model in the same run.

Usage::

    python benchmarks/bench_many_edits.py --ranks 0 10 100 300 1000 --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_edit.adapters import LoraFactors, attach_adapters, quiet_peft  # noqa: E402
from hf_edit.architecture import resolve_target  # noqa: E402
from hf_edit.evaluation import counterfact_nlls, load_eval_data  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CF_FACTS = SHARED / "models" / "cf-facts-gpt2"
STORIES = SHARED / "models" / "stories260K"
COUNTERFACT = SHARED / "counterfact" / "counterfact-subset.json"


def _timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 10, 100, 300, 1000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cases", type=int, default=50)
    args = parser.parse_args()
    path = CF_FACTS if CF_FACTS.exists() else STORIES
    tok = AutoTokenizer.from_pretrained(path)
    cases = load_eval_data(COUNTERFACT, n=args.cases).cases
    generator = torch.Generator().manual_seed(0)
    rows, baseline = [], None
    for k in args.ranks:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        target = resolve_target(model, model.config.num_hidden_layers // 3)
        if k:
            factors = LoraFactors(A=torch.randn(k, target.in_features, generator=generator) * 1e-3,
                                  B=torch.randn(target.out_features, k, generator=generator) * 1e-3)
            with quiet_peft():
                model = attach_adapters(model, [("default", {target.name: factors})],
                                        {target.name: target.is_conv1d})
        seconds = _timed(lambda m=model: counterfact_nlls(m, tok, cases), args.runs)
        baseline = seconds if baseline is None else baseline
        memory = 0 if not k else 4 * k * (target.in_features + target.out_features)
        rows.append((k, seconds, seconds / baseline, memory))
    print(f"\n{path.name}: scoring {args.cases} CounterFact cases (all prompts), median of {args.runs} runs")
    print("| rank k (edits in one adapter) | seconds | ratio to k = 0 | adapter memory |")
    print("|---|---|---|---|")
    for k, seconds, ratio, memory in rows:
        print(f"| {k} | {seconds:.3f} | {ratio:.2f} | {memory / 2**20:.2f} MiB |")


if __name__ == "__main__":
    main()
