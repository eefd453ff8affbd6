"""FT and FT+L through EditedModel: dense full-rank LoRA adapters, exact merge/save/load, ROME + FT together."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import logits_without_hf_edit, one_thread
from safetensors.torch import load_file
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, ROMEConfig
from hf_edit.manifest import MANIFEST_NAME
from hf_edit.errors import ConfigError, LayerOutOfRangeError
from hf_edit.methods.ft import FTConfig

REQUESTS = [
    EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
]
PROBE = "The Eiffel Tower is located in the city of Paris, said Danielle Darrieux"
MODULE = "transformer.h.2.mlp.c_proj"
EPSILON = 1e-3


@pytest.fixture
def rome(wikitext_path):
    return ROMEConfig(layers=2, mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64,
                      context_templates=("{}", "Hello world. {}"), v_num_grad_steps=5)


FT = FTConfig(layers=2, lr=1e-2, num_steps=5)
FTL = FTConfig(layers=2, lr=1e-2, num_steps=5, norm_constraint=EPSILON)


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(PROBE, return_tensors="pt")).logits


def _with_deltas(original, edits):
    """The base model with every edit added directly into its weights (Conv1D layout)."""
    direct = copy.deepcopy(original)
    with torch.no_grad():
        for edit in edits:
            layer = direct.get_submodule(edit.module)
            layer.weight += (edit.factors.B @ edit.factors.A).T
            if edit.factors.bias is not None:
                layer.bias += edit.factors.bias
    return direct


def _edited(tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tokenizer))
    return EditedModel(copy.deepcopy(model), tokenizer, progress=False), model


def test_ft_edit_is_a_full_rank_lora_with_identity_b_and_bias(gpt2_tokenizer):
    edited, original = _edited(gpt2_tokenizer)
    (edit,) = edited.edit(REQUESTS, method=FT)
    assert edit.method == "ft" and edit.requests == tuple(REQUESTS) and edit.module == MODULE
    config = edited.peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_bias, config.fan_in_fan_out) == (64, 64, True, True)
    layer = edited.base_model.get_submodule(MODULE)
    assert layer.scaling["default"] == 1.0
    assert torch.equal(layer.lora_B["default"].weight, torch.eye(64))
    assert torch.equal(layer.lora_A["default"].weight, edit.factors.A)
    assert torch.equal(layer.lora_B["default"].bias, edit.factors.bias) and edit.factors.bias.abs().max() > 0
    torch.testing.assert_close(_logits(edited, gpt2_tokenizer), _logits(_with_deltas(original, [edit]),
                                                                          gpt2_tokenizer), rtol=0, atol=2e-5)
    with edited.disable_edits():
        assert torch.equal(_logits(edited, gpt2_tokenizer), _logits(original, gpt2_tokenizer))


def test_ft_plus_l_respects_epsilon_on_the_saved_file(tmp_path, gpt2_tokenizer):
    edited, _ = _edited(gpt2_tokenizer)
    (edit,) = edited.edit(REQUESTS, method=FTL)
    assert edit.method == "ft+l"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edited.save_pretrained(tmp_path)
    assert not [w for w in caught if "invalid shape" in str(w.message)]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a = tensors[f"base_model.model.{MODULE}.lora_A.weight"]
    bias = tensors[f"base_model.model.{MODULE}.lora_B.bias"]
    assert a.abs().max() <= EPSILON * (1 + 1e-6) and bias.abs().max() <= EPSILON * (1 + 1e-6)
    assert a.abs().max() >= EPSILON * 0.999  # the clamp was active
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["edits"][0]["config"]["norm_constraint"] == EPSILON


def test_ft_merge_is_bitwise_and_bias_is_merged(gpt2_tokenizer):
    edited, original = _edited(gpt2_tokenizer)
    (edit,) = edited.edit(REQUESTS[0], method=FT)
    merged = edited.merge_and_unload()
    layer, base = merged.get_submodule(MODULE), original.get_submodule(MODULE)
    assert torch.equal(layer.weight, base.weight + (torch.eye(64) @ edit.factors.A).T)
    assert torch.equal(layer.bias, base.bias + edit.factors.bias)


@pytest.mark.slow
def test_rome_and_ft_coexist_as_named_adapters_in_order(tmp_path, gpt2_tokenizer, rome):
    base_dir = tmp_path / "base"
    original = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    original.save_pretrained(base_dir)
    gpt2_tokenizer.save_pretrained(base_dir)
    edited = EditedModel.from_pretrained(base_dir, method=rome, progress=False)
    edited.edit(REQUESTS[0])
    edited.edit(REQUESTS[1], method=FTL)
    edited.edit(REQUESTS[1], method=rome)
    assert [(e.method, e.adapter) for e in edited.edits] == [("rome", "default"), ("ft+l", "edit_1"),
                                                            ("rome", "edit_2")]
    assert edited.peft_model.base_model.active_adapters == ["default", "edit_1", "edit_2"]
    expected = _logits(_with_deltas(original, edited.edits), gpt2_tokenizer)
    torch.testing.assert_close(_logits(edited, gpt2_tokenizer), expected, rtol=0, atol=2e-5)

    edit_dir = tmp_path / "edit"
    edited.save_pretrained(edit_dir)
    manifest = json.loads((edit_dir / MANIFEST_NAME).read_text())
    assert manifest["adapters"] == ["default", "edit_1", "edit_2"]
    assert [e["method"] for e in manifest["edits"]] == ["rome", "ft+l", "rome"]
    assert (edit_dir / "edit_1" / "adapter_model.safetensors").exists()
    loaded = EditedModel.from_pretrained(edit_dir, progress=False)
    assert torch.equal(_logits(loaded, gpt2_tokenizer), _logits(edited, gpt2_tokenizer))
    assert [(e.method, e.adapter) for e in loaded.edits] == [(e.method, e.adapter) for e in edited.edits]
    assert torch.equal(loaded.edits[1].factors.bias, edited.edits[1].factors.bias)

    removed = loaded.remove_edit(1)
    assert [e.method for e in removed] == ["ft+l"]
    assert [(e.method, e.adapter) for e in loaded.edits] == [("rome", "default"), ("rome", "edit_1")]
    torch.testing.assert_close(_logits(loaded, gpt2_tokenizer),
                               _logits(_with_deltas(original, loaded.edits), gpt2_tokenizer), rtol=0, atol=2e-5)


@pytest.mark.slow
def test_dense_edit_loads_with_plain_peft_and_transformers(tmp_path, gpt2_tokenizer):
    base_dir, edit_dir = tmp_path / "base", tmp_path / "edit"
    tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)).save_pretrained(base_dir)
    gpt2_tokenizer.save_pretrained(base_dir)
    edited = EditedModel.from_pretrained(base_dir, edits=REQUESTS, method=FTL, progress=False)
    edited.save_pretrained(edit_dir)
    ids = gpt2_tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with_peft, with_transformers = logits_without_hf_edit(base_dir, edit_dir, ids, tmp_path)
    with one_thread():  # as the other process computed them
        expected = _logits(edited, gpt2_tokenizer)
    assert torch.equal(with_peft, expected)
    torch.testing.assert_close(with_transformers, expected, rtol=0, atol=1e-5)


def test_method_strings_use_presets(gpt2_tokenizer):
    edited, _ = _edited(gpt2_tokenizer)
    assert edited._method_config("ft+l").norm_constraint is not None
    assert edited._method_config("ft").norm_constraint is None
    assert edited._editor("ft+l").config.layers == (0,)


@pytest.mark.parametrize("make_config, error", [
    (lambda: FTConfig(layers=2, norm_constraint=0.0), ConfigError),
    (lambda: FTConfig(layers=2, norm_constraint=-1e-3), ConfigError),
    (lambda: FTConfig(layers=2, rewrite_module_tmp="transformer.h.{}.ln_2"), ConfigError),
    (lambda: FTConfig(layers=9), LayerOutOfRangeError),
])
def test_bad_ft_input_leaves_the_model_unchanged(make_config, error, gpt2_tokenizer):
    edited, _ = _edited(gpt2_tokenizer)
    edited.edit(REQUESTS[0], method=FT)
    before, edits = _logits(edited, gpt2_tokenizer), edited.edits
    with pytest.raises(error):
        edited.edit(REQUESTS[1], method=make_config())
    assert torch.equal(_logits(edited, gpt2_tokenizer), before) and edited.edits == edits
