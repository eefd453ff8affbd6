"""The ``hf-edit`` command line: edit facts, evaluate edits, show and merge them, manage second-moment statistics.

Examples::

    hf-edit edit --model gpt2-xl --prompt "{} is located in the city of" --subject "The Eiffel Tower" \\
        --target Rome --out eiffel-rome
    hf-edit edit --model gpt2-xl --requests cases.jsonl --method ft+l --out my-edits
    hf-edit show eiffel-rome
    hf-edit merge eiffel-rome --out gpt2-xl-eiffel-rome
    hf-edit eval --model gpt2-xl --method rome --data counterfact --n 200 --protocol single --out results.json
    hf-edit stats compute --model gpt2-xl --layer 17 --data wikipedia --n-samples 100000 --out c17.safetensors
    hf-edit stats push c17.safetensors --repo me/hf-edit-stats --model-id openai-community/gpt2-xl \
        --dataset wikipedia

Errors are reported as one line on stderr (exit status 2), not as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A usage error detected by the command line itself."""


# -- argument helpers ------------------------------------------------------------------------------------------
def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is parsed as JSON when it can be (numbers, lists, true/false), else a string."""
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _read_requests(path: str) -> list[Any]:
    """Requests from a JSON file (one object or a list) or a JSONL file (one object per line)."""
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


def _requests_from_args(args: argparse.Namespace) -> list[Any]:
    requests: list[Any] = _read_requests(args.requests) if args.requests else []
    inline = (args.prompt, args.subject, args.target)
    if any(v is not None for v in inline):
        if any(v is None for v in inline):
            raise CLIError("--prompt, --subject and --target go together")
        requests.append({"prompt": args.prompt, "subject": args.subject, "target_new": args.target,
                         "target_true": args.target_true})
    if not requests:
        raise CLIError("no edit requests: give --prompt/--subject/--target or --requests FILE")
    return requests


def _method_config(args: argparse.Namespace, model_id: str):
    """The method's config: the preset for the model (or --config FILE), then --layer/--stats-*/--set overrides."""
    from .methods.ft import FTConfig, ft_preset_for
    from .methods.rome import ROMEConfig, rome_preset_for

    is_rome = args.method == "rome"
    if args.config:
        config = (ROMEConfig if is_rome else FTConfig).from_json(args.config)
    else:
        constrained = args.method == "ft+l"
        config = rome_preset_for(model_id) if is_rome else ft_preset_for(model_id, constrained=constrained)
    overrides = _parse_set(args.set)
    if args.layer is not None:
        overrides["layers"] = (args.layer,)
    if is_rome:
        for option, field in (("stats_data", "mom2_dataset"), ("stats_samples", "mom2_n_samples"),
                              ("key_mode", "key_mode")):
            if getattr(args, option) is not None:
                overrides[field] = getattr(args, option)
    elif any(getattr(args, o) is not None for o in ("stats_data", "stats_samples", "key_mode")):
        raise CLIError("--stats-data, --stats-samples and --key-mode apply to --method rome only")
    try:
        return replace(config, **overrides)
    except TypeError as err:
        raise CLIError(f"unknown hyperparameter in --set: {err}") from err


def _load_stats(path: str | None, module: str | None = None):
    if path is None:
        return None
    from .stats import SecondMomentStats

    if path.endswith(".npz"):
        return SecondMomentStats.from_npz(path, module_name=module)
    return SecondMomentStats.load(path)


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if getattr(args, "device", None):
        kwargs["device_map"] = args.device
    return kwargs


# -- commands --------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> None:
    from .edited_model import EditedModel
    from .evaluation import evaluate_model, load_eval_data

    if args.method == "none" and (args.config or args.layer is not None or args.set):
        raise CLIError("--config, --layer and --set need an editing method, not --method none")
    if args.n is not None and args.n < 1:
        raise CLIError("--n must be positive")
    data = load_eval_data(args.data, n=args.n, split=args.split, revision=None, zsre_target=args.zsre_target)
    method = "none" if args.method == "none" else _method_config(args, args.model)
    model = EditedModel.from_pretrained(args.model, stats=_load_stats(args.stats), revision=args.revision,
                                        token=args.token, progress=not args.no_progress, **_model_kwargs(args))
    result = evaluate_model(model, data, method=method, protocol=args.protocol, every=args.every,
                            batch_size=args.batch_size, generation=args.generation, zsre_path=args.zsre_path,
                            progress=not args.no_progress)
    print(result.table())
    if args.out:
        print(f"wrote {result.save(args.out)}")


def cmd_edit(args: argparse.Namespace) -> None:
    from .edited_model import EditedModel
    from .requests import as_requests

    if not args.out and not args.push_to_hub:
        raise CLIError("say where the edit goes: --out DIR and/or --push-to-hub REPO")
    requests = as_requests(_requests_from_args(args))  # malformed requests fail before any model is loaded
    config = _method_config(args, args.model)
    model = EditedModel.from_pretrained(args.model, method=config, stats=_load_stats(args.stats),
                                        revision=args.revision, token=args.token, **_model_kwargs(args))
    edits = model.edit(requests)
    for edit in edits:
        print(f"{edit.method} {edit.module}: {edit.request.filled_prompt!r} -> {edit.request.target_new!r}")
    if args.out:
        model.save_pretrained(args.out)
        print(f"saved {len(model.edits)} edit(s) to {args.out}")
    if args.push_to_hub:
        url = model.push_to_hub(args.push_to_hub, private=args.private, token=args.token)
        print(f"pushed to {url}")


def _manifest(source: str, revision: str | None, token: str | None) -> dict[str, Any]:
    from .edited_model import MANIFEST_NAME, _read_manifest

    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import hf_hub_download

        try:
            folder = Path(hf_hub_download(source, MANIFEST_NAME, revision=revision, token=token)).parent
        except Exception as err:  # not a local folder and not a Hub repo with edits
            raise CLIError(f"{source} is neither a local edit folder nor a Hub repo with {MANIFEST_NAME} "
                           f"({type(err).__name__})") from err
    elif not (folder / MANIFEST_NAME).is_file():
        raise CLIError(f"{source} holds no {MANIFEST_NAME}: it is not an hf_edit edit folder")
    return _read_manifest(folder)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> None:
    manifest = _manifest(args.source, args.revision, args.token)
    rows = []
    for i, edit in enumerate(manifest.get("edits", [])):
        for request in edit["requests"]:
            prompt = request["prompt"].replace("{}", request["subject"])
            change = f"{request.get('target_true') or '?'} -> {request['target_new']}"
            rows.append([str(i), edit["method"], edit.get("adapter", "default"), str(edit.get("layer")),
                         request["subject"], prompt, change])
    print(f"base model: {manifest.get('base_model')} (revision {manifest.get('base_model_revision') or 'main'}); "
          f"hf_edit {manifest.get('hf_edit_version')}")
    print(_table(rows, ["#", "method", "adapter", "layer", "subject", "prompt", "old -> new"]))


def cmd_merge(args: argparse.Namespace) -> None:
    from .edited_model import EditedModel

    if not args.out and not args.push_to_hub:
        raise CLIError("say where the merged model goes: --out DIR and/or --push-to-hub REPO")
    _manifest(args.source, args.revision, args.token)  # a clear error before loading any weights
    model = EditedModel.from_pretrained(args.source, revision=args.revision, token=args.token)
    tokenizer, n_edits = model.tokenizer, len(model.edits)
    if args.push_to_hub:
        print(f"pushed to {model.push_merged_to_hub(args.push_to_hub, private=args.private, token=args.token)}")
        if not args.out:
            return
        model = EditedModel.from_pretrained(args.source, revision=args.revision, token=args.token)
    merged = model.merge_and_unload()
    merged.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged {n_edits} edit(s) into {args.out}")


def cmd_stats_compute(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .architecture import resolve_target
    from .stats import load_or_compute_stats

    model = AutoModelForCausalLM.from_pretrained(args.model, revision=args.revision, token=args.token,
                                                 dtype=torch.float32, **_model_kwargs(args)).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision, token=args.token)
    target = resolve_target(model, args.layer, args.module_template)
    stats = load_or_compute_stats(model, tokenizer, target, dataset=args.data, n_samples=args.n_samples,
                                  dtype=args.dtype, max_length=args.max_length, model_revision=args.revision)
    if args.out:
        (stats.to_npz if args.out.endswith(".npz") else stats.save)(args.out)
    print(f"{target.name}: {stats.count} key vectors, width {stats.dim}, {stats.dtype}, "
          f"fingerprint {stats.fingerprint()[:16]}" + (f", written to {args.out}" if args.out else ""))


def _stats_location(args: argparse.Namespace) -> dict[str, Any]:
    return {"model_id": args.model_id, "model_revision": args.model_revision, "dataset": args.dataset}


def cmd_stats_push(args: argparse.Namespace) -> None:
    from .hub import push_stats

    stats = _load_stats(args.file)
    url = push_stats(stats, args.repo, **_stats_location(args), token=args.token, private=args.private or None)
    print(f"pushed {stats.metadata.get('module', 'statistics')} to {url}")


def cmd_stats_pull(args: argparse.Namespace) -> None:
    from .hub import pull_stats

    stats = pull_stats(args.repo, **_stats_location(args), module=args.module, n_samples=args.n_samples,
                       dtype=args.dtype, token=args.token, revision=args.revision)
    (stats.to_npz if args.out.endswith(".npz") else stats.save)(args.out)
    print(f"{args.module}: {stats.count} key vectors, verified, written to {args.out}")


def cmd_stats_import_npz(args: argparse.Namespace) -> None:
    from .hub import import_npz_to_hub

    url = import_npz_to_hub(args.file, args.repo, **_stats_location(args), module=args.module,
                            n_samples=args.n_samples, dtype=args.dtype, token=args.token,
                            private=args.private or None)
    print(f"imported {args.file} to {url}")


# -- parser ----------------------------------------------------------------------------------------------------
def _add_output_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", metavar="DIR", help=f"write the {what} here")
    parser.add_argument("--push-to-hub", metavar="REPO", help=f"push the {what} to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")


def _add_hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) to load")
    parser.add_argument("--token", help="Hugging Face token (default: the logged-in one)")


def _add_method_options(parser: argparse.ArgumentParser, methods: list[str]) -> None:
    parser.add_argument("--method", choices=methods, default="rome")
    parser.add_argument("--config", metavar="JSON", help="hyperparameter file (hf_edit's or the reference's)")
    parser.add_argument("--layer", type=int, help="layer to edit (default: the preset or documented default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a hyperparameter, e.g. --set v_num_grad_steps=10 (repeatable)")
    parser.add_argument("--stats", metavar="FILE", help="second-moment statistics (.safetensors or reference .npz)")
    parser.add_argument("--stats-data", help="ROME: texts for the statistics (Hub id, file or folder)")
    parser.add_argument("--stats-samples", type=int, help="ROME: number of texts for the statistics")
    parser.add_argument("--key-mode", choices=["original", "consistent"], help="ROME: key mode")
    parser.add_argument("--device", help="device or device_map for the model, e.g. cuda, auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-edit", description="Edit facts in causal LMs; each edit is a PEFT "
                                     "adapter.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run 'hf-edit COMMAND --help' for a command's options.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edit = commands.add_parser(
        "edit", help="apply edits to a model and save and/or push them as an adapter",
        description="Apply edit requests with ROME, FT or FT+L and save the adapter folder (--out) and/or push it "
                    "to the Hub (--push-to-hub). Requests come from --prompt/--subject/--target and/or --requests "
                    "FILE (JSON list or JSONL of requests, reference dicts or CounterFact records).")
    edit.add_argument("--model", required=True, help="base model id or path")
    edit.add_argument("--prompt", help="prompt with {} where the subject goes, e.g. '{} is located in'")
    edit.add_argument("--subject", help="e.g. 'The Eiffel Tower'")
    edit.add_argument("--target", help="the new object, e.g. 'Rome'")
    edit.add_argument("--target-true", help="the current object (recorded in the manifest and card)")
    edit.add_argument("--requests", metavar="FILE", help="JSON or JSONL file of requests")
    _add_method_options(edit, ["rome", "ft", "ft+l"])
    _add_output_options(edit, "adapter folder")
    _add_hub_options(edit)
    edit.set_defaults(run=cmd_edit)

    evaluation = commands.add_parser(
        "eval", help="edit and score a model on CounterFact or zsRE with the paper's metrics",
        description="Edit each case of a CounterFact or zsRE data set and score it with the ROME paper's metrics "
                    "under a named protocol: 'single' (the reference's: each case edited alone, then restored) or "
                    "'sequential' (all edits accumulated, then every case scored). Prints a summary table and "
                    "writes per-case results as JSON (--out).")
    evaluation.add_argument("--model", required=True, help="model id or path (or an hf_edit edit folder)")
    evaluation.add_argument("--data", required=True,
                            help="'counterfact', 'zsre' (the reference's files), a JSON/JSONL file or a Hub "
                                 "dataset id")
    evaluation.add_argument("--split", default="train", help="split of a Hub dataset")
    evaluation.add_argument("--n", type=int, help="evaluate the first N cases")
    evaluation.add_argument("--protocol", choices=["single", "sequential"], default="single")
    evaluation.add_argument("--every", type=int, help="sequential: also score the cases edited so far every N "
                                                      "edits")
    evaluation.add_argument("--batch-size", type=int, default=64, help="prompt rows per scoring forward pass")
    evaluation.add_argument("--generation", action="store_true",
                            help="CounterFact: also run the generation test (GE; slow)")
    evaluation.add_argument("--zsre-target", choices=["answers", "alt"], default="answers",
                            help="zsRE: edit in answers[0] (the reference) or alt (EasyEdit)")
    evaluation.add_argument("--zsre-path", choices=["auto", "string", "ids"], default="auto",
                            help="zsRE: build inputs by string concatenation (reference) or at the id level")
    evaluation.add_argument("--out", metavar="FILE", help="write the results (JSON) here")
    evaluation.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_method_options(evaluation, ["rome", "ft", "ft+l", "none"])
    _add_hub_options(evaluation)
    evaluation.set_defaults(run=cmd_eval)

    show = commands.add_parser("show", help="list the edits in an adapter folder or Hub repo",
                               description="Print the edits recorded in an hf_edit folder or Hub repo as a table "
                                           "(no model is loaded).")
    show.add_argument("source", help="edit folder or Hub repo id")
    _add_hub_options(show)
    show.set_defaults(run=cmd_show)

    merge = commands.add_parser("merge", help="write a full model with the edits merged into its weights",
                                description="Load the base model and the edits of SOURCE, merge them into the "
                                            "weights (bitwise W + BA) and save a plain transformers checkpoint "
                                            "with its tokenizer (--out) and/or push it (--push-to-hub).")
    merge.add_argument("source", help="edit folder or Hub repo id")
    _add_output_options(merge, "merged model")
    _add_hub_options(merge)
    merge.set_defaults(run=cmd_merge)

    stats = commands.add_parser("stats", help="compute, push or pull second-moment statistics",
                                description="Second-moment statistics C = E[kk^T] of an MLP projection's input, "
                                            "which ROME needs.")
    stats_commands = stats.add_subparsers(dest="stats_command", required=True, metavar="ACTION")
    compute = stats_commands.add_parser("compute", help="compute statistics (and cache them)",
                                        description="Compute the statistics of one layer on the base model, "
                                                    "cache them under $HF_EDIT_CACHE and optionally write them "
                                                    "to a file (.safetensors, or .npz in the reference's format).")
    compute.add_argument("--model", required=True, help="model id or path")
    compute.add_argument("--layer", type=int, required=True, help="decoder layer")
    compute.add_argument("--module-template", help="explicit module path with {} for the layer")
    compute.add_argument("--data", default="wikipedia", help="Hub dataset id[:config], text file or folder")
    compute.add_argument("--n-samples", type=int, default=100_000, help="number of texts")
    compute.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    compute.add_argument("--max-length", type=int, help="truncate texts to this many tokens")
    compute.add_argument("--device", help="device or device_map for the model")
    compute.add_argument("--out", metavar="FILE", help="also write the statistics here")
    _add_hub_options(compute)
    compute.set_defaults(run=cmd_stats_compute)

    def location(sub: argparse.ArgumentParser, full: bool) -> None:
        sub.add_argument("--repo", required=True, help="dataset repo holding statistics, e.g. me/hf-edit-stats")
        sub.add_argument("--model-id", required=True, help="Hub id of the model the statistics are for")
        sub.add_argument("--model-revision", help="its revision (commit); omitted means 'local'")
        sub.add_argument("--dataset", required=True, help="the data set the statistics were computed on")
        if full:
            sub.add_argument("--module", required=True, help="module name, e.g. transformer.h.17.mlp.c_proj")
            sub.add_argument("--n-samples", type=int, required=True, help="number of texts")
            sub.add_argument("--dtype", choices=["float32", "float64"], default="float64")
        sub.add_argument("--token", help="Hugging Face token (default: the logged-in one)")

    scheme = ("Files live at stats/{model id, / -> --}/{revision or local}/{module}/"
              "{dataset}__n{n_samples}__{dtype}.safetensors in a dataset repo.")
    push = stats_commands.add_parser("push", help="upload statistics to a dataset repo",
                                     description="Upload a statistics file (.safetensors from 'stats compute', or "
                                                 "a reference .npz) to a Hub dataset repo. " + scheme)
    push.add_argument("file", help="statistics file")
    location(push, full=False)
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.set_defaults(run=cmd_stats_push)

    pull = stats_commands.add_parser("pull", help="download and verify statistics from a dataset repo",
                                     description="Download statistics by (model, revision, module, data set, "
                                                 "sample count, dtype), verify them and write them to --out. "
                                                 + scheme)
    location(pull, full=True)
    pull.add_argument("--revision", help="revision of the statistics repo")
    pull.add_argument("--out", required=True, metavar="FILE", help="write the statistics here")
    pull.set_defaults(run=cmd_stats_pull)

    npz = stats_commands.add_parser("import-npz", help="import the reference's .npz statistics into a repo",
                                    description="Convert a statistics file published by the reference "
                                                "implementation (keys mom2.mom2, mom2.count) and upload it. "
                                                + scheme)
    npz.add_argument("file", help="reference .npz file")
    location(npz, full=True)
    npz.add_argument("--private", action="store_true", help="create the repo as private")
    npz.set_defaults(run=cmd_stats_import_npz)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-edit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import HfEditError

    try:
        args.run(args)
    except (CLIError, HfEditError, ValueError, OSError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"hf-edit: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
