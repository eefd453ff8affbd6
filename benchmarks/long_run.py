"""Long runs of sequential ROME edits: does the model survive hundreds of edits?

Applies N CounterFact edits one after another (each computed on the model edited so far) to the fact model
(``../shared/data/models/cf-facts-gpt2``; stories260K if absent) and records:

* per edit: wall time, ‖ΔW‖/‖W‖, the denominator k·u, the key alignment, the KL of the next-token distribution on
  unrelated prompts (the disabling-edit guard's measurements; the guard is off unless ``--guard``), whether it
  failed or was rejected;
* every K edits: perplexity on WikiText-2 (test split, 64-token windows), retention (ES of every edit so far on
  its rewrite prompt), NS of the edited cases' neighbourhood prompts, and the edits' total relative norm.

Runs one process per ``--key-mode`` (``original``, the reference, and ``consistent``, r-ROME); results are written
as JSON after every checkpoint, so a partial run is usable.  ``--plot`` draws the curves of the JSON files of a
folder into a PNG (needs matplotlib: ``pip install matplotlib``).

Usage::

    python benchmarks/long_run.py --key-mode original --n 900 --every 50 --out /tmp/long_run
    python benchmarks/long_run.py --key-mode consistent --n 900 --every 50 --out /tmp/long_run
    python benchmarks/long_run.py --plot --out /tmp/long_run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from _shared import COUNTERFACT, WIKITEXT, fact_model_path
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_edit import EditedModel, ROMEConfig
from hf_edit.architecture import max_positions
from hf_edit.errors import HfEditError
from hf_edit.evaluation import CounterFactCase, counterfact_case_metrics, counterfact_nlls, load_eval_data
from hf_edit.evaluation.perplexity import perplexity, token_windows


def _only(case: CounterFactCase, kind: str) -> CounterFactCase:
    """The case with only the prompts of one kind (cheaper scoring)."""
    return replace(case, paraphrase_prompts=(), attribute_prompts=(), generation_prompts=(),
                   neighborhood_prompts=case.neighborhood_prompts if kind == "neighborhood" else ())


def _checkpoint(edited: EditedModel, cases: list[CounterFactCase], windows: list[list[int]]) -> dict:
    tok = edited.tokenizer
    rewrite = counterfact_nlls(edited.model, tok, [_only(c, "rewrite") for c in cases])
    neighbours = counterfact_nlls(edited.model, tok, [_only(c, "neighborhood") for c in cases])
    es = [counterfact_case_metrics(n)["ES"] for n in rewrite]
    ns = [counterfact_case_metrics(n)["NS"] for n in neighbours]
    return {"perplexity": perplexity(edited.model, windows), "retention_es": 100 * sum(es) / len(es),
            "ns": 100 * sum(ns) / len(ns)}


def run(key_mode: str, n: int, every: int, out: Path, threads: int | None, guard: bool) -> None:
    if threads:
        torch.set_num_threads(threads)
    path = fact_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    config = replace(ROMEConfig.preset(str(path)), key_mode=key_mode, mom2_dataset=str(WIKITEXT),
                     mom2_n_samples=100_000, guard=guard)
    edited = EditedModel(model, tok, method=config, progress=False)
    cases = list(load_eval_data(COUNTERFACT, n=n).cases)
    texts = (WIKITEXT / "wiki.test.raw").read_text().splitlines()
    windows = token_windows(tok, texts, min(64, max_positions(model) or 64), max_windows=200)
    label = key_mode + ("+guard" if guard else "")
    result = {"model": path.name, "key_mode": label, "n": len(cases), "every": every, "edits": [],
              "checkpoints": [{"edits": 0, **_checkpoint(edited, cases[:1], windows)}]}
    done: list[CounterFactCase] = []
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{path.name}-{label}.json"
    for i, case in enumerate(cases):
        start = time.perf_counter()
        record = {"index": i, "case_id": case.case_id}
        try:
            (edit,) = edited.edit(case.request)
            record.update(ok=True, relative_norm=edit.info["norm_update"] / edit.info["norm_weight"],
                          k_dot_u=edit.info["k_dot_u"], key_alignment=edit.info.get("key_alignment"),
                          guard_kl=edit.info.get("guard_kl"),
                          v_steps=edit.info["v_steps"])
            done.append(case)
        except HfEditError as err:
            record.update(ok=False, error=f"{type(err).__name__}: {err}", **getattr(err, "diagnostics", {}))
        record["seconds"] = time.perf_counter() - start
        result["edits"].append(record)
        if (i + 1) % every == 0 or i + 1 == len(cases):
            point = {"edits": i + 1, "successful": len(done), **_checkpoint(edited, done or cases[:1], windows)}
            result["checkpoints"].append(point)
            print(json.dumps(point), flush=True)
            target.write_text(json.dumps(result, indent=1))
    print(f"wrote {target}")


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [("perplexity", "WikiText-2 perplexity", True), ("retention_es", "retention: ES of all edits so far (%)",
                                                               False), ("ns", "NS of edited cases (%)", False)]
    for ax, (key, title, log) in zip(axes[0], panels):
        for r in runs:
            ax.plot([c["edits"] for c in r["checkpoints"]], [c[key] for c in r["checkpoints"]], marker="o",
                    label=r["key_mode"])
        ax.set_title(title)
        ax.set_xlabel("sequential edits")
        if log:
            ax.set_yscale("log")
        ax.legend()
    per_edit = [("relative_norm", "‖ΔW‖/‖W‖ per edit", True), ("key_alignment", "key alignment per edit", False),
                ("guard_kl", "KL on unrelated prompts per edit", True)]
    for ax, (key, title, log) in zip(axes[1], per_edit):
        for r in runs:
            points = [(e["index"], abs(e[key])) for e in r["edits"] if e.get(key) is not None]
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=4, label=r["key_mode"])
        ax.set_title(title)
        ax.set_xlabel("edit index")
        if log:
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"Sequential ROME edits on {runs[0]['model']}")
    fig.tight_layout()
    target = out / "long_run.png"
    fig.savefig(target, dpi=100)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key-mode", choices=["original", "consistent"], default="original")
    parser.add_argument("--n", type=int, default=900, help="edits (the CounterFact subset has 900 cases)")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, help="torch threads (1 when running two modes side by side)")
    parser.add_argument("--guard", action="store_true", help="keep the disabling-edit guard on (rejected edits are "
                                                            "skipped and recorded)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hf_edit_long_run")
    parser.add_argument("--plot", action="store_true", help="only draw the PNG from the JSON files in --out")
    args = parser.parse_args()
    if args.plot:
        print(f"wrote {plot(args.out)}")
    else:
        run(args.key_mode, args.n, args.every, args.out, args.threads, args.guard)


if __name__ == "__main__":
    main()
