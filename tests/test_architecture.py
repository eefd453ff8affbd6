"""Architecture discovery: the layout table, the structural fallback, explicit module names, PEFT-wrapped models.

Every expectation is read from the tiny model itself (its config, ``get_output_embeddings()``, the projection's
weight), never copied from the table under test.
"""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from tiny_models import TINY_CONFIGS, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_edit import ROMEConfig
from hf_edit.architecture import KNOWN_LAYOUTS, _structural_layout, find_layout, resolve_target, unwrap_model
from hf_edit.errors import ConfigError, LayerOutOfRangeError, UnsupportedArchitectureError
from hf_edit.methods import EditContext
from hf_edit.methods.rome import ROMEEditor

#: Model types that are in the layout table and can be built as tiny models.
TABLE_TYPES = sorted(set(KNOWN_LAYOUTS) & set(TINY_CONFIGS))


def weight_in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) read from the weight: Conv1D stores (in, out), nn.Linear (out, in)."""
    rows, cols = module.weight.shape
    return (rows, cols) if isinstance(module, Conv1D) else (cols, rows)


def test_every_tiny_architecture_is_covered():
    assert len(TABLE_TYPES) >= 15
    assert "mixtral" not in KNOWN_LAYOUTS


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TABLE_TYPES)
def test_layout_names_modules_that_exist(model_type):
    model = tiny_model(model_type)
    text_config = model.config.get_text_config()
    layout = find_layout(model)
    assert layout == KNOWN_LAYOUTS[model_type]

    layers = model.get_submodule(layout.layers)
    assert isinstance(layers, nn.ModuleList) and len(layers) == text_config.num_hidden_layers
    for i in range(len(layers)):
        projection = model.get_submodule(layout.projection_name(i))
        assert isinstance(projection, (nn.Linear, Conv1D))
        # The projection lives inside layer i (and inside its MLP block).
        assert layout.projection_name(i).startswith(f"{layout.layers}.{i}.")
        assert layout.projection_name(i).startswith(layout.mlp.format(i))
        assert projection in list(layers[i].modules())
        in_features, out_features = weight_in_out(projection)
        assert out_features == text_config.hidden_size != in_features
    assert "norm" in type(model.get_submodule(layout.final_norm)).__name__.lower()
    assert model.get_submodule(layout.lm_head) is model.get_output_embeddings()


@pytest.mark.parametrize("model_type", TABLE_TYPES)
def test_resolve_target_reads_orientation_and_widths_from_the_module(model_type):
    model = tiny_model(model_type)
    layout = find_layout(model)
    target = resolve_target(model, 1)
    projection = model.get_submodule(layout.projection_name(1))
    assert target.name == layout.projection_name(1) and target.layer == 1
    assert target.is_conv1d is (model_type == "gpt2")
    assert (target.in_features, target.out_features) == weight_in_out(projection)
    assert target.out_features == model.config.get_text_config().hidden_size


@pytest.mark.parametrize("model_type", TABLE_TYPES)
def test_structural_rule_agrees_with_the_table(model_type):
    model = tiny_model(model_type)
    table, found = KNOWN_LAYOUTS[model_type], _structural_layout(model)
    assert found.projection == table.projection
    assert found.layers == table.layers
    assert found.mlp == table.mlp
    assert found.final_norm == table.final_norm
    assert found.lm_head == table.lm_head


# ----------------------------------------------------------------------------------------------------------------
# Unsupported models and explicit module names
# ----------------------------------------------------------------------------------------------------------------
def test_mixture_of_experts_is_refused_with_a_way_out():
    model = tiny_model("mixtral")
    with pytest.raises(UnsupportedArchitectureError) as info:
        find_layout(model)
    message = str(info.value)
    assert "mixtral" in message and "model.layers.0.mlp" in message  # where it looked
    assert "found 0" in message  # what it found
    assert "rewrite_module_tmp" in message  # how to name the module explicitly
    with pytest.raises(UnsupportedArchitectureError):
        resolve_target(model, 1)


def test_explicit_module_template_bypasses_discovery():
    model = tiny_model("mixtral")
    target = resolve_target(model, 1, "model.layers.{}.self_attn.o_proj")
    o_proj = model.get_submodule("model.layers.1.self_attn.o_proj")
    assert target.name == "model.layers.1.self_attn.o_proj" and target.layer == 1 and not target.is_conv1d
    assert (target.in_features, target.out_features) == (o_proj.in_features, o_proj.out_features)


@pytest.mark.parametrize("template", ["transformer.h.{}.mlp", "transformer.h.{}.mlp.act", "transformer.h.{}.ln_2"])
def test_explicit_template_to_a_non_linear_module_is_a_config_error(template, gpt2_tokenizer):
    editor = ROMEEditor(ROMEConfig(layers=1, rewrite_module_tmp=template), EditContext(tiny_model("gpt2"), gpt2_tokenizer))
    with pytest.raises(ConfigError, match="nn.Linear"):
        editor.targets()


def test_fused_experts_are_not_an_editable_module():
    with pytest.raises(ConfigError, match="experts"):
        resolve_target(tiny_model("mixtral"), 1, "model.layers.{}.mlp.experts")


@pytest.mark.parametrize("template", ["transformer.h.{}.mlp.down_proj", "transformer.blocks.{}.mlp.c_proj"])
def test_missing_module_is_a_config_error(template, gpt2_tokenizer):
    editor = ROMEEditor(ROMEConfig(layers=1, rewrite_module_tmp=template), EditContext(tiny_model("gpt2"), gpt2_tokenizer))
    with pytest.raises(ConfigError, match="no module named"):
        editor.targets()


@pytest.mark.parametrize("layer", [3, 7, -4])
def test_layer_out_of_range(layer):
    model = tiny_model("gpt2")
    assert model.config.num_hidden_layers == 3
    with pytest.raises(LayerOutOfRangeError, match="3 layers"):
        resolve_target(model, layer)
    with pytest.raises(LayerOutOfRangeError):
        resolve_target(model, layer, "transformer.h.{}.mlp.c_proj")


def test_layer_out_of_range_is_a_config_error_for_generic_handlers():
    assert issubclass(LayerOutOfRangeError, ConfigError) and issubclass(LayerOutOfRangeError, ValueError)


@pytest.mark.parametrize(("layer", "expected"), [(-1, 2), (-3, 0)])
def test_negative_layers_count_from_the_end(layer, expected):
    model = tiny_model("llama")
    target = resolve_target(model, layer)
    assert target.layer == expected
    assert target == resolve_target(model, expected)


# ----------------------------------------------------------------------------------------------------------------
# PEFT-wrapped models
# ----------------------------------------------------------------------------------------------------------------
def _with_lora_on(model: nn.Module, module_name: str, conv1d: bool):
    config = LoraConfig(target_modules=[module_name], r=2, lora_alpha=2, fan_in_fan_out=conv1d)
    return get_peft_model(model, config)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
@pytest.mark.parametrize("lora_layer", [0, 1])
def test_peft_wrapped_model_resolves_to_the_same_target(model_type, lora_layer):
    model = tiny_model(model_type)
    plain = {layer: resolve_target(model, layer) for layer in range(3)}
    layout = find_layout(model)
    peft_model = _with_lora_on(model, plain[lora_layer].name, conv1d=plain[lora_layer].is_conv1d)
    wrapper = unwrap_model(peft_model).get_submodule(plain[lora_layer].name)
    assert hasattr(wrapper, "base_layer")  # the projection really is a LoRA wrapper now
    assert find_layout(peft_model) == layout
    for layer in range(3):
        assert resolve_target(peft_model, layer) == plain[layer]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_structural_rule_ignores_lora_layers(model_type):
    """A LoRA on layer 0's projection (e.g. a first edit there) must not add a second candidate (its lora_B)."""
    model = tiny_model(model_type)
    expected = _structural_layout(model)
    peft_model = _with_lora_on(model, expected.projection_name(0), conv1d=model_type == "gpt2")
    assert _structural_layout(unwrap_model(peft_model)) == expected
