"""CounterFact numbers and evaluation throughput on the fact model.

Part 1 (``--table``): ROME, FT, FT+L and the unedited model on the first ``--n`` CounterFact cases under the
single protocol, with the generation test; prints the README's metrics table and writes each run's JSON.

Part 2 (``--throughput``): cases per second of scoring, batched across cases vs one case at a time (median of
``--runs``), for the unedited model and for the single protocol's post-edit scoring with FT edits.

Usage::

    python benchmarks/bench_eval.py --table --n 200 --out /tmp/eval-results
    python benchmarks/bench_eval.py --throughput --runs 5
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from _shared import COUNTERFACT, WIKITEXT, fact_model_path, median_seconds
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_edit import EditedModel
from hf_edit.evaluation import counterfact_nlls, evaluate_model, load_eval_data
from hf_edit.methods import FTConfig, FTLConfig, ROMEConfig


def _load(path: Path) -> EditedModel:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return EditedModel(model, AutoTokenizer.from_pretrained(path), progress=False)


def _methods(model_id: str) -> dict[str, object]:
    rome = ROMEConfig.preset(model_id)
    return {"none": "none", "ROME": replace(rome, mom2_dataset=str(WIKITEXT), mom2_n_samples=100_000),
            "FT": FTConfig.preset(model_id), "FT+L": FTLConfig.preset(model_id)}


def table(n: int, out: Path) -> None:
    path = fact_model_path()
    data = load_eval_data(COUNTERFACT, n=n)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, method in _methods(str(path)).items():
        edited = _load(path)
        if name == "ROME":  # statistics are computed once and cached; keep that out of the timing
            edited.edit(data.cases[0].request, method=method)
            edited.remove_edit(0)
        result = evaluate_model(edited, data, method=method, protocol="single", generation=True, progress=True)
        result.save(out / f"{name.lower().replace('+', 'l')}.json")
        phase = "pre" if name == "none" else "post"
        s = result.summary[phase]
        rows.append([name, *(f"{s[m]['mean']:.2f}" for m in ("ES", "PS", "NS", "S", "EM", "PM", "NM", "GE")),
                     f"{result.timing['cases_per_second']:.2f}"])
        print(result.table(), flush=True)
    header = ["method", "ES", "PS", "NS", "S", "EM", "PM", "NM", "GE", "cases/s"]
    print(f"\n{path.name}, first {n} CounterFact cases, single protocol, generation max_length "
          f"{result.settings['generation']['max_length_used']}:")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def throughput(runs: int, n_score: int, n_edit: int) -> None:
    path = fact_model_path()
    edited = _load(path)
    tok = edited.tokenizer
    data = load_eval_data(COUNTERFACT, n=n_score)
    rows = []
    together = median_seconds(lambda: counterfact_nlls(edited.model, tok, data.cases, batch_size=64), runs)
    alone = median_seconds(lambda: [counterfact_nlls(edited.model, tok, [c], batch_size=64) for c in data.cases],
                            runs)
    rows.append(["scoring, unedited", n_score, n_score / alone, n_score / together])
    ft = FTConfig.preset(str(path))
    small = load_eval_data(COUNTERFACT, n=n_edit)
    for label, per_batch in (("one case at a time", 1), ("16 cases per scoring batch", 16)):
        result = [None]

        def run(per_batch=per_batch):
            result[0] = evaluate_model(_load(path), small, method=ft, protocol="single",
                                       cases_per_batch=per_batch, progress=False)

        seconds = median_seconds(run, runs)
        rows.append([f"single protocol, FT ({label})", n_edit, n_edit / seconds,
                     result[0].timing["score_seconds"]])
    print(f"\n{path.name}, median of {runs} runs:")
    print("| what | cases | cases/s one at a time | cases/s batched | ratio |")
    print("|---|---|---|---|---|")
    print(f"| {rows[0][0]} | {rows[0][1]} | {rows[0][2]:.1f} | {rows[0][3]:.1f} | "
          f"{rows[0][3] / rows[0][2]:.2f} |")
    one, batched = rows[1], rows[2]
    print(f"| single protocol, FT edits | {n_edit} | {one[2]:.2f} | {batched[2]:.2f} | {batched[2] / one[2]:.2f} |")
    print(f"  (scoring seconds of the last run: one at a time {one[3]:.2f}, batched {batched[3]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n-score", type=int, default=200)
    parser.add_argument("--n-edit", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hf_edit_eval")
    args = parser.parse_args()
    if args.table:
        table(args.n, args.out)
    if args.throughput:
        throughput(args.runs, args.n_score, args.n_edit)


if __name__ == "__main__":
    main()
