"""The ``hf-edit`` command line: edit facts, evaluate edits, show and merge them, manage second-moment statistics.

Examples::

    hf-edit edit --model gpt2-xl --prompt "{} is located in the city of" --subject "The Eiffel Tower" \\
        --target Rome --out eiffel-rome
    hf-edit edit --model gpt2-xl --requests cases.jsonl --method ft+l --out my-edits
    hf-edit show eiffel-rome
    hf-edit attribute --model gpt2 --prompt "{} is located in the city of" --subject "The Eiffel Tower" \\
        --target Paris --top 20 --out scores.safetensors
    hf-edit merge eiffel-rome --out gpt2-xl-eiffel-rome
    hf-edit eval --model gpt2-xl --method rome --data counterfact --n 200 --protocol single --out results.json
    hf-edit sweep --model M --method rome --data counterfact.json --n 100 --grid layers=0,1,2 --grid v_lr=0.5,1 \\
        --stats-data wikitext-2-raw/ --out sweep.json
    hf-edit trace --model M --prompt "{} is located in" --subject "The Eiffel Tower" --plot eiffel.png
    hf-edit trace --model M --data counterfact.json --n 100 --kind mlp --out profile.json
    hf-edit stats compute --model gpt2-xl --layer 17 --data wikipedia --n-samples 100000 --out c17.safetensors
    hf-edit stats push c17.safetensors --repo me/hf-edit-stats --model-id openai-community/gpt2-xl \
        --dataset wikipedia

Errors are reported as one line on stderr (exit status 2), not as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A usage error detected by the command line itself."""


# -- argument helpers ------------------------------------------------------------------------------------------
def _parse_set(values: Sequence[str], config_class: type) -> dict[str, Any]:
    """``KEY=VALUE`` pairs checked against the config's fields: VALUE is read as JSON when it can be (numbers,
    lists, true/false, null), else as a string, and must fit the field's type."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)
    names = [f.name for f in dataclasses.fields(config_class)]
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in names:
            raise CLIError(f"--set {key}: unknown hyperparameter of {config_class.__name__}; known: "
                           f"{', '.join(names)} (see 'hf-edit methods {config_class.method}')")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        ok, coerced = _fits(value, hints.get(key, Any))
        if not ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok, coerced = _fits(raw, hints.get(key, Any))  # e.g. a numeric string for a str field
        if not ok:
            raise CLIError(f"--set {key}={raw}: expected {_describe_type(hints.get(key, Any))}")
        out[key] = coerced
    return out


def _fits(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` (parsed JSON) fits the type ``hint``, and the value converted to it."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, None
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, coerced = _fits(value, arg)
            if ok:
                return True, coerced
        return False, None
    if origin is typing.Literal:
        return value in args, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if isinstance(
            value, (int, float)) else None
    if hint is str:
        return isinstance(value, str), value
    if origin in (tuple, list) and isinstance(value, list):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_fits(v, args[0]) for v in value]
        elif origin is tuple:
            if len(args) != len(value):
                return False, None
            items = [_fits(v, a) for v, a in zip(value, args, strict=True)]
        else:
            items = [_fits(v, args[0] if args else Any) for v in value]
        return all(ok for ok, _ in items), origin(v for _, v in items)
    return isinstance(hint, type) and isinstance(value, hint), value


def _describe_type(hint: Any) -> str:
    import typing

    text = str(hint).replace("typing.", "")
    if hint in (int, float, bool, str):
        text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]
    elif typing.get_origin(hint) is typing.Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return text


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
        from .requests import EditRequest

        # the same rule as in Python: --prompt is EditRequest.prompt, with {} where the subject goes
        requests.append(EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target,
                                    target_true=args.target_true))
    if not requests:
        raise CLIError("no edit requests: give --prompt/--subject/--target or --requests FILE")
    return requests


def _method_name(args: argparse.Namespace, model_id: str) -> str:
    """--method, or what the API's ``method=None`` means for the model (:func:`hf_edit.methods.default_method`)."""
    from .methods import default_method

    return args.method or default_method(model_id)


def _method_config(args: argparse.Namespace, model_id: str):
    """The method's config: the preset for the model (or --config FILE), then --layer/--stats-*/--set overrides."""
    import dataclasses

    from .methods import get_method

    config_class = get_method(_method_name(args, model_id)).config_class
    config = config_class.from_json(args.config) if args.config else config_class.preset(model_id)
    overrides = _parse_set(args.set, config_class)
    if args.layer is not None:
        overrides["layers"] = (args.layer,)
    names = {f.name for f in dataclasses.fields(config_class)}
    for option, flag, name in (("stats_data", "--stats-data", "mom2_dataset"),
                               ("stats_samples", "--stats-samples", "mom2_n_samples")):
        if getattr(args, option) is not None:
            if name not in names:
                raise CLIError(f"{flag} applies to methods that use second-moment statistics; "
                               f"{config_class.method} does not")
            overrides[name] = getattr(args, option)
    return dataclasses.replace(config, **overrides)


def _load_stats(path: str | None, module: str | None = None):
    if path is None:
        return None
    from .stats import SecondMomentStats

    if not Path(path).is_file():
        raise CLIError(f"--stats {path}: no such file")
    if path.endswith(".npz"):
        return SecondMomentStats.from_npz(path, module_name=module)
    return SecondMomentStats.load(path)


def _layer_index(text: str) -> int:
    """A non-negative layer index (negative indices are for the Python API, where they count from the end)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: layers are numbered from 0 (the first decoder layer)")
    return value


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if getattr(args, "device", None):
        kwargs["device_map"] = args.device
    return kwargs


# -- commands --------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from .edited_model import EditedModel
    from .evaluation import CapabilityCheck, evaluate_model, load_eval_data
    from .evaluation.runner import check_protocol_processes, main_process_first
    from .stats import init_distributed

    if args.method == "none" and (args.config or args.layer is not None or args.set):
        raise CLIError("--config, --layer and --set need an editing method, not --method none")
    if args.n is not None and args.n < 1:
        raise CLIError("--n must be positive")
    if args.edit_batch_size != 1 and args.protocol != "sequential":
        raise CLIError("--edit-batch-size needs --protocol sequential (--protocol batch edits every case in one call)")
    if args.capability is not None and args.protocol == "single" and args.method != "none":
        raise CLIError("--capability needs --protocol batch or sequential (the single protocol removes each edit)")
    processes = init_distributed()  # under accelerate launch / torchrun: the cases are shared out
    if args.method != "none":
        check_protocol_processes(args.protocol, processes)
    is_main = processes == 1 or dist.get_rank() == 0
    data = main_process_first(lambda: load_eval_data(args.data, n=args.n, split=args.split, revision=None,
                                                     zsre_target=args.zsre_target), "loading the evaluation data")
    method = "none" if args.method == "none" else _method_config(args, args.model)
    model = EditedModel.from_pretrained(args.model, stats=_load_stats(args.stats), revision=args.revision,
                                        token=args.token, progress=not args.no_progress, base_model=args.base_model,
                                        **_model_kwargs(args))
    _to_process_device(model, processes, args.device)
    capability = None if args.capability is None else CapabilityCheck(args.capability,
                                                                       max_windows=args.capability_windows)
    result = evaluate_model(model, data, method=method, protocol=args.protocol, every=args.every,
                            edit_batch_size=args.edit_batch_size, capability=capability,
                            batch_size=args.batch_size, cases_per_batch=args.cases_per_batch,
                            generation=args.generation, zsre_path=args.zsre_path,
                            progress=not args.no_progress and is_main)
    if not is_main:  # every process holds the gathered result; the main process reports it
        return
    print(result.table())
    if args.out:
        print(f"wrote {result.save(args.out)}")


def _to_process_device(model: Any, processes: int, device: str | None) -> None:
    """Under a launcher with several processes and no --device: move the model to this process's accelerator
    (accelerate's choice; nothing to do on the CPU)."""
    if processes < 2 or device:
        return
    try:
        from accelerate import PartialState
    except ImportError:
        return
    if PartialState().device.type != "cpu":
        model.to(PartialState().device)


def cmd_edit(args: argparse.Namespace) -> None:
    from .edited_model import EditedModel
    from .errors import EditDidNotTakeWarning
    from .requests import as_requests

    if not args.out and not args.push_to_hub:
        raise CLIError("say where the edit goes: --out DIR and/or --push-to-hub REPO")
    requests = as_requests(_requests_from_args(args))  # malformed requests fail before any model is loaded
    config = _method_config(args, args.model)
    stats = _load_stats(args.stats)
    model = EditedModel.from_pretrained(args.model, method=config, stats=stats, revision=args.revision,
                                        token=args.token, progress=not args.no_progress, **_model_kwargs(args))
    with warnings.catch_warnings():  # each edit gets its own line below
        warnings.simplefilter("ignore", EditDidNotTakeWarning)
        result = model.edit(requests, on_error=args.on_error)
    for edit in result:
        print(_edit_line(edit))
    for item in result.skipped:
        print(f"skipped: {item}")
    if not result:
        raise CLIError(f"no edit was applied ({len(result.skipped)} request(s) skipped)")
    if args.out:
        model.save_pretrained(args.out)
        print(f"saved {len(model.edits)} edit(s) to {args.out}")
    if args.push_to_hub:
        url = model.push_to_hub(args.push_to_hub, private=args.private, token=args.token)
        print(f"pushed to {url}")


def _edit_line(edit: Any) -> str:
    """One line per edit: method, module, request, and whether it took."""
    head = f"{edit.method} {edit.module}: {edit.request.filled_prompt!r} -> {edit.request.target_new!r}"
    checks = edit.info.get("checks") or []
    if not checks:
        return head
    first = checks[0]
    verdict = "took" if first["took"] else f"DID NOT TAKE (rank {first['rank_new']}, top {first['top']!r})"
    return f"{head}  P(new)={first['p_new']:.3f} {verdict}"


def cmd_attribute(args: argparse.Namespace) -> None:
    """Integrated-gradients scores of every MLP neuron for a target after a prompt (KN's attribution)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .attribution import coarse_neurons, integrated_gradients

    prompt = args.prompt
    if args.subject is not None:
        if prompt.count("{}") != 1:
            raise CLIError("--subject needs a --prompt with exactly one {} where the subject goes")
        prompt = prompt.replace("{}", args.subject)
    elif "{}" in prompt:
        raise CLIError("the prompt has a {} placeholder: give --subject")
    if args.top < 0:
        raise CLIError("--top must be non-negative")
    model = AutoModelForCausalLM.from_pretrained(args.model, revision=args.revision, token=args.token,
                                                 dtype=torch.float32, **_model_kwargs(args)).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision, token=args.token)
    result = integrated_gradients(model, tokenizer, prompt, args.target, args.layers, args.steps, args.batch_size,
                                  neuron_space=args.neuron_space, rule=args.rule,
                                  target_leading_space=args.leading_space)
    selected = coarse_neurons(result, adaptive_threshold=args.adaptive_threshold)
    tau = args.adaptive_threshold * float(result.scores.max())
    tokens = ", ".join(repr(tokenizer.decode([t])) for t in result.target_ids)
    print(f"prompt: {prompt!r}; target tokens: {tokens}; P(target) = {result.target_prob:.4g} "
          f"(mean over its tokens, at the prompt's last token)")
    print(f"{len(result.layers)} layer(s) x {result.d_ff} neurons, {result.steps} steps, {result.neuron_space}, "
          f"rule {result.rule}")
    rows = [[str(i + 1), str(layer), str(neuron), f"{score:.4g}", "yes" if score > tau else "no"]
            for i, (layer, neuron, score) in enumerate(result.top(args.top))]
    if rows:
        print(_table(rows, ["#", "layer", "neuron", "score", "selected"]))
    per_layer: dict[int, int] = {}
    for layer, _ in selected:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    spread = ", ".join(f"layer {layer}: {count}" for layer, count in sorted(per_layer.items())) or "none"
    print(f"KN's coarse selection: {len(selected)} neuron(s) with score > {args.adaptive_threshold:g} x max = "
          f"{tau:.4g} ({spread})")
    if args.out:
        print(f"wrote {result.save(args.out)}")


def _manifest(source: str, revision: str | None, token: str | None) -> dict[str, Any]:
    from .manifest import MANIFEST_NAME, read_manifest

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
    return read_manifest(folder)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_train_editor(args: argparse.Namespace) -> None:
    """Train a MEND or KE editor network (see hf_edit.editors.train_editor)."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .editors.training import EditorTrainingConfig, train_editor

    values: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    names = {f.name for f in dataclasses.fields(EditorTrainingConfig)}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or key not in names:
            raise CLIError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(names))}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    config = EditorTrainingConfig.from_dict(values)
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision, token=args.token)
    model = AutoModelForCausalLM.from_pretrained(args.model, revision=args.revision, token=args.token,
                                                 dtype=torch.float32)
    result = train_editor(args.method, model, tokenizer, args.data, output_dir=args.out, config=config,
                          locality_data=args.locality, exclude=args.exclude, val_data=args.val_data,
                          n_train=args.n_train, resume_from=args.resume, progress=not args.no_progress)
    data = result.data
    print(f"trained {args.method.upper()} for {result.steps} steps ({result.examples_seen} edits, "
          f"{result.time_s:.0f} s, stopped: {result.stopped}) on {data['n_train']} edits of {data['data_source']} "
          f"({data['n_excluded']} excluded as evaluation cases, {data['n_val']} held back)")
    shown = result.best_metrics or result.metrics
    if shown:
        print("validation: " + ", ".join(f"{k.removeprefix('val/')}={v:.4g}" for k, v in shown.items()
                                          if k.startswith("val/")))
    print(f"saved the editor network to {args.out}")
    if args.push_to_hub:
        url = result.editor.push_to_hub(args.push_to_hub, private=args.private, token=args.token)
        print(f"pushed to {url}")


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


def cmd_methods(args: argparse.Namespace) -> None:
    import dataclasses
    import textwrap
    import typing

    from .methods import available_methods, get_method

    if not args.name:
        rows = [[name, get_method(name).label, get_method(name).config_class.__name__,
                 "joint" if get_method(name).editor_class.joint else "one by one"] for name in available_methods()]
        print(_table(rows, ["method", "label", "config", "requests"]))
        return
    entry = get_method(args.name)
    config_class = entry.config_class
    print(f"{entry.name}: {entry.label} ({config_class.__name__})")
    if entry.description:
        print(textwrap.fill(entry.description, 100))
    docs, hints = config_class.field_docs(), typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        print(f"\n  {f.name} = {default!r}   ({_describe_type(hints.get(f.name, Any))})")
        if docs.get(f.name):
            print(textwrap.indent(textwrap.fill(docs[f.name], 96), "      "))


def cmd_merge(args: argparse.Namespace) -> None:
    from .edited_model import EditedModel

    if not args.out and not args.push_to_hub:
        raise CLIError("say where the merged model goes: --out DIR and/or --push-to-hub REPO")
    _manifest(args.source, args.revision, args.token)  # a clear error before loading any weights
    model = EditedModel.from_pretrained(args.source, revision=args.revision, token=args.token,
                                        base_model=args.base_model)
    tokenizer, n_edits = model.tokenizer, len(model.edits)
    if args.push_to_hub:
        print(f"pushed to {model.push_merged_to_hub(args.push_to_hub, private=args.private, token=args.token)}")
        if not args.out:
            return
        model = EditedModel.from_pretrained(args.source, revision=args.revision, token=args.token,
                                            base_model=args.base_model)
    merged = model.merge_and_unload()
    merged.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged {n_edits} edit(s) into {args.out}")


def cmd_stats_compute(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .architecture import resolve_target
    from .stats import init_distributed, load_or_compute_stats

    group = init_distributed()  # under accelerate launch / torchrun: each process computes a share of the texts
    model = AutoModelForCausalLM.from_pretrained(args.model, revision=args.revision, token=args.token,
                                                 dtype=torch.float32, **_model_kwargs(args)).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision, token=args.token)
    target = resolve_target(model, args.layer, args.module_template)
    stats = load_or_compute_stats(model, tokenizer, target, dataset=args.data, n_samples=args.n_samples,
                                  dtype=args.dtype, max_length=args.max_length, model_revision=args.revision,
                                  progress=not args.no_progress)
    import torch.distributed as dist

    if group is not None and dist.is_initialized() and dist.get_rank() != 0:
        return
    if args.out:
        (stats.to_npz if args.out.endswith(".npz") else stats.save)(args.out)
    where = getattr(stats, "path", None)
    origin = (f"reused the cache file {where}" if getattr(stats, "from_cache", False)
              else f"computed and cached in {where}" if where else "computed")
    print(f"{target.name}: {stats.count} key vectors, width {stats.dim}, {stats.dtype}, "
          f"fingerprint {stats.fingerprint()[:16]}; {origin}" + (f"; written to {args.out}" if args.out else ""))


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


def _grid_from_args(items: Sequence[str], config_class: type) -> dict[str, list[Any]]:
    """``--grid KEY=V1,V2,...`` (or ``KEY=[JSON list]``) → ``{KEY: [values]}``, each value checked against the
    config's field type as ``--set`` checks it (an integer for ``layers`` means that one layer)."""
    from .evaluation.sweep import parse_grid_values

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise CLIError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        if key in grid:
            raise CLIError(f"--grid {key} is given twice")
        values = []
        for value in parse_grid_values(raw):
            if key == "layers" and isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            values.append(_parse_set([f"{key}={json.dumps(value)}"], config_class)[key])
        grid[key] = values
    return grid


def cmd_sweep(args: argparse.Namespace) -> None:
    from .edited_model import EditedModel
    from .evaluation import EvalData, config_grid, load_eval_data, sweep
    from .methods import get_method

    if args.n is not None and args.n < 1:
        raise CLIError("--n must be positive")
    if args.start < 0:
        raise CLIError("--start must be non-negative")
    config_class = get_method(_method_name(args, args.model)).config_class
    grid = _grid_from_args(args.grid, config_class)
    base = _method_config(args, args.model)
    configs = config_grid(base, grid) if grid else {"base": base}
    end = None if args.n is None else args.start + args.n
    data = load_eval_data(args.data, n=end, split=args.split, revision=None)
    if args.start:
        if args.start >= len(data):
            raise CLIError(f"--start {args.start} is past the {len(data)} cases of {args.data}")
        data = EvalData(cases=data.cases[args.start:], data_format=data.data_format, source=data.source,
                        fingerprint=data.fingerprint, n_total=data.n_total)
    model = EditedModel.from_pretrained(args.model, stats=_load_stats(args.stats), revision=args.revision,
                                        token=args.token, progress=not args.no_progress, **_model_kwargs(args))
    result = sweep(model, data, configs, protocol=args.protocol, batch_size=args.batch_size, rank_by=args.rank_by,
                   failed=args.failed, keep_results=False, progress=not args.no_progress, print_table=False)
    print(result.table())
    best = result.best
    print(f"best: {best.name} ({result.rank_by} {best.score(result.rank_by):.2f})")
    if args.out:
        result.to_json(args.out)
        print(f"wrote {args.out}")


def _trace_plot_check(path: str | None) -> None:
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise CLIError("--plot needs matplotlib: pip install 'hf-edit[bench]'") from err


def _trace_grid(result: Any) -> str:
    """The tokens × layers grid of one trace (restored probability of the answer; subject tokens marked *)."""
    import math

    first, end = result.subject_range
    labels = [repr(tok)[1:-1] + ("*" if first <= i < end else "") for i, tok in enumerate(result.tokens)]
    width = max(len(label) for label in labels)
    header = " " * width + "".join(f"{layer:>7}" for layer in range(result.n_layers))
    lines = [header]
    for label, row in zip(labels, result.scores.tolist(), strict=True):
        lines.append(label.ljust(width) + "".join("      -" if math.isnan(v) else f"{v:>7.3f}" for v in row))
    return "\n".join(lines)


def cmd_trace(args: argparse.Namespace) -> None:
    from .architecture import num_layers, unwrap_model
    from .edited_model import EditedModel
    from .tracing import choose_layers, scaled_window, trace, traced_profile

    one = [args.prompt, args.subject]
    if args.data and any(v is not None for v in one):
        raise CLIError("give either --prompt/--subject (one fact) or --data FILE (many facts), not both")
    if not args.data and any(v is None for v in one):
        raise CLIError("give --prompt and --subject (one fact) or --data FILE (many facts)")
    if args.data and args.target is not None:
        raise CLIError("--target applies to one fact (--prompt/--subject); with --data the answer is the true "
                       "object")
    for name in ("n", "samples", "layers", "window"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name} must be positive")
    _trace_plot_check(args.plot)
    if args.prompt is not None:
        from .tracing import _split_prompt

        _split_prompt(args.prompt, args.subject)  # a malformed fact fails before the model is loaded
    records = None
    if args.data:
        records = _read_requests(args.data)
        if not records:
            raise CLIError(f"{args.data} holds no records")
        records = records[: args.n] if args.n is not None else records
    model = EditedModel.from_pretrained(args.model, revision=args.revision, token=args.token,
                                        progress=not args.no_progress, **_model_kwargs(args))
    n_layers = num_layers(unwrap_model(model.model))
    kind = args.kind or ("hidden" if records is None else "mlp")
    window = args.window if args.window is not None else (1 if kind == "hidden" else scaled_window(n_layers))
    common: dict[str, Any] = {"kind": kind, "samples": args.samples, "noise": args.noise, "window": window,
                              "seed": args.seed}
    if records is None:
        result = trace(model.model, model.tokenizer, args.prompt, args.subject, args.target, **common)
        print(f"{result.prompt!r} -> {result.answer!r}: p clean {result.high_score:.4f}, corrupted "
              f"{result.low_score:.4f} (total effect {result.total_effect:.4f}); {kind} restored, window {window}, "
              f"{args.samples} samples, noise {result.noise:.4g}")
        print(_trace_grid(result))
        payload: dict[str, Any] = result.to_dict()
        if args.plot:
            result.plot(args.plot, model_name=Path(str(args.model)).name)
    else:
        if args.layers is not None and args.layers > n_layers:
            raise CLIError(f"--layers {args.layers} is more than the model's {n_layers} layers")
        profile = traced_profile(model.model, model.tokenizer, records, token=args.token_position,
                                 progress=not args.no_progress, refresh=args.refresh, **common)
        print(f"{profile.n} facts traced, {profile.n_skipped} skipped (clean top prediction is not the true "
              f"object); {kind} restored at {profile.token}, window {window}, {args.samples} samples, noise "
              f"{profile.noise:.4g}; total effect {profile.total_effect:.4f}"
              + (" (cached)" if profile.from_cache else ""))
        if profile.n == 0:
            raise CLIError("no fact was kept (the model predicts none of the true objects): nothing to choose from")
        print("layer  indirect effect (mean ± stderr)")
        for layer, (mean, err) in enumerate(zip(profile.mean.tolist(), profile.stderr.tolist(), strict=True)):
            print(f"{layer:>5}  {mean:.4f} ± {err:.4f}")
        payload = profile.to_dict()
        if kind == "mlp" and args.token_position == "subject_last":
            chosen = choose_layers(profile, args.layers or 1)
            payload["choose_layers"] = list(chosen)
            print(f"choose_layers: {list(chosen)}")
        if args.plot:
            profile.plot(args.plot)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, allow_nan=False, default=str) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {args.plot}")


# -- parser ----------------------------------------------------------------------------------------------------
def _add_output_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", metavar="DIR", help=f"write the {what} here")
    parser.add_argument("--push-to-hub", metavar="REPO", help=f"push the {what} to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")


def _add_hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) to load")
    parser.add_argument("--token", help="Hugging Face token (default: the logged-in one)")


def _add_method_options(parser: argparse.ArgumentParser, extra: Sequence[str] = ()) -> None:
    from .methods import DEFAULT_METHOD, NO_PRESET_METHOD, available_methods

    parser.add_argument("--method", choices=[*available_methods(), *extra], default=None,
                        help=f"editing method (see 'hf-edit methods'; default: {DEFAULT_METHOD} for a model it has a "
                             f"preset for, else {NO_PRESET_METHOD})")
    parser.add_argument("--config", metavar="JSON", help="hyperparameter file (hf_edit's or the reference's)")
    parser.add_argument("--layer", type=_layer_index, help="layer to edit, 0-based (default: the preset or the "
                                                           "method's documented default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a hyperparameter, e.g. --set v_num_grad_steps=10 (repeatable)")
    parser.add_argument("--stats", metavar="FILE", help="second-moment statistics (.safetensors or reference .npz)")
    parser.add_argument("--stats-data", help="texts for the second-moment statistics of the methods that use them "
                                             "(Hub id, file or folder)")
    parser.add_argument("--stats-samples", type=int, help="number of texts for the statistics")
    parser.add_argument("--device", help="device or device_map for the model, e.g. cuda, auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-edit", description="Edit facts in causal LMs; each edit is a PEFT "
                                     "adapter.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run 'hf-edit COMMAND --help' for a command's options.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edit = commands.add_parser(
        "edit", help="apply edits to a model and save and/or push them as an adapter",
        description="Apply edit requests with any registered method and save the adapter folder (--out) and/or push it "
                    "to the Hub (--push-to-hub). Requests come from --prompt/--subject/--target and/or --requests "
                    "FILE (JSON list or JSONL of requests, reference dicts or CounterFact records).")
    edit.add_argument("--model", required=True, help="base model id or path")
    edit.add_argument("--prompt", help="prompt with {} where the subject goes, e.g. '{} is located in'")
    edit.add_argument("--subject", help="e.g. 'The Eiffel Tower'")
    edit.add_argument("--target", help="the new object, e.g. 'Rome'")
    edit.add_argument("--target-true", help="the current object (recorded in the manifest and card)")
    edit.add_argument("--requests", metavar="FILE", help="JSON or JSONL file of requests")
    _add_method_options(edit)
    edit.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                      help="skip: apply every request that can be applied and report the others (default: "
                           "nothing is applied if one request fails)")
    edit.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_output_options(edit, "adapter folder")
    _add_hub_options(edit)
    edit.set_defaults(run=cmd_edit)

    evaluation = commands.add_parser(
        "eval", help="edit and score a model on CounterFact or zsRE with the paper's metrics",
        description="Edit each case of a CounterFact or zsRE data set and score it with the ROME paper's metrics "
                    "under a named protocol: 'single' (the reference's: each case edited alone, then restored), "
                    "'batch' (the MEMIT paper's: every case edited in one call, then every case scored) or "
                    "'sequential' (edit calls of --edit-batch-size cases accumulated, then every case scored; "
                    "--every N for retention curves). Prints a summary table and "
                    "writes per-case results as JSON (--out). Under 'accelerate launch -m hf_edit eval ...' or "
                    "torchrun the single protocol's cases are shared out across the processes and the main process "
                    "writes the one result (the batch and sequential protocols need one process).")
    evaluation.add_argument("--model", required=True, help="model id or path (or an hf_edit edit folder)")
    evaluation.add_argument("--base-model", help="with an edit folder as --model: load this base model instead of "
                                                 "the recorded one")
    evaluation.add_argument("--data", required=True,
                            help="'counterfact', 'zsre' (the reference's files), a JSON/JSONL file or a Hub "
                                 "dataset id")
    evaluation.add_argument("--split", default="train", help="split of a Hub dataset")
    evaluation.add_argument("--n", "--num-cases", dest="n", type=int,
                            help="evaluate the first N cases (--num-cases under torchrun / accelerate launch, "
                                 "whose own options --n would abbreviate)")
    evaluation.add_argument("--protocol", choices=["single", "batch", "sequential"], default="single")
    evaluation.add_argument("--every", type=int, help="sequential: also score the cases edited so far every N "
                                                      "edits (a multiple of --edit-batch-size)")
    evaluation.add_argument("--edit-batch-size", type=int, default=1,
                            help="sequential: cases per edit call (AlphaEdit's protocol: e.g. 100)")
    evaluation.add_argument("--capability", metavar="TEXT",
                            help="batch/sequential: text file or folder (e.g. wikitext-2-raw/wiki.test.raw) for the "
                                 "general-capability check: perplexity ratio and next-token KL on unrelated prompts "
                                 "after the edits (and at every --every checkpoint)")
    evaluation.add_argument("--capability-windows", type=int, default=200,
                            help="64-token windows of --capability scored (default 200)")
    evaluation.add_argument("--batch-size", type=int, default=64, help="prompt rows per scoring forward pass")
    evaluation.add_argument("--cases-per-batch", type=int, default=16,
                            help="single protocol: cases whose post-edit prompts are scored together (also the unit "
                                 "of work shared out across processes)")
    evaluation.add_argument("--generation", action="store_true",
                            help="CounterFact: also run the generation test (GE; slow)")
    evaluation.add_argument("--zsre-target", choices=["answers", "alt"], default="answers",
                            help="zsRE: edit in answers[0] (the reference) or alt (EasyEdit)")
    evaluation.add_argument("--zsre-path", choices=["auto", "string", "ids"], default="auto",
                            help="zsRE: build inputs by string concatenation (reference) or at the id level")
    evaluation.add_argument("--out", metavar="FILE", help="write the results (JSON) here")
    evaluation.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_method_options(evaluation, ["none"])
    _add_hub_options(evaluation)
    evaluation.set_defaults(run=cmd_eval)

    attribute = commands.add_parser(
        "attribute", help="score MLP neurons for a fact by integrated gradients (KN's attribution)",
        description="Integrated-gradients attribution of every MLP neuron (KN, Dai et al.; the reference's settings by "
                    "default): the score of neuron (layer, j) for the probability of --target at the prompt's last "
                    "token. Prints the top neurons and KN's coarse selection; writes the score map with --out "
                    "(FILE.safetensors, or a directory).")
    attribute.add_argument("--model", required=True, help="model id or path")
    attribute.add_argument("--prompt", required=True, help="prompt, with {} where --subject goes (or complete)")
    attribute.add_argument("--subject", help="fills the prompt's {}")
    attribute.add_argument("--target", required=True,
                           help="the answer whose probability is attributed (tokenised without a leading space, as "
                                "the reference; see --leading-space)")
    attribute.add_argument("--leading-space", action="store_true", help="prepend a space to --target")
    attribute.add_argument("--layers", type=int, nargs="+", metavar="L", help="layers to attribute (default: all)")
    attribute.add_argument("--steps", type=int, default=20, help="integration steps (default 20)")
    attribute.add_argument("--batch-size", type=int, help="integration points per pass (default: --steps)")
    attribute.add_argument("--neuron-space", choices=["pre_activation", "post_activation"], default="pre_activation",
                           help="integrate along the activation's input (the reference) or the neuron itself")
    attribute.add_argument("--rule", choices=["reference", "paper"], default="reference",
                           help="Riemann rule: linspace(0, 1, m) (reference) or k/m, k = 1..m (paper)")
    attribute.add_argument("--adaptive-threshold", type=float, default=0.2,
                           help="KN's coarse selection: score > this x the maximum (default 0.2)")
    attribute.add_argument("--top", type=int, default=20, help="print this many neurons (default 20)")
    attribute.add_argument("--out", metavar="FILE", help="write the scores (.safetensors file, or a directory)")
    attribute.add_argument("--device", help="device or device_map for the model")
    _add_hub_options(attribute)
    attribute.set_defaults(run=cmd_attribute)

    sweeping = commands.add_parser(
        "sweep", help="score a grid of hyperparameters on CounterFact or zsRE and rank the settings",
        description="Evaluate every combination of the --grid values (on top of the preset, --config and --set) on "
                    "the same cases with the paper's metrics, print the settings ranked by S (ES/PS/NS with "
                    "standard errors, cases behind each number, failed edits, cases/s) and write them as JSON "
                    "(--out). Use --start/--n for a dev split, e.g. --n 450 (dev) then --start 450 (test).")
    sweeping.add_argument("--model", required=True, help="model id or path")
    sweeping.add_argument("--data", required=True, help="'counterfact', 'zsre', a JSON/JSONL file or a Hub id")
    sweeping.add_argument("--split", default="train", help="split of a Hub dataset")
    sweeping.add_argument("--start", type=int, default=0, help="skip the first START cases")
    sweeping.add_argument("--n", type=int, help="evaluate N cases (after --start)")
    sweeping.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                          help="values of one hyperparameter, e.g. --grid layers=0,1,2 --grid v_lr=0.5,1 "
                               "(repeatable; a JSON list such as 'layers=[[0,1],[2]]' also works)")
    sweeping.add_argument("--protocol", choices=["single", "batch", "sequential"], default="single")
    sweeping.add_argument("--rank-by", help="metric to rank by (default S, or 'score' on zsRE)")
    sweeping.add_argument("--failed", choices=["exclude", "unedited"], default="exclude",
                          help="failed edits: left out of the scores (the runner's rule) or scored as the unedited "
                               "model")
    sweeping.add_argument("--batch-size", type=int, default=64, help="prompt rows per scoring forward pass")
    sweeping.add_argument("--out", metavar="FILE", help="write the ranked settings (JSON) here")
    sweeping.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_method_options(sweeping)
    _add_hub_options(sweeping)
    sweeping.set_defaults(run=cmd_sweep)

    tracing = commands.add_parser(
        "trace", help="causal tracing: where the model recalls a fact, and which layer to edit",
        description="One fact (--prompt/--subject): corrupt the subject's embeddings, restore one state at every "
                    "(token, layer) and print the answer's restored probability as a tokens x layers grid "
                    "(--plot writes the heatmap). Many facts (--data FILE): the average indirect effect per layer "
                    "at the subject's last token (mean ± stderr; cached) and, for --kind mlp, the layer(s) "
                    "choose_layers picks for editing.")
    tracing.add_argument("--model", required=True, help="model id or path (or an hf_edit edit folder)")
    tracing.add_argument("--prompt", help="prompt with {} where the subject goes (or containing the subject)")
    tracing.add_argument("--subject", help="the subject whose tokens are corrupted")
    tracing.add_argument("--target", help="one fact: the answer to measure (default: the clean top prediction)")
    tracing.add_argument("--data", metavar="FILE", help="JSON/JSONL records: CounterFact, requests or ROME's "
                                                         "known_1000 (prompt, subject, attribute)")
    tracing.add_argument("--n", type=int, help="trace the first N records of --data")
    tracing.add_argument("--kind", choices=["hidden", "mlp", "attn"],
                         help="restored state (default: hidden for one fact, mlp for --data)")
    tracing.add_argument("--samples", type=int, default=10, help="noise draws per fact")
    tracing.add_argument("--window", type=int, help="layers restored at once for mlp/attn (default: 10 scaled to "
                                                    "the model's depth, as suggest_layers does)")
    tracing.add_argument("--noise", type=float, help="noise scale (default: 3 x the subjects' embedding std)")
    tracing.add_argument("--seed", type=int, default=0, help="noise seed (1: the reference's draws)")
    tracing.add_argument("--token-position", default="subject_last",
                         choices=["subject_last", "subject_first", "first_after_subject", "last"],
                         help="--data: the token restored")
    tracing.add_argument("--layers", type=int, help="--data --kind mlp: number of contiguous layers to choose "
                                                    "(default 1, ROME)")
    tracing.add_argument("--refresh", action="store_true", help="--data: recompute instead of reading the cache")
    tracing.add_argument("--plot", metavar="PNG", help="write the heatmap (one fact) or profile (many) here")
    tracing.add_argument("--out", metavar="JSON", help="write the numbers here")
    tracing.add_argument("--device", help="device or device_map for the model")
    tracing.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_hub_options(tracing)
    tracing.set_defaults(run=cmd_trace)

    trainer = commands.add_parser(
        "train-editor", help="train a MEND or KE editor network for a model",
        description="Train the editor network of MEND or KE for one base model on CounterFact/zsRE edits, with a "
                    "locality term on plain text (e.g. WikiText-2), and save it (EditorNetwork format) to --out. "
                    "Cases of --exclude (your evaluation data) are never trained on. Runs on accelerate: plain, "
                    "or under 'accelerate launch' / torchrun for several processes. Edit with "
                    "'hf-edit edit --method mend --set editor=DIR'.")
    trainer.add_argument("--method", choices=["mend", "ke"], required=True)
    trainer.add_argument("--model", required=True, help="base model id or path")
    trainer.add_argument("--data", required=True, help="training edits: CounterFact/zsRE JSON file or Hub id")
    trainer.add_argument("--locality", required=True, help="text file or folder for the locality term")
    trainer.add_argument("--exclude", help="evaluation data whose cases are excluded from training")
    trainer.add_argument("--val-data", help="validation edits (default: held back from --data)")
    trainer.add_argument("--n-train", type=int, help="use the first N records of --data")
    trainer.add_argument("--out", required=True, metavar="DIR", help="output folder (network, metrics, checkpoints)")
    trainer.add_argument("--config", metavar="FILE", help="JSON file of training settings")
    trainer.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a training setting, e.g. --set max_steps=2000 --set lr=1e-4 "
                              "--set 'network={\"rank\": 512}' (repeatable)")
    trainer.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                         help="resume from the newest checkpoint in --out, or from CHECKPOINT")
    trainer.add_argument("--push-to-hub", metavar="REPO", help="also upload the network to this Hub repo")
    trainer.add_argument("--private", action="store_true", help="create the Hub repo as private")
    trainer.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_hub_options(trainer)
    trainer.set_defaults(run=cmd_train_editor)

    methods = commands.add_parser("methods", help="list the editing methods, or one method's hyperparameters",
                                  description="Without NAME: every registered method (built-in and plugins). With "
                                              "NAME: its hyperparameters with their defaults and documentation, "
                                              "for --set KEY=VALUE.")
    methods.add_argument("name", nargs="?", help="a method name")
    methods.set_defaults(run=cmd_methods)

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
    merge.add_argument("--base-model", help="load this base model instead of the one recorded in the edit folder")
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
    compute.add_argument("--layer", type=_layer_index, required=True, help="decoder layer (0-based)")
    compute.add_argument("--module-template", help="explicit module path with {} for the layer")
    compute.add_argument("--data", default="wikipedia", help="Hub dataset id[:config], text file or folder")
    compute.add_argument("--n-samples", type=int, default=100_000, help="number of texts")
    compute.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    compute.add_argument("--max-length", type=int, help="truncate texts to this many tokens")
    compute.add_argument("--device", help="device or device_map for the model")
    compute.add_argument("--out", metavar="FILE", help="also write the statistics here")
    compute.add_argument("--no-progress", action="store_true", help="no progress bar")
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
