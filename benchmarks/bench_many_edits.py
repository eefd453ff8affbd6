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

import torch
from _shared import COUNTERFACT, fact_model_path, median_seconds
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_edit.adapters import LoraFactors, attach_adapters, quiet_peft
from hf_edit.architecture import resolve_target
from hf_edit.evaluation import counterfact_nlls, load_eval_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 10, 100, 300, 1000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cases", type=int, default=50)
    args = parser.parse_args()
    path = fact_model_path()
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
        seconds = median_seconds(lambda m=model: counterfact_nlls(m, tok, cases), args.runs)
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
