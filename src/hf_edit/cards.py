"""Model cards of edit folders and of merged checkpoints, rendered from an edit manifest.

:func:`render_card` renders the card of an edit folder (``model_cards/edit_adapter.md``: YAML with ``base_model``,
``library_name: peft``, ``base_model_relation: adapter``, ``tags``, ``pipeline_tag``; a table of the edited facts, the
methods and their hyperparameters, how to load the edit with hf_edit and with plain peft/transformers, evaluation
results, limitations).  :func:`render_merged_card` renders the card of a full checkpoint with the edits merged in
(``model_cards/merged_model.md``).  Each method's label and description come from its config class (the registry);
a method whose plugin is not installed is shown by its name.

huggingface_hub is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, EditFolderError, UnknownMethodError
from .manifest import ManifestSource, read_manifest
from .version import __version__

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

__all__ = ["load_template", "render_card", "render_merged_card"]

_PLACEHOLDER_REPO = "<path-or-repo-id>"
_MAX_CELL = 160


def _method_label(method: str) -> tuple[str, str]:
    """(label, description) of a registered method; the bare name for an unknown one."""
    from .methods import get_method

    try:
        entry = get_method(method)
    except UnknownMethodError:
        return method or "?", ""
    return entry.label, entry.description


def load_template(name: str) -> str:
    """The text of a card template (``"edit_adapter.md"`` or ``"merged_model.md"``).

    Read from the installed package ``hf_edit.model_cards``; from a source checkout whose packaging does not map
    that package yet, from the repository's top-level ``model_cards/`` folder.
    """
    try:
        return importlib.resources.files("hf_edit.model_cards").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    path = Path(__file__).resolve().parents[2] / "model_cards" / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise FileNotFoundError(f"Model card template {name!r} is missing from the hf_edit installation "
                                f"(looked in hf_edit.model_cards and {path.parent}).") from err


def render_card(source: ManifestSource,
                eval_results: Mapping[str, float] | None = None, *, eval_dataset: str | None = None,
                repo_id: str | None = None, base_model_id: str | None = None,
                model_name: str | None = None) -> ModelCard:
    """The model card of an edit adapter (template ``model_cards/edit_adapter.md``).

    Args:
        source: an ``EditedModel``, its manifest (dict), or an edit folder / ``hf_edit.json`` path.
        eval_results: metric name → value, shown as a table.
        eval_dataset: the data set the metrics were measured on (a Hub dataset id); with ``eval_results`` it
            also produces the card's ``model-index``.
        repo_id: where the card will live (used in the loading instructions).
        base_model_id: the Hub id of the base model, when the edit records a local path (metadata only accepts
            Hub ids; a local path is left out of ``base_model`` and only shown in the text).
        model_name: the card's title and ``model_name``.
    """
    manifest = read_manifest(source)
    context = _card_context(manifest, eval_results, eval_dataset, repo_id, base_model_id, model_name)
    adapters = context["adapters"]
    data = _card_data(context, relation="adapter", library_name="peft", eval_results=eval_results,
                      eval_dataset=eval_dataset, extra_tags=["lora"])
    return _from_template("edit_adapter.md", data, context | {
        "extra_adapters": adapters[1:], "adapters_literal": json.dumps(adapters)})


def render_merged_card(source: ManifestSource,
                       eval_results: Mapping[str, float] | None = None, *, eval_dataset: str | None = None,
                       repo_id: str | None = None, base_model_id: str | None = None,
                       model_name: str | None = None, tokenizer_in_repo: bool = False, dtype: str | None = None,
                       tags: list[str] | None = None) -> ModelCard:
    """The model card of a full checkpoint with the edits merged into its weights (``merged_model.md``).

    Its metadata says ``base_model_relation: finetune``: of the Hub's relations (adapter, merge, quantized,
    finetune), "merge" means combining several models and "adapter"/"quantized" do not apply; a single base model
    whose weights were changed by training-like updates is a fine-tune, so the Hub lists it under the base model's
    fine-tunes.  The body says that it is an edited model and lists every edit.

    Args:
        tokenizer_in_repo: the repo holds the tokenizer too (else the card loads it from the base model).
        dtype: the checkpoint's weight dtype (shown in the limitations).
        tags: more metadata tags.
        Others: as :func:`render_card`.
    """
    manifest = read_manifest(source)
    context = _card_context(manifest, eval_results, eval_dataset, repo_id, base_model_id, model_name)
    modules = sorted({e["module"] for e in manifest.get("edits", [])})
    data = _card_data(context, relation="finetune", library_name="transformers", eval_results=eval_results,
                      eval_dataset=eval_dataset, extra_tags=["merged-edits", *(tags or [])])
    tokenizer_repo = context["repo"] if tokenizer_in_repo else context["base"]
    return _from_template("merged_model.md", data, context | {
        "modules": ", ".join(f"`{m}`" for m in modules), "n_modules": len(modules),
        "tokenizer_repo": tokenizer_repo, "dtype": dtype or "float32"})


def _from_template(name: str, data: Any, context: dict[str, Any]) -> ModelCard:
    from huggingface_hub import ModelCard

    return ModelCard.from_template(data, template_str=load_template(name), **context)


def _hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id (and is not an existing local path), else ``None``."""
    if not name or os.path.exists(name):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _cell(value: Any, code: bool = False) -> str:
    """A Markdown table cell: one line, ``|`` escaped, long values shortened."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split()) if not code else text.replace("\n", "\\n")
    if len(text) > _MAX_CELL:
        text = text[:_MAX_CELL - 1] + "…"
    if code and "`" not in text:
        text = f"`{text}`"
    return text.replace("|", "\\|")


def _card_context(manifest: Mapping[str, Any], eval_results: Mapping[str, float] | None,
                  eval_dataset: str | None, repo_id: str | None, base_model_id: str | None,
                  model_name: str | None) -> dict[str, Any]:
    entries = list(manifest.get("edits", []))
    if not entries:
        raise EditFolderError("The manifest lists no edits; there is nothing to describe.")
    base = str(base_model_id or manifest.get("base_model") or "")
    hub_base = _hub_model_id(base_model_id) or _hub_model_id(manifest.get("base_model"))
    if base_model_id and not hub_base:
        raise ConfigError(f"base_model_id={base_model_id!r} is not a Hub model id.")
    if hub_base:
        from huggingface_hub import constants

        base_link = f"[`{hub_base}`]({constants.ENDPOINT}/{hub_base})"
    else:
        base_link = f"`{base}`" if base else "an unnamed base model"
    facts: dict[tuple[int, str], dict[str, Any]] = {}
    methods: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in entries:
        method = str(entry.get("method", ""))
        label, description = _method_label(method)
        for request in entry.get("requests", []):
            key = (int(entry.get("group", 0)), json.dumps(request, sort_keys=True))
            row = facts.setdefault(key, {"request": request, "method": label, "layers": set()})
            row["layers"].add(entry.get("layer") if entry.get("layer") is not None else entry.get("module"))
        config = entry.get("config", {})
        m = methods.setdefault((method, json.dumps(config, sort_keys=True)), {
            "label": label, "method": method, "description": description,
            "n_edits": 0, "adapters": [], "rows": [(_cell(k), _cell(v, code=True)) for k, v in sorted(config.items())
                                                  if k != "method"]})
        m["n_edits"] += 1
        if f"`{entry.get('adapter', 'default')}`" not in m["adapters"]:
            m["adapters"].append(f"`{entry.get('adapter', 'default')}`")
    fact_rows = [_fact_row(f) for f in facts.values()]
    labels = list(dict.fromkeys(m["label"] for m in methods.values()))
    base_name = (hub_base or base).rstrip("/").split("/")[-1] or "model"
    return {
        "title": model_name or f"Knowledge edits of {base_name}",
        "model_name": model_name or (repo_id.split("/")[-1] if repo_id else None),
        "base": base or "<base-model>", "hub_base": hub_base, "base_link": base_link,
        "repo": repo_id or _PLACEHOLDER_REPO, "facts": fact_rows, "n_facts": len(fact_rows),
        "methods": list(methods.values()), "method_names": ", ".join(labels),
        "method_tags": list(dict.fromkeys(m["method"] for m in methods.values())),
        "adapters": list(manifest.get("adapters") or dict.fromkeys(e.get("adapter", "default") for e in entries)),
        "eval_rows": [(_cell(k), _cell(_format_metric(v))) for k, v in (eval_results or {}).items()],
        "eval_dataset": eval_dataset, "hf_edit_version": manifest.get("hf_edit_version", __version__),
    }


def _fact_row(fact: dict[str, Any]) -> dict[str, str]:
    request = fact["request"]
    subject = str(request.get("subject", ""))
    prompt = str(request.get("prompt", "")).replace("{}", subject, 1)
    layers = sorted(fact["layers"], key=lambda x: (isinstance(x, str), x))
    return {"subject": _cell(subject), "prompt": _cell(prompt), "old": _cell(request.get("target_true") or "?"),
            "new": _cell(request.get("target_new", "")), "method": fact["method"],
            "layers": _cell(", ".join(str(x) for x in layers))}


def _format_metric(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _card_data(context: dict[str, Any], *, relation: str, library_name: str,
               eval_results: Mapping[str, float] | None, eval_dataset: str | None, extra_tags: list[str]) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    results = None
    if eval_results and eval_dataset:
        results = [EvalResult(task_type="text-generation", dataset_type=eval_dataset, dataset_name=eval_dataset,
                              metric_type=re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "metric",
                              metric_name=str(name), metric_value=value)
                   for name, value in eval_results.items()]
    tags = list(dict.fromkeys(["knowledge-editing", "hf_edit", *context["method_tags"], *extra_tags]))
    model_name = context["model_name"] or (f"{context['title']}" if results else None)
    relation = relation if context["hub_base"] else None  # a relation needs a base_model
    return ModelCardData(base_model=context["hub_base"], base_model_relation=relation, library_name=library_name,
                         tags=tags, pipeline_tag="text-generation", model_name=model_name, eval_results=results)
