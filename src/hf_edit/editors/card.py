"""The model card of an editor network (template ``model_cards/editor_network.md``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..cards import load_template
from ..version import __version__

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

__all__ = ["render_editor_card"]

_KINDS = {
    "mend": ("MEND", "MENDConfig", "the number of tokens that contribute to the gradient",
             "MEND (Mitchell et al., 2022) learns a transform of the rank-one gradient factors (u_t, δ_t) of each "
             "edited matrix and a step size per matrix: ΔW = η Σ_t δ̃_t ũ_tᵀ."),
    "ke": ("KE", "KEConfig", "the number of contributing tokens + 1",
           "KE (De Cao et al., 2021, as re-implemented by Mitchell et al.) encodes the edit sentence with a "
           "bidirectional LSTM and predicts, per matrix, a mask of the gradient and an offset: "
           "ΔW = s (Σ_t (β⊙g_t)(α⊙x_t)ᵀ + δγᵀ)."),
}


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return (text[:157] + "…" if len(text) > 160 else text).replace("|", "\\|")


def _hub_id(name: str | None) -> str | None:
    if not name or os.path.exists(name):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def render_editor_card(description: Mapping[str, Any], *, repo_id: str | None = None) -> ModelCard:
    """The card of an editor network from its ``editor_config.json`` content."""
    from huggingface_hub import ModelCard, ModelCardData

    kind = str(description.get("kind", ""))
    label, config_class, rank_rule, summary = _KINDS.get(kind, (kind.upper(), "EditConfig", "varies", ""))
    base = description.get("base_model", {})
    base_name = base.get("name_or_path") or ""
    hub_base = _hub_id(base_name)
    if hub_base:
        from huggingface_hub import constants

        base_link = f"[`{hub_base}`]({constants.ENDPOINT}/{hub_base})"
    else:
        base_link = f"`{base_name}`" if base_name else "an unnamed base model"
    training = dict(description.get("training") or {})
    metrics = training.pop("final_metrics", None) or {}
    training_rows = []
    for key in ("method", "data_source", "data_format", "data_fingerprint", "n_train", "n_val", "n_excluded",
                "exclude_source", "locality_source", "steps", "examples_seen", "selected", "selected_step",
                "time_s", "stopped", "world_size", "mixed_precision"):
        if key in training:
            training_rows.append((key.replace("_", " "), _cell(training[key])))
    for key, value in sorted((training.get("config") or {}).items()):
        training_rows.append((f"`{key}`", _cell(value)))
    matrices = description.get("matrices", [])
    network = description.get("network", {})
    data = ModelCardData(base_model=hub_base, library_name="hf_edit", pipeline_tag="text-generation",
                         tags=["knowledge-editing", "hf_edit", "editor-network", kind])
    context = {
        "title": f"{label} editor network for {(hub_base or base_name or 'a model').rstrip('/').split('/')[-1]}",
        "kind": kind, "kind_label": label, "config_class": config_class, "rank_rule": rank_rule,
        "method_summary": summary, "base_link": base_link, "base": hub_base or base_name or "<base-model>",
        "base_text": base_link, "fingerprint": base.get("fingerprint", "?"),
        "model_type": base.get("model_type", "?"), "base_dtype": base.get("dtype", "?"),
        "matrices": ", ".join(f"`{m['name']}`" for m in matrices), "n_matrices": len(matrices),
        "n_parameters": f"{int(description.get('n_parameters', 0)):,}",
        "weights_sha256": description.get("weights_sha256", "?"),
        "network_rows": [(k, _cell(v)) for k, v in network.items()],
        "trained": bool(training.get("steps")), "training_rows": training_rows,
        "metric_rows": [(_cell(k), _cell(round(v, 4) if isinstance(v, float) else v)) for k, v in metrics.items()],
        "untrained_note": "edits made with it are one scaled gradient step (MEND) or random (KE).",
        "repo": repo_id or "<path-or-repo-id>", "hf_edit_version": description.get("hf_edit_version", __version__),
    }
    return ModelCard.from_template(data, template_str=load_template("editor_network.md"), **context)
