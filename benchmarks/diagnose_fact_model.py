"""Why do ROME edits fail on the CounterFact fact model?  Per-case diagnostics of the default and variations.

    python benchmarks/diagnose_fact_model.py [--n 30] [--start 0] [--variants default layer0 ...] [--threads 1]

For every variant (the current default for a model without a preset, and one-factor changes of it) every case is
edited alone on ``../shared/data/models/cf-facts-gpt2`` (statistics from WikiText-2) and measured in four places:

1. **the v* optimisation** (from the edit's ``info``): the steps it ran (early stop or not), whether the norm clamp
   was hit, its final NLL over the templated prompts (``target_probability`` = e^−NLL);
2. **the value alone**: v* − o (the optimised change of the edited projection's output) added at the subject's last
   token of the *bare rewrite prompt* only, nothing else changed: does the optimised value make the new object
   win there?  (``ES_value``; and added at the subject's last token of each paraphrase prompt: ``PS_value``);
3. **the key's reach**: ``(u · k_para) / (u · k)``, how much of the rank-one update the subject's last token of a
   paraphrase prompt receives relative to the key the update was solved for (1 = all of it);
4. **the edit**: the scores of the applied rank-one update (ES/PS/NS as the benchmark computes them).

Failure modes then read off the table: the optimisation does not reach the target (low p, clamp saturated);
the value is right but the update does not deliver it (ES_value ≫ ES); the value does not carry to paraphrases
(PS_value low) or the key does not reach them (reach ≪ 1).

Writes ``benchmarks/results/diagnose_fact_model.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from hf_edit import EditedModel, ROMEConfig
from hf_edit.architecture import unwrap_model
from hf_edit.errors import HfEditError
from hf_edit.evaluation import counterfact_case_metrics, counterfact_nll, load_eval_data
from hf_edit.hooks import capture, forward_hook
from hf_edit.tokens import encode_with_subject, pad_batch, pad_token_id, target_ids

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
MODEL = SHARED / "models" / "cf-facts-gpt2"
COUNTERFACT = SHARED / "counterfact" / "counterfact-subset.json"
WIKITEXT = SHARED / "corpus" / "wikitext-2-raw"
RESULTS = HERE / "results"

#: The statistics every variant uses (WikiText-2, 2,000 texts).
STATS = {"mom2_dataset": str(WIKITEXT), "mom2_n_samples": 2000}

#: One-factor variations of the current default (layer n // 3 = 2 on the 6-layer model) and a few combinations.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "layer0": {"layers": (0,)},
    "layer1": {"layers": (1,)},
    "consistent": {"key_mode": "consistent"},
    "clamp20": {"clamp_norm_factor": 20.0},
    "steps60": {"v_num_grad_steps": 60},
    "lr0.1": {"v_lr": 0.1},
    "lr1": {"v_lr": 1.0},
    "kl0": {"kl_factor": 0.0},
    "kl1": {"kl_factor": 1.0},
    "wd0": {"v_weight_decay": 0.0},
    "bare_template": {"context_templates": ("{}",)},
    "templates_long": {"context_template_length_params": ((10, 5), (20, 5))},
    "templates_many": {"context_template_length_params": ((5, 20), (10, 20))},
    "fact_last": {"fact_token": "last"},
    "no_early_stop": {"early_stop_loss": 0.0},
    "layer0_steps60": {"layers": (0,), "v_num_grad_steps": 60},
    "layer0_consistent_steps60": {"layers": (0,), "key_mode": "consistent", "v_num_grad_steps": 60},
    "through": {"through": True},
    "through_layer0": {"through": True, "layers": (0,)},
    "through_layer1": {"through": True, "layers": (1,)},
    "preserve_layer0": {"preserve": 10.0, "layers": (0,)},
    "preserve_through_layer0": {"preserve": 10.0, "through": True, "layers": (0,)},
    "preserve_ctx_through_layer0_steps60": {"preserve": 10.0, "preserve_subject": False, "through": True,
                                            "layers": (0,), "v_num_grad_steps": 60},
    "preserve_layer0_steps100": {"preserve": 10.0, "layers": (0,), "v_num_grad_steps": 100},
    "preserve_layer0_lr1_clamp10_steps60": {"preserve": 10.0, "layers": (0,), "v_lr": 1.0, "clamp_norm_factor": 10.0,
                                            "v_num_grad_steps": 60},
    "preserve_layer1_clamp10_steps60": {"preserve": 10.0, "layers": (1,), "clamp_norm_factor": 10.0,
                                        "v_num_grad_steps": 60},
    "preserve_layer2_clamp10_steps60": {"preserve": 10.0, "clamp_norm_factor": 10.0, "v_num_grad_steps": 60},
}


# -- prototypes of editor changes (this process only) --------------------------------------------------------------
# ROME optimises δ added at the subject's last token only, but the update ΔW = rv uᵀ it becomes adds
# δ · (u·k_t)/(u·k) at *every* position t whose key k_t is not orthogonal to u ("spillover").  Two prototypes, each
# a small change to ROME's editor, registered in this process only as ``method="rome-proto"`` to measure whether the
# spillover is what limits the edits (everything else — templates, loss, clamp, closed form — is ROME's):
#
# * ``through=True``: optimise δ through the update it becomes, i.e. with the edited model's own output
#   (δ · (u·k_t)/(u·k) added at every position of every templated prompt and of the KL prompt);
# * ``preserve=λ``: choose u = (C + λ·K_o K_oᵀ/n_o)⁻¹ k̄, K_o the n_o keys of every *other* token of the templated
#   prompts and of the KL prompt, so that the update leaves those tokens (the relation's words, which neighbouring
#   facts share) nearly untouched: the update then does what v* assumed, at the subject's last token only.
def _through_update(module, delta, positions, batch_shape, *, u, key, offset):
    """Stands in for :func:`hf_edit.hooks.add_at_positions` inside ROME's v* loop: adds
    ``(δ + offset) · (u·k_t)/(u·k)`` at every position t (k_t = the module's input there)."""
    from contextlib import contextmanager

    from hf_edit.hooks import as_batch_seq

    @contextmanager
    def block():
        def hook(_module, args, output):
            x = as_batch_seq(args[0], batch_shape).float()
            scale = (x @ u.to(x.device)) / torch.dot(u, key).to(x.device)
            out = as_batch_seq(output, batch_shape)
            change = scale[..., None] * (delta + offset.to(delta.device))[None, None]
            return (out + change.to(out.dtype)).reshape(output.shape)

        with forward_hook(module, hook):
            yield

    return block()


def register_prototype() -> type:
    """Register ``method="rome-proto"`` (ROME plus the ``through`` and ``preserve`` options) in this process and
    return its config class."""
    from dataclasses import dataclass
    from typing import ClassVar
    from unittest import mock

    from hf_edit.hooks import frozen_eval
    from hf_edit.methods import available_methods, get_method, register_method
    from hf_edit.methods.rome import ROMEEditor
    from hf_edit.methods.rome import editor as rome_editor

    if "rome-proto" in available_methods():
        return get_method("rome-proto").config_class

    @dataclass(frozen=True)
    class PrototypeROMEConfig(ROMEConfig):
        """ROME with two prototype options.

        Args:
            through: optimise v* through the rank-one update it becomes (the edited model's own output).
            preserve: λ ≥ 0; u = (C + λ·K_o K_oᵀ/n_o)⁻¹ k̄ with K_o the keys of the other tokens of the templated
                prompts and of the KL prompt (0: ROME's u = C⁻¹k̄).
            preserve_subject: also preserve the subject's tokens before the fact token (False: only the tokens
                outside the subject, so the update may act on the whole subject).
        """

        method: ClassVar[str] = "rome-proto"
        label: ClassVar[str] = "ROME (prototype: through/preserve)"
        through: bool = False
        preserve: float = 0.0
        preserve_subject: bool = True

    class PrototypeROMEEditor(ROMEEditor):
        config_class = PrototypeROMEConfig

        def _other_keys(self, module, request) -> torch.Tensor:
            """Keys of every token but the fact token of the templated prompts and the KL prompt."""
            from hf_edit.hooks import capture as capture_io

            contexts = [self._encode(template, request) for template in self.templates]
            contexts.append(encode_with_subject(self.tokenizer, "", request.subject, " is a"))
            device = next(self.model.parameters()).device
            batch = pad_batch([c.ids for c in contexts], pad_token_id(self.tokenizer), device)
            fact = self._positions(contexts)
            with torch.no_grad(), frozen_eval(self.model), \
                    capture_io(module, tuple(batch["input_ids"].shape)) as seen:
                self.model(**batch)
            keep_subject = self.config.preserve_subject
            rows = [seen.inputs[i, [t for t in range(len(c.ids)) if t != int(fact[i])
                                    and (keep_subject or not c.subject_first <= t <= c.subject_last)]]
                    for i, c in enumerate(contexts)]
            return torch.cat(rows).double()

        def compute_update(self, request, target):
            module = unwrap_model(self.model).get_submodule(target.name)
            cfg = self.config
            with ExitStack() as stack:
                if cfg.preserve > 0:
                    others = self._other_keys(module, request)
                    extra = cfg.preserve * others.T @ others / len(others)
                    stats = self.stats_for(target)
                    matrix = stats.second_moment().double().to(others.device) + extra

                    def left_vector(_target, k_mean, matrix=matrix):
                        u = torch.linalg.solve(matrix, k_mean.double().to(matrix.device)).to(k_mean)
                        return u / u.norm()

                    stack.enter_context(mock.patch.object(self, "_left_vector", left_vector))
                if cfg.through:
                    contexts = [self._encode(template, request) for template in self.templates]
                    with frozen_eval(self.model):
                        keys, outputs = self._keys_and_outputs(module, contexts)
                    k_mean = keys.mean(0)
                    u = self._left_vector(target, k_mean)
                    if cfg.key_mode == "original":
                        key, offset = keys[0], torch.zeros_like(outputs[0])
                    else:
                        key, offset = k_mean, outputs[0] - outputs.mean(0)
                    patched = lambda *a, **k: _through_update(*a, **k, u=u, key=key, offset=offset)
                    stack.enter_context(mock.patch.object(rome_editor, "add_at_positions", patched))
                return super().compute_update(request, target)

    register_method(PrototypeROMEConfig, PrototypeROMEEditor)
    return PrototypeROMEConfig


def make_config(overrides: dict[str, Any]) -> ROMEConfig:
    """The variant's config: ROME with :data:`STATS` and ``overrides`` (``through``/``preserve``: the
    prototype)."""
    if {"through", "preserve", "preserve_subject"} & set(overrides):
        return register_prototype()(**STATS, **overrides)
    return ROMEConfig(**STATS, **overrides)


def _split(prompt: str, subject: str) -> tuple[str, str] | None:
    if "{}" in prompt:
        before, after = prompt.split("{}", 1)
        return before, after
    at = prompt.find(subject)
    return None if at < 0 else (prompt[:at], prompt[at + len(subject):])


@torch.no_grad()
def _keys(model, tokenizer, module, encoded: list) -> torch.Tensor:
    """The module's input at the subject's last token of every encoded prompt."""
    batch = pad_batch([e.ids for e in encoded], pad_token_id(tokenizer), next(model.parameters()).device)
    rows = torch.arange(len(encoded))
    last = torch.tensor([e.subject_last for e in encoded])
    with capture(module, tuple(batch["input_ids"].shape)) as seen:
        model(**batch)
    return seen.inputs[rows, last].float()


@torch.no_grad()
def _nll_with_value(model, tokenizer, module, encoded: list, delta: torch.Tensor, targets: list[list[int]]
                    ) -> list[list[float]]:
    """Mean per-token NLL of each target after each prompt, with ``delta`` added to ``module``'s output at the
    subject's last token of the prompt (and nowhere else)."""
    rows, positions, spans = [], [], []
    for e in encoded:
        for t in targets:
            rows.append(list(e.ids) + t[:-1])
            positions.append(e.subject_last)
            spans.append((len(e.ids) - 1, t))
    batch = pad_batch(rows, pad_token_id(tokenizer), next(model.parameters()).device)
    shape = tuple(batch["input_ids"].shape)
    index = torch.arange(len(rows))
    pos = torch.tensor(positions)

    def hook(_module, _args, output):
        out = output.reshape(shape[0], shape[1], -1).clone()
        out[index, pos] += delta.to(out.dtype)
        return out.reshape(output.shape)

    with forward_hook(module, hook):
        logits = model(**batch).logits.float().log_softmax(-1)
    out, k = [], 0
    for _ in encoded:
        values = []
        for _t in targets:
            start, t = spans[k]
            picked = logits[k, start: start + len(t)].gather(-1, torch.tensor(t)[:, None])
            values.append(float(-picked.mean()))
            k += 1
        out.append(values)
    return out


def diagnose_case(edited: EditedModel, config: ROMEConfig, case) -> dict[str, Any]:
    """Edit one case alone, measure it, and remove the edit."""
    request, tokenizer = case.request, edited.tokenizer
    record: dict[str, Any] = {"case_id": case.case_id}
    started = time.perf_counter()
    try:
        edits = edited.edit(request, method=config)
    except HfEditError as err:
        record.update(ok=False, error=type(err).__name__, message=str(err)[:300], seconds=time.perf_counter() - started)
        return record
    record["seconds"] = time.perf_counter() - started
    edit = edits[0]
    info = edit.info
    record.update(ok=True, **{k: info.get(k) for k in (
        "v_steps", "clamped", "loss", "nll", "kl", "weight_decay", "target_probability", "relative_norm",
        "key_alignment", "guard_kl", "k_dot_u", "norm_v_init", "norm_delta", "norm_residual")})
    record["max_steps"] = config.v_num_grad_steps
    record["early_stopped"] = info["v_steps"] < config.v_num_grad_steps
    try:
        metrics = counterfact_case_metrics(counterfact_nll(edited.model, tokenizer, case))
        record.update({k: metrics[k] for k in ("ES", "PS", "NS")})
    finally:
        edited.remove_edit(len(edited.edits) - 1)

    # The value alone and the key's reach, on the base model.
    model = edited.model
    module = unwrap_model(model).get_submodule(edit.module)
    u = edit.factors.A[0].float()
    key = edit.tensors["key"].float()
    new, true = target_ids(tokenizer, request.target_new), target_ids(tokenizer, request.target_true)
    bare = encode_with_subject(tokenizer, request.prefix, request.subject, request.suffix)
    paraphrases = []
    for prompt in case.paraphrase_prompts:
        parts = _split(prompt, request.subject)
        if parts is not None:
            paraphrases.append(encode_with_subject(tokenizer, parts[0], request.subject, parts[1]))
    encoded = [bare, *paraphrases]
    keys = _keys(model, tokenizer, module, encoded)
    with torch.no_grad():
        batch = pad_batch([e.ids for e in encoded], pad_token_id(tokenizer), next(model.parameters()).device)
        with capture(module, tuple(batch["input_ids"].shape)) as seen:
            model(**batch)
        outputs = seen.outputs[torch.arange(len(encoded)), torch.tensor([e.subject_last for e in encoded])].float()
    delta = edit.tensors["value"].float() - outputs[0]  # v* − o at the bare prompt's subject
    nlls = _nll_with_value(model, tokenizer, module, encoded, delta, [new, true])
    record["ES_value"] = float(nlls[0][0] < nlls[0][1])
    record["p_new_value"] = math.exp(-nlls[0][0])
    if paraphrases:
        record["PS_value"] = float(np.mean([n < t for n, t in nlls[1:]]))
        reach = [float(torch.dot(u, k) / torch.dot(u, key)) for k in keys[1:]]
        record["reach_paraphrase"] = float(np.mean(reach))
        record["n_paraphrases_found"] = len(paraphrases)
    record["reach_bare"] = float(torch.dot(u, keys[0]) / torch.dot(u, key))
    # Spillover on the rewrite prompt: the share of the update every other token receives.
    with torch.no_grad(), capture(module, (1, len(bare.ids))) as seen_bare:
        model(input_ids=torch.tensor([bare.ids], device=next(model.parameters()).device))
    reach_all = (seen_bare.inputs[0].float() @ u) / torch.dot(u, key)
    others = [i for i in range(len(bare.ids)) if not bare.subject_first <= i <= bare.subject_last]
    record["reach_last"] = float(reach_all[-1]) if others else math.nan
    record["reach_max_other"] = float(reach_all[others].abs().max()) if others else math.nan
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r.get("ok")]
    out: dict[str, Any] = {"n": len(records), "failed": len(records) - len(ok)}

    def mean(key: str, scale: float = 1.0) -> float:
        values = [float(r[key]) for r in ok if r.get(key) is not None and not math.isnan(float(r[key]))]
        return scale * float(np.mean(values)) if values else math.nan

    def stderr(key: str, scale: float = 100.0) -> float:
        values = [float(r[key]) for r in ok if r.get(key) is not None]
        return scale * float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan

    for key in ("ES", "PS", "NS", "ES_value", "PS_value"):
        out[key] = mean(key, 100)
        out[key + "_stderr"] = stderr(key)
    parts = [out["ES"], out["PS"], out["NS"]]
    out["S"] = (0.0 if any(p <= 0 for p in parts) else 3 / sum(1 / p for p in parts)) if not any(
        math.isnan(p) for p in parts) else math.nan
    for key in ("clamped", "early_stopped", "v_steps", "nll", "target_probability", "relative_norm",
                "key_alignment", "reach_paraphrase", "reach_bare", "reach_last", "reach_max_other", "p_new_value", "seconds", "norm_delta",
                "norm_v_init", "weight_decay", "kl"):
        out[key] = mean(key)
    out["target_probability_median"] = float(np.median([r["target_probability"] for r in ok])) if ok else math.nan
    out["reach_paraphrase_median"] = float(np.median([r["reach_paraphrase"] for r in ok if "reach_paraphrase" in r])) \
        if ok else math.nan
    out["v_star_success"] = mean_bool(ok, lambda r: r["target_probability"] > 0.5)
    copies = copy_case_ids()
    for group, members in (("copy", True), ("other", False)):
        rows = [r for r in ok if (r["case_id"] in copies) == members]
        out[f"n_{group}"] = len(rows)
        for metric in ("ES", "PS", "NS"):
            out[f"{metric}_{group}"] = 100 * float(np.mean([r[metric] for r in rows])) if rows else math.nan
    return out


def copy_case_ids() -> set[Any]:
    """Case ids whose true object is written in the subject (e.g. 'Honda Insight' → Honda)."""
    records = json.loads(COUNTERFACT.read_text())
    return {r["case_id"] for r in records
            if r["requested_rewrite"]["target_true"]["str"].lower() in r["requested_rewrite"]["subject"].lower()}


def mean_bool(records: list[dict[str, Any]], predicate) -> float:
    return 100 * float(np.mean([predicate(r) for r in records])) if records else math.nan


COLUMNS = [("variant", None), ("ES", "{:.1f}"), ("PS", "{:.1f}"), ("NS", "{:.1f}"), ("S", "{:.1f}"),
           ("failed", "{:d}"), ("clamped", "{:.0%}"), ("early_stopped", "{:.0%}"), ("v_steps", "{:.1f}"),
           ("target_probability", "{:.2f}"), ("v_star_success", "{:.0f}"), ("ES_value", "{:.1f}"),
           ("PS_value", "{:.1f}"), ("reach_paraphrase_median", "{:.2f}"), ("reach_last", "{:.2f}"),
           ("reach_max_other", "{:.2f}"), ("ES_copy", "{:.0f}"), ("ES_other", "{:.0f}"),
           ("NS_copy", "{:.0f}"), ("NS_other", "{:.0f}"), ("relative_norm", "{:.2f}"),
           ("seconds", "{:.1f}")]
HEADERS = {"reach_last": "reach(last)", "reach_max_other": "max reach(other)", "target_probability": "p(v*)", "v_star_success": "p(v*)>.5 %", "reach_paraphrase_median": "reach(para)",
           "relative_norm": "‖ΔW‖/‖W‖", "early_stopped": "early stop", "seconds": "s/edit", "v_steps": "steps"}


def markdown(summaries: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]]) -> str:
    header = [HEADERS.get(c, c) for c, _ in COLUMNS] + ["changes from the default"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in summaries.items():
        cells = [name]
        for column, fmt in COLUMNS[1:]:
            value = s.get(column)
            cells.append("-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value))
        cells.append(", ".join(f"{k}={v}" for k, v in overrides[name].items()) or "(layer 2, reference values)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combine(paths: list[Path], out: Path) -> None:
    """Merge the outputs of several runs on the same cases (later files win) and write JSON and Markdown."""
    merged: dict[str, Any] = {"cases": {}, "summaries": {}, "overrides": {}}
    for path in paths:
        data = json.loads(path.read_text())
        if "split" in merged and data["split"] != merged["split"]:
            raise SystemExit(f"{path} was run on other cases ({data['split']} vs {merged['split']})")
        for key in ("cases", "summaries", "overrides"):
            merged[key].update(data[key])
        merged.update({k: v for k, v in data.items() if k not in ("cases", "summaries", "overrides")})
    order = [n for n in VARIANTS if n in merged["summaries"]] + [n for n in merged["summaries"] if n not in VARIANTS]
    for key in ("cases", "summaries", "overrides"):
        merged[key] = {n: merged[key][n] for n in order}
    for name in order:  # recompute with the current summarise (older runs lack some fields)
        merged["summaries"][name] = summarise(merged["cases"][name])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1, default=str, allow_nan=True))
    out.with_suffix(".md").write_text(markdown(merged["summaries"], merged["overrides"]) + "\n")
    print(markdown(merged["summaries"], merged["overrides"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="cases (from --start)")
    parser.add_argument("--start", type=int, default=0, help="first case (the dev split is cases 0-449)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "diagnose_fact_model.json")
    parser.add_argument("--merge", action="store_true", help="add to the variants already in --out")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                        help="only combine earlier outputs (same cases) into --out, in the order of VARIANTS")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine, args.out)
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*did not take.*")  # the benchmark records it per case

    data = load_eval_data(COUNTERFACT, n=args.start + args.n)
    cases = data.cases[args.start:]
    edited = EditedModel.from_pretrained(MODEL, progress=False)
    previous = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    summaries: dict[str, Any] = dict(previous.get("summaries", {}))
    per_case: dict[str, Any] = dict(previous.get("cases", {}))
    overrides_all: dict[str, Any] = dict(previous.get("overrides", {}))
    for name in args.variants:
        overrides = VARIANTS[name]
        config = make_config(overrides)
        started = time.perf_counter()
        records = [diagnose_case(edited, config, case) for case in cases]
        summaries[name] = summarise(records)
        per_case[name] = records
        overrides_all[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
        s = summaries[name]
        print(f"{name:<28} ES {s['ES']:5.1f} PS {s['PS']:5.1f} NS {s['NS']:5.1f} S {s['S']:5.1f} failed "
              f"{s['failed']:2d} clamped {s['clamped']:.2f} early {s['early_stopped']:.2f} p(v*) "
              f"{s['target_probability']:.2f} ES_value {s['ES_value']:5.1f} PS_value {s['PS_value']:5.1f} reach "
              f"{s['reach_paraphrase_median']:.2f} ({time.perf_counter() - started:.0f}s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": MODEL.name, "cases": per_case, "summaries": summaries, "overrides": overrides_all,
                   "split": {"start": args.start, "n": len(cases)}, "stats": {k: str(v) for k, v in STATS.items()},
                   "base_config": dataclasses.asdict(ROMEConfig(**STATS)) | {"mom2_dataset": "wikitext-2-raw"},
                   "torch_threads": torch.get_num_threads()}
        args.out.write_text(json.dumps(payload, indent=1, default=str, allow_nan=True))
        args.out.with_suffix(".md").write_text(markdown(summaries, overrides_all) + "\n")
    print(markdown(summaries, overrides_all))


if __name__ == "__main__":
    sys.exit(main())
