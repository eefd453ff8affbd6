"""Where the editable parts of a causal LM live.

hf_edit edits the MLP output projection of one decoder layer: its input is the *key* (width ``in_features``) and
its output the *value* (width ``out_features`` = hidden size).  This module finds, for any
``AutoModelForCausalLM``, the decoder layers, the MLP block, that projection (``nn.Linear`` or GPT-2's ``Conv1D``,
whose weight is stored transposed), the final norm and the LM head.  Known model types are looked up in
:data:`KNOWN_LAYOUTS`; other models go through a structural rule, and a model neither handles raises
:class:`~hf_edit.errors.UnsupportedArchitectureError` naming what was found and how to pass the module explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError, LayerOutOfRangeError, UnsupportedArchitectureError

__all__ = ["ModelLayout", "EditTarget", "KNOWN_LAYOUTS", "find_layout", "resolve_target", "unwrap_model"]


@dataclass(frozen=True)
class ModelLayout:
    """Module paths of one architecture; ``{}`` in :attr:`projection` stands for the layer index."""

    layers: str
    mlp: str
    projection: str
    final_norm: str
    lm_head: str

    def projection_name(self, layer: int) -> str:
        return self.projection.format(layer)


def _llama_like(projection: str = "down_proj", final_norm: str = "model.norm") -> ModelLayout:
    return ModelLayout("model.layers", "model.layers.{}.mlp", f"model.layers.{{}}.mlp.{projection}", final_norm,
                       "lm_head")


_GPT2_LIKE = ModelLayout("transformer.h", "transformer.h.{}.mlp", "transformer.h.{}.mlp.c_proj", "transformer.ln_f",
                         "lm_head")
_FALCON_LIKE = ModelLayout("transformer.h", "transformer.h.{}.mlp", "transformer.h.{}.mlp.dense_4h_to_h",
                           "transformer.ln_f", "lm_head")

#: Layouts of the model types hf_edit knows by name (``config.model_type``).
KNOWN_LAYOUTS: dict[str, ModelLayout] = {
    "gpt2": _GPT2_LIKE,
    "gpt_neo": _GPT2_LIKE,
    "gptj": ModelLayout("transformer.h", "transformer.h.{}.mlp", "transformer.h.{}.mlp.fc_out", "transformer.ln_f",
                        "lm_head"),
    "gpt_neox": ModelLayout("gpt_neox.layers", "gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.mlp.dense_4h_to_h",
                            "gpt_neox.final_layer_norm", "lm_head"),
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "gemma": _llama_like(),
    "gemma2": _llama_like(),
    "gemma3_text": _llama_like(),
    "olmo2": _llama_like(),
    "phi3": _llama_like(),
    "phi": _llama_like("fc2", "model.final_layernorm"),
    "opt": ModelLayout("model.decoder.layers", "model.decoder.layers.{}", "model.decoder.layers.{}.fc2",
                       "model.decoder.final_layer_norm", "lm_head"),
    "falcon": _FALCON_LIKE,
    "bloom": _FALCON_LIKE,
}

_MLP_CHILD_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class EditTarget:
    """The projection edited at one layer.

    Attributes:
        name: full module path inside the transformers model (e.g. ``"transformer.h.17.mlp.c_proj"``).
        layer: decoder layer index, or ``None`` when the module was named explicitly and has no index.
        is_conv1d: ``True`` for GPT-2's ``Conv1D`` (weight stored as ``(in, out)``).
        in_features: key width (MLP intermediate size).
        out_features: value width (hidden size).
    """

    name: str
    layer: int | None
    is_conv1d: bool
    in_features: int
    out_features: int


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_layer(module: nn.Module) -> nn.Module:
    """The original layer inside a PEFT LoRA wrapper (or the module itself)."""
    return getattr(module, "base_layer", module)


def num_layers(model: nn.Module) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (``n_positions`` / ``max_position_embeddings``),
    or ``None`` when its config states no limit."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return None
    config = config.get_text_config()
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _projection_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or Conv1D, else None."""
    module = base_layer(module)
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    return None


def _structural_layout(model: nn.Module) -> ModelLayout:
    """Find the layout by structure: the rule of the design notes, used for model types not in the table."""
    n = num_layers(model)
    hidden = int(model.config.get_text_config().hidden_size)
    layer_lists = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n]
    if not layer_lists:
        raise UnsupportedArchitectureError(
            f"No nn.ModuleList of length num_hidden_layers={n} found in {type(model).__name__}. Pass the module to "
            "edit explicitly, e.g. ROMEConfig(rewrite_module_tmp='model.layers.{}.mlp.down_proj')."
        )
    layers = min(layer_lists, key=lambda name: name.count("."))
    first = model.get_submodule(f"{layers}.0")
    mlp_child = next((c for c in _MLP_CHILD_NAMES if hasattr(first, c)), None)
    mlp_rel = f".{mlp_child}" if mlp_child else ""
    mlp = first.get_submodule(mlp_child) if mlp_child else first
    # Modules inside a PEFT wrapper (its base_layer, lora_A/lora_B) are parts of the wrapped projection.
    wrappers = [name for name, mod in mlp.named_modules() if name and base_layer(mod) is not mod]
    candidates = []
    for name, mod in mlp.named_modules():
        shape = _projection_shape(mod)
        inside_wrapper = any(name.startswith(w + ".") for w in wrappers)
        if shape and shape[1] == hidden and shape[0] != hidden and not inside_wrapper:
            candidates.append(name)
    if len(candidates) != 1:
        raise UnsupportedArchitectureError(
            f"Cannot identify the MLP output projection of {type(model).__name__} "
            f"(model_type={model.config.model_type!r}): in '{layers}.0{mlp_rel}' found {len(candidates)} "
            f"Linear/Conv1D modules mapping to hidden size {hidden}: {candidates}. Fused mixture-of-experts "
            "layers are not supported. Pass the module explicitly, e.g. "
            f"ROMEConfig(rewrite_module_tmp='{layers}.{{}}{mlp_rel}.<projection>')."
        )
    norm = [name for name, mod in model.named_modules()
            if "norm" in type(mod).__name__.lower() and not name.startswith(layers + ".")]
    head = next((name for name, mod in model.named_modules() if mod is model.get_output_embeddings()), "lm_head")
    return ModelLayout(layers, f"{layers}.{{}}{mlp_rel}", f"{layers}.{{}}{mlp_rel}.{candidates[0]}",
                       norm[-1] if norm else "", head)


def find_layout(model: nn.Module) -> ModelLayout:
    """The :class:`ModelLayout` of ``model`` (a transformers causal LM, possibly wrapped by PEFT)."""
    model = unwrap_model(model)
    layout = KNOWN_LAYOUTS.get(model.config.model_type)
    if layout is not None and _get(model, layout.projection_name(0)) is not None:
        return layout
    return _structural_layout(model)


def resolve_target(model: nn.Module, layer: int | None, module_template: str | None = None) -> EditTarget:
    """The projection to edit at ``layer``, or the module named by ``module_template`` (``{}`` = layer).

    Raises:
        LayerOutOfRangeError: the layer does not exist.
        ConfigError: the named module does not exist or is not a Linear/Conv1D.
        UnsupportedArchitectureError: no template was given and the architecture is not understood.
    """
    model = unwrap_model(model)
    n = num_layers(model)
    if layer is not None and not -n <= layer < n:
        raise LayerOutOfRangeError(f"Layer {layer} is out of range: the model has {n} layers (0..{n - 1}).")
    if layer is not None and layer < 0:
        layer += n
    if module_template:
        if "{}" in module_template and layer is None:
            raise ConfigError(f"Module template {module_template!r} needs a layer index.")
        name = module_template.format(layer) if "{}" in module_template else module_template
    else:
        name = find_layout(model).projection_name(layer)
    module = _get(model, name)
    if module is None:
        raise ConfigError(f"The model has no module named {name!r}.")
    shape = _projection_shape(module)
    if shape is None:
        raise ConfigError(f"Module {name!r} is a {type(base_layer(module)).__name__}; hf_edit edits only "
                          "nn.Linear and transformers Conv1D modules.")
    return EditTarget(name=name, layer=layer, is_conv1d=isinstance(base_layer(module), Conv1D),
                      in_features=shape[0], out_features=shape[1])
