"""Why one layer's value cannot make the fact model say a new object on paraphrases, and several layers' can.

    python benchmarks/bench_layerwise.py [--n 40] [--start 450] [--threads 2]

For every case of ``../shared/data/counterfact/counterfact-subset.json[start:start+n]`` on the CounterFact fact
model, δ vectors are optimised with :func:`hf_edit.values.optimise_values` at the MLP output of one layer (0, 1, 2
or 3) or of layers 0–3 jointly, at the subject's last token of the rewrite prompt after MEMIT's context templates
(the layer-wise method's default templates), or at every subject token (one δ per token, counted from the last)
(40 Adam steps, lr 0.5, no KL, no weight decay, a loose clamp of 20‖h‖: as good as a value can get).  The δ are then
*added directly* at the same tokens of the bare rewrite prompt (ES) and of each paraphrase prompt (PS),
with no weight update at all: a ceiling for any edit that writes that value at that key.  Scored like CounterFact
(new object's NLL below the true one's, first tokens).  Writes ``benchmarks/results/layerwise_reach.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _shared import CF_FACTS, COUNTERFACT
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_edit import EditRequest
from hf_edit.architecture import find_layout
from hf_edit.hooks import add_at_positions, frozen_eval
from hf_edit.methods.memit.config import MEMIT_SEED_WORDS
from hf_edit.methods.memit.templates import flatten_templates, sample_grouped_templates
from hf_edit.templates import encode_templated, value_positions
from hf_edit.tokens import pad_token_id
from hf_edit.values import ValueProblem, ValueSettings, optimise_values

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ValueSettings(num_steps=40, lr=0.5, clamp_norm_factor=20.0, kl_factor=0.0, weight_decay=0.0,
                         early_stop_loss=0.0)
#: name -> (layers, where the δ go: the subject's last token or every subject token)
VARIANTS = {"layer 0": ((0,), "subject_last"), "layer 1": ((1,), "subject_last"), "layer 2": ((2,), "subject_last"),
            "layer 3": ((3,), "subject_last"), "layers 0-3 jointly": ((0, 1, 2, 3), "subject_last"),
            "layers 0-3, every subject token": ((0, 1, 2, 3), "subject")}


def _wins(model, tokenizer, modules, deltas, prompt: str, subject: str, tokens: str, new: int, old: int) -> bool:
    request = EditRequest(prompt=prompt, subject=subject, target_new="x")
    encoded = encode_templated(tokenizer, "{}", request)
    positions = value_positions(encoded, tokens)
    shape = (1, len(encoded.ids))
    with ExitStack() as added, torch.no_grad():
        for module, delta in zip(modules, deltas):
            per_token = delta[None] if delta.dim() == 1 else delta[:len(positions)]
            added.enter_context(add_at_positions(module, per_token, torch.tensor(positions[:len(per_token)]), shape,
                                                 rows=torch.zeros(len(per_token), dtype=torch.long)))
        logits = model(input_ids=torch.tensor([encoded.ids])).logits[0, -1]
    return bool(logits[new] > logits[old])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--start", type=int, default=450)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(CF_FACTS)
    model = AutoModelForCausalLM.from_pretrained(CF_FACTS).eval()
    layout = find_layout(model)
    cases = json.loads(Path(COUNTERFACT).read_text())[args.start:args.start + args.n]
    with frozen_eval(model):
        templates = flatten_templates(sample_grouped_templates(model, tokenizer, ((10, 5),), seeds=MEMIT_SEED_WORDS, seed=0))
    rows = {name: {"ES": 0, "PS": 0, "n_para": 0} for name in VARIANTS}
    started = time.perf_counter()
    for case in cases:
        rewrite = case["requested_rewrite"]
        subject = rewrite["subject"]
        request = EditRequest(prompt=rewrite["prompt"], subject=subject, target_new=rewrite["target_new"]["str"])
        new = tokenizer(" " + rewrite["target_new"]["str"])["input_ids"][0]
        old = tokenizer(" " + rewrite["target_true"]["str"])["input_ids"][0]
        for name, (layers, tokens) in VARIANTS.items():
            problem = ValueProblem.build(tokenizer, [request], templates, tokens)
            modules = [model.get_submodule(layout.projection_name(i)) for i in layers]
            with frozen_eval(model):
                (result,) = optimise_values(model, modules, [problem], SETTINGS, pad_id=pad_token_id(tokenizer))
            row = rows[name]
            row["ES"] += _wins(model, tokenizer, modules, result.delta, rewrite["prompt"], subject, tokens, new, old)
            for paraphrase in case["paraphrase_prompts"]:
                at = paraphrase.rfind(subject)
                if at < 0:
                    continue
                prompt = paraphrase[:at] + "{}" + paraphrase[at + len(subject):]
                row["PS"] += _wins(model, tokenizer, modules, result.delta, prompt, subject, tokens, new, old)
                row["n_para"] += 1
    table = {name: {"ES": 100 * r["ES"] / len(cases), "PS": 100 * r["PS"] / max(r["n_para"], 1),
                    "cases": len(cases), "paraphrases": r["n_para"]} for name, r in rows.items()}
    print(f"δ added directly where it was optimised (no weight update); {len(cases)} cases "
          f"[{args.start}:{args.start + len(cases)}], {time.perf_counter() - started:.0f}s, {args.threads} threads")
    print(f"{'value at':<32} {'ES':>6} {'PS':>6}")
    for name, r in table.items():
        print(f"{name:<32} {r['ES']:6.1f} {r['PS']:6.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layerwise_reach.json").write_text(json.dumps(
        {"settings": SETTINGS.__dict__, "start": args.start, "threads": args.threads, "table": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
