"""Edit one fact and show the model's predictions before and after.

The method is hf_edit's default for the model (ROME with the reference's values for GPT-2 XL and GPT-J, the
layer-wise method for a model no method ships a preset for, such as the fact model below), or ``--method``.

Run from the repository root::

    python examples/edit_and_generate.py                      # offline default model, see below
    python examples/edit_and_generate.py --model gpt2-xl \\
        --prompt "{} is located in the city of" --subject "The Eiffel Tower" --target Rome

Default model: the CounterFact fact model in ``../shared/data/models/cf-facts-gpt2`` when present (it knows the
CounterFact facts), else stories260K from the same folder, else ``gpt2`` from the Hub.  Second-moment statistics
come from WikiText-2 in ``../shared/data/corpus`` when present, else from ``--stats-data`` (a Hub data set id).
The edit is saved as a PEFT adapter folder and reloaded to show that it round-trips.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from hf_edit import EditedModel, EditRequest
from hf_edit.methods import available_methods, resolve_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# (prompt, subject, new target) shown for each default model; cf-facts-gpt2 knows CounterFact case 461 (Nintendo).
DEFAULT_FACTS = {
    "cf-facts-gpt2": ("{} is developed by", "New Nintendo 3DS", "Microsoft"),
    "stories260K": ("{} went to the park with her", "Lily", "dragon"),
    "gpt2": ("{} is located in the city of", "The Eiffel Tower", "Rome"),
}


def default_model() -> str:
    for name in ("cf-facts-gpt2", "stories260K"):
        if (SHARED / "models" / name / "config.json").exists():
            return str(SHARED / "models" / name)
    return "gpt2"


def show(model: EditedModel, prompt: str, title: str, top: int = 5, new_tokens: int = 12) -> None:
    tokenizer = model.tokenizer
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        probs = torch.softmax(model(**inputs).logits[0, -1].float(), dim=-1)
    values, ids = probs.topk(top)
    ranked = ", ".join(f"{tokenizer.decode([int(i)])!r} {p:.3f}" for p, i in zip(values, ids))
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    print(f"{title}\n  top next tokens: {ranked}\n  greedy: {tokenizer.decode(output[0], skip_special_tokens=True)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id or path (default: see above)")
    parser.add_argument("--prompt", help="prompt with {} for the subject")
    parser.add_argument("--subject")
    parser.add_argument("--target", help="the new object")
    parser.add_argument("--stats-data", default="Salesforce/wikitext:wikitext-103-raw-v1",
                        help="texts for the second-moment statistics when WikiText-2 is not in ../shared")
    parser.add_argument("--stats-samples", type=int, default=20_000, help="number of texts for the statistics")
    parser.add_argument("--method", choices=available_methods(), default=None,
                        help="editing method (default: hf_edit's default for the model)")
    args = parser.parse_args()

    model_id = args.model or default_model()
    fact = DEFAULT_FACTS.get(Path(model_id).name, DEFAULT_FACTS["gpt2"])
    request = EditRequest(prompt=args.prompt or fact[0], subject=args.subject or fact[1],
                          target_new=args.target or fact[2])
    wikitext = SHARED / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"
    config = resolve_config(args.method, model_id)  # method=None: the default for this model
    config = dataclasses.replace(config, mom2_dataset=str(wikitext) if wikitext.exists() else args.stats_data,
                                 mom2_n_samples=args.stats_samples)

    print(f"model: {model_id}\nmethod: {config.label}\nedit: {request.filled_prompt!r} -> {request.target_new!r}\n")
    try:
        model = EditedModel.from_pretrained(model_id, method=config)
    except OSError as err:  # no network and no local copy (e.g. a clone without ../shared/data)
        first = (str(err).strip().splitlines() or [""])[0]
        raise SystemExit(f"Could not load the model {model_id!r}: {first}\nPass --model with a local model folder, "
                         "or a Hub id this machine can download (the default is ../shared/data/models/"
                         "cf-facts-gpt2 when that folder exists).") from None
    show(model, request.filled_prompt, "before the edit")
    edits = model.edit(request)
    print()
    for edit in edits:
        weight = model.base_model.get_submodule(edit.module).weight
        change = (edit.factors.B @ edit.factors.A).norm() / weight.detach().float().norm()
        print(f"edited {edit.module}: rank {edit.factors.rank}, ‖ΔW‖ = {change:.1%} of ‖W‖")
    print()
    show(model, request.filled_prompt, "after the edit")
    with model.disable_edits():
        show(model, request.filled_prompt, "with the edit disabled")

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = sum(p.stat().st_size for p in Path(folder).iterdir())
        reloaded = EditedModel.from_pretrained(folder)
        print(f"\nsaved the edit as a {size / 1024:.0f} KiB adapter folder and reloaded it:")
        show(reloaded, request.filled_prompt, "reloaded")


if __name__ == "__main__":
    main()
