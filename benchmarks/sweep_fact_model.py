"""Which default edits the CounterFact fact model well?  A dev/test sweep with :func:`hf_edit.evaluation.sweep`.

    python benchmarks/sweep_fact_model.py screen   [--n 60] [--candidates ...]        # dev cases 0..n-1
    python benchmarks/sweep_fact_model.py evaluate --split dev|test --candidates A B  # all 450 cases of the split
    python benchmarks/sweep_fact_model.py report                                     # JSON + Markdown summary

The 900 CounterFact cases of ``../shared/data/counterfact/counterfact-subset.json`` are split into **dev** (cases
0–449) and **test** (450–899).  ``screen`` ranks every candidate on the first ``--n`` dev cases; ``evaluate`` scores
named candidates on a whole split (run several in parallel processes: each writes its own file); ``report``
gathers everything under ``benchmarks/results/`` into ``sweep_fact_model.json`` and ``sweep_fact_model.md``.

Every candidate is edited with the single protocol on ``../shared/data/models/cf-facts-gpt2`` with second-moment
statistics from WikiText-2 (2,000 texts).  "default" is ROME at layer n // 3, what such a model got before;
"layerwise …" is the layer-wise method, what it gets now.  Candidates named ``proto …`` use the editor prototypes of
``benchmarks/diagnose_fact_model.py`` (``method="rome-proto"``: ROME with ``preserve``/``through``), i.e. changes of
ROME's editor that hf_edit does not ship yet; the others are plain configs of the registered methods.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagnose_fact_model import COUNTERFACT, MODEL, RESULTS, STATS, copy_case_ids, register_prototype

from hf_edit import EditedModel, ROMEConfig
from hf_edit.evaluation import EvalData, SweepResult, load_eval_data, sweep

SPLITS = {"dev": (0, 450), "test": (450, 900)}
GOAL = {"S": 85.0, "ES": 95.0, "PS": 80.0, "NS": 85.0}


def _rome(**overrides: Any) -> ROMEConfig:
    return ROMEConfig(**STATS, **overrides)


def _proto(**overrides: Any) -> ROMEConfig:
    return register_prototype()(**STATS, **overrides)


def _memit(**overrides: Any):
    from hf_edit.methods import get_method

    return get_method("memit").config_class(**STATS, **overrides)


def _layerwise(**overrides: Any):
    from hf_edit import LayerwiseConfig

    return LayerwiseConfig(**STATS, **overrides)


#: name -> factory of the config.  "default" is what a model without a preset got before the layer-wise method
#: (ROME at layer n // 3 = 2); "layerwise default" is what it gets now.
CANDIDATES: dict[str, Any] = {
    "default": lambda: _rome(),
    "layerwise default": lambda: _layerwise(),  # layers 0-3, every subject token, clamp 1.25 (then 2, 4)
    "layerwise no escalation": lambda: _layerwise(clamp_escalation=()),
    "layerwise L0-3 clamp2": lambda: _layerwise(layers=(0, 1, 2, 3), clamp_norm_factor=2.0, value_tokens="fact"),
    "layerwise L0-2 clamp4": lambda: _layerwise(layers=(0, 1, 2), clamp_norm_factor=4.0, value_tokens="fact"),
    "layerwise L0-2 clamp2": lambda: _layerwise(layers=(0, 1, 2), clamp_norm_factor=2.0, value_tokens="fact"),
    "layerwise subject L0-2": lambda: _layerwise(layers=(0, 1, 2)),
    "layerwise subject clamp1": lambda: _layerwise(clamp_norm_factor=1.0),
    "layerwise subject clamp2": lambda: _layerwise(clamp_norm_factor=2.0),
    "layerwise subject clamp1.25": lambda: _layerwise(clamp_norm_factor=1.25),
    "layerwise subject clamp1.5": lambda: _layerwise(clamp_norm_factor=1.5),
    "layerwise subject kl0.5": lambda: _layerwise(kl_factor=0.5),
    "layerwise subject clamp4": lambda: _layerwise(clamp_norm_factor=4.0),
    "layerwise L0-3": lambda: _layerwise(layers=(0, 1, 2, 3), clamp_norm_factor=4.0),
    "layerwise mean keys": lambda: _layerwise(template_keys="mean"),
    "layerwise no preservation": lambda: _layerwise(prompt_preservation=0.0),
    "rome L0": lambda: _rome(layers=(0,)),
    "rome L1": lambda: _rome(layers=(1,)),
    "rome L0 steps60": lambda: _rome(layers=(0,), v_num_grad_steps=60),
    "rome L0 steps60 lr1 clamp10": lambda: _rome(layers=(0,), v_num_grad_steps=60, v_lr=1.0, clamp_norm_factor=10.0),
    "rome L1 steps60 clamp10": lambda: _rome(layers=(1,), v_num_grad_steps=60, clamp_norm_factor=10.0),
    "rome L2 steps60 clamp20": lambda: _rome(v_num_grad_steps=60, clamp_norm_factor=20.0),
    "rome L0 consistent": lambda: _rome(layers=(0,), key_mode="consistent"),
    "memit default": lambda: _memit(),
    "proto through L0": lambda: _proto(layers=(0,), through=True),
    "proto preserve L0": lambda: _proto(layers=(0,), preserve=10.0),
    "proto preserve L0 steps100": lambda: _proto(layers=(0,), preserve=10.0, v_num_grad_steps=100),
    "proto preserve L0 steps60 lr1 clamp10": lambda: _proto(layers=(0,), preserve=10.0, v_num_grad_steps=60,
                                                             v_lr=1.0, clamp_norm_factor=10.0),
    "proto preserve L1 steps60 clamp10": lambda: _proto(layers=(1,), preserve=10.0, v_num_grad_steps=60,
                                                         clamp_norm_factor=10.0),
    "proto preserve-ctx through L0 steps60": lambda: _proto(layers=(0,), preserve=10.0, preserve_subject=False,
                                                             through=True, v_num_grad_steps=60),
}


def split_data(name: str, n: int | None = None) -> EvalData:
    start, end = SPLITS[name]
    data = load_eval_data(COUNTERFACT, n=end)
    cases = data.cases[start:end][:n]
    return EvalData(cases=cases, data_format=data.data_format, source=f"{data.source} [{start}:{start + len(cases)}]",
                    fingerprint=data.fingerprint, n_total=data.n_total)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run(split: str, names: list[str], n: int | None, out: Path) -> SweepResult:
    data = split_data(split, n)
    configs = {name: CANDIDATES[name]() for name in names}
    model = EditedModel.from_pretrained(MODEL, progress=False)
    started = time.perf_counter()
    result = sweep(model, data, configs, failed="unedited", keep_results=True, progress=True)
    print(f"{split}: {len(data)} cases, {len(configs)} candidates, {time.perf_counter() - started:.0f}s")
    out.parent.mkdir(parents=True, exist_ok=True)
    result.to_json(out)
    per_case = {e.name: [{"case_id": c["case_id"], "ok": c.get("edit", {}).get("ok"),
                          "metrics": c.get("post", {}).get("metrics"), "pre": c.get("pre", {}).get("metrics"),
                          "info": c.get("edit", {}).get("info")} for c in e.result.cases] for e in result.entries}
    out.with_name(out.stem + "_cases.json").write_text(json.dumps(per_case, default=str) + "\n")
    return result


def _meets(summary: dict[str, dict[str, float]]) -> bool:
    return all(summary.get(k, {}).get("mean", -1) >= v for k, v in GOAL.items())


def _copy_breakdown(results: Path) -> dict[tuple[str, str, str], dict[str, float]]:
    from hf_edit.evaluation.aggregate import harmonic_mean

    copies = copy_case_ids()
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for split in SPLITS:
        for path in sorted(results.glob(f"sweep_fact_model_{split}_*_cases.json")):
            for name, cases in json.loads(path.read_text()).items():
                for group, members in (("copy", True), ("other", False)):
                    rows = [c["metrics"] if c["metrics"] else c["pre"] for c in cases
                            if (c["case_id"] in copies) == members and (c["metrics"] or c["pre"])]
                    if not rows:
                        continue
                    means = {k: 100 * sum(r[k] for r in rows) / len(rows) for k in ("ES", "PS", "NS")}
                    means["S"] = 100 * harmonic_mean([means[k] / 100 for k in ("ES", "PS", "NS")])
                    out[(name, split, group)] = {"n": len(rows), **means}
    return out


def report(results: Path) -> None:
    """Gather the screen and split files into sweep_fact_model.{json,md}."""
    screen = None
    for path in sorted(results.glob("sweep_fact_model_screen*.json")):
        if path.stem.endswith("_cases"):
            continue
        part = SweepResult.from_json(path)
        if screen is None:
            screen = part
        elif part.data.get("n") == screen.data.get("n"):
            screen.entries += [e for e in part.entries if e.name not in {x.name for x in screen.entries}]
    splits: dict[str, dict[str, Any]] = {"dev": {}, "test": {}}
    for split, entries in splits.items():
        for path in sorted(results.glob(f"sweep_fact_model_{split}_*.json")):
            if path.stem.endswith("_cases"):
                continue
            for entry in SweepResult.from_json(path).entries:
                entries[entry.name] = entry
    lines = ["# Defaults for a model without a preset, on the CounterFact fact model (cf-facts-gpt2)", "",
             ("Single protocol, statistics from WikiText-2 (2,000 texts); failed edits scored as the unedited model. "
              "Dev = CounterFact-subset cases 0–449, test = 450–899. Goal: S ≥ 85, ES ≥ 95, PS ≥ 80, NS ≥ 85."), ""]
    if screen is not None:
        lines += [f"## Screen: first {screen.data.get('n')} dev cases", "", screen.markdown(), ""]
    lines += ["## Dev and test (the n column: cases of the split evaluated)", "",
              "| candidate | split | S | ES | PS | NS | n | failed | cases/s | meets goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    cell = lambda s, m: (f"{s[m]['mean']:.1f} ± {s[m]['stderr']:.1f}" if m in s and s[m].get("stderr") is not None
                         and not math.isnan(s[m]["stderr"]) else f"{s[m]['mean']:.1f}" if m in s else "-")
    names = list(dict.fromkeys([*splits["dev"], *splits["test"]]))
    for name in names:
        for split in ("dev", "test"):
            entry = splits[split].get(name)
            if entry is None:
                continue
            s = entry.summary
            lines.append(f"| {name} | {split} | {cell(s, 'S')} | {cell(s, 'ES')} | {cell(s, 'PS')} | {cell(s, 'NS')} | "
                         f"{entry.n_cases} | {entry.n_failed} | {entry.cases_per_second:.3f} | "
                         f"{'yes' if _meets(s) else 'no'} |")
    breakdown = _copy_breakdown(results)
    if breakdown:
        lines += ["", "## Where the edits fail: cases whose true object is written in the subject", "",
                  ("CounterFact cases such as 'Honda Insight is produced by' → Honda: the model can copy the object "
                   "from the subject's first token, which no edit of the subject's last token removes; values at "
                   "every subject token (the default) recover part of it, at some cost to those cases' neighbours, "
                   "who share that token. Scores (failed edits as unedited) on those cases and on the others:"), "",
                  "| candidate | split | cases | ES | PS | NS | S |", "|---|---|---|---|---|---|---|"]
        for (name, split, group), s in breakdown.items():
            lines.append(f"| {name} | {split} | {group} ({s['n']}) | {s['ES']:.1f} | {s['PS']:.1f} | {s['NS']:.1f} | "
                         f"{s['S']:.1f} |")
    payload = {"goal": GOAL, "splits": {k: list(v) for k, v in SPLITS.items()},
               "copy_breakdown": {" | ".join(k): v for k, v in breakdown.items()},
               "screen": screen.to_dict() if screen else None,
               "dev": {k: e.to_dict() for k, e in splits["dev"].items()},
               "test": {k: e.to_dict() for k, e in splits["test"].items()}}
    (results / "sweep_fact_model.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (results / "sweep_fact_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["screen", "evaluate", "report"])
    parser.add_argument("--split", choices=list(SPLITS), default="dev")
    parser.add_argument("--n", type=int, help="cases of the split (screen: default 60; evaluate: all)")
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*did not take.*")
    if args.command == "report":
        report(args.results)
        return
    names = args.candidates or list(CANDIDATES)
    if args.command == "screen":
        suffix = "" if args.candidates is None else "_" + _slug("_".join(names))
        run("dev", names, args.n or 60, args.results / f"sweep_fact_model_screen{suffix}.json")
    else:
        suffix = _slug("_".join(names)) if len(names) > 1 else _slug(names[0])
        run(args.split, names, args.n, args.results / f"sweep_fact_model_{args.split}_{suffix}.json")


if __name__ == "__main__":
    main()
