"""Edits as adapters: exact equality with direct weight edits, bitwise restore, merge, save/load, plain peft."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import logits_without_hf_edit, one_thread
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, ROMEConfig
from hf_edit.manifest import MANIFEST_NAME
from hf_edit.errors import EditFolderError, HfEditError

REQUESTS = [
    EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
    EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="chess"),
]
PROBE = "The Eiffel Tower is located in the city of Paris, said Danielle Darrieux"


@pytest.fixture
def config(wikitext_path):
    return ROMEConfig(layers=1, mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64,
                      context_templates=("{}", "Hello world. {}"), v_num_grad_steps=5)


def _edited(model_type, tokenizer, config, requests=REQUESTS[:1], **kwargs):
    model = tiny_model(model_type, vocab_size=len(tokenizer), **kwargs)
    original = copy.deepcopy(model)
    edited = EditedModel(model, tokenizer, method=config, progress=False)
    edited.edit(requests)
    return edited, original


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(PROBE, return_tensors="pt")).logits


def _delta_in_weight_layout(edit, is_conv1d):
    delta = edit.factors.B @ edit.factors.A
    return delta.T if is_conv1d else delta


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "phi", "opt", "falcon"])
def test_adapter_equals_direct_weight_edit(model_type, gpt2_tokenizer, config):
    edited, original = _edited(model_type, gpt2_tokenizer, config, REQUESTS[:2])
    direct = copy.deepcopy(original)
    for edit in edited.edits:
        layer = direct.get_submodule(edit.module)
        is_conv1d = type(layer).__name__ == "Conv1D"
        with torch.no_grad():
            layer.weight += _delta_in_weight_layout(edit, is_conv1d)
    torch.testing.assert_close(_logits(edited, gpt2_tokenizer), _logits(direct, gpt2_tokenizer), rtol=0, atol=2e-5)
    assert not torch.allclose(_logits(edited, gpt2_tokenizer), _logits(original, gpt2_tokenizer), atol=1e-4)


def test_rome_edit_is_a_rank_one_lora_with_a_u_b_v(gpt2_tokenizer, config):
    edited, _ = _edited("gpt2", gpt2_tokenizer, config)
    (edit,) = edited.edits
    peft_config = edited.peft_model.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.fan_in_fan_out) == (1, 1, True)
    assert list(peft_config.target_modules) == ["transformer.h.1.mlp.c_proj"]
    layer = edited.base_model.get_submodule(edit.module)
    assert layer.scaling["default"] == 1.0
    assert torch.equal(layer.lora_A["default"].weight, edit.factors.A)
    assert torch.equal(layer.lora_B["default"].weight, edit.factors.B)
    assert torch.allclose(edit.factors.A.norm(), torch.tensor(1.0))


def test_edited_module_maps_each_key_to_its_value(gpt2_tokenizer, config):
    """Sequential edits: edit i holds W′k_i + b = v*_i on the model with edits 0..i active."""
    edited, _ = _edited("gpt2", gpt2_tokenizer, config, REQUESTS)
    module = edited.base_model.get_submodule(edited.edits[0].module)
    last = edited.edits[-1]
    with torch.no_grad():
        torch.testing.assert_close(module(last.key[None])[0], last.value, rtol=1e-5, atol=1e-5)
    peft_config = edited.peft_model.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha) == (3, 3)
    layer = edited.base_model.get_submodule(last.module)
    assert torch.equal(layer.lora_A["default"].weight, torch.cat([e.factors.A for e in edited.edits]))


def test_disable_and_remove_restore_the_original_bitwise(gpt2_tokenizer, config):
    edited, original = _edited("gpt2", gpt2_tokenizer, config, REQUESTS[:2])
    expected = _logits(original, gpt2_tokenizer)
    with edited.disable_edits():
        assert torch.equal(_logits(edited, gpt2_tokenizer), expected)
    assert not torch.equal(_logits(edited, gpt2_tokenizer), expected)
    (removed,) = edited.remove_edit(0)
    assert removed.request == REQUESTS[0] and len(edited.edits) == 1
    only_second = copy.deepcopy(original)
    with torch.no_grad():
        only_second.get_submodule(removed.module).weight += _delta_in_weight_layout(edited.edits[0], True)
    torch.testing.assert_close(_logits(edited, gpt2_tokenizer), _logits(only_second, gpt2_tokenizer),
                               rtol=0, atol=2e-5)
    edited.remove_edit(0)
    assert edited.peft_model is None
    assert torch.equal(_logits(edited, gpt2_tokenizer), expected)
    for (name, p), (_, q) in zip(edited.base_model.named_parameters(), original.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_merge_and_unload_adds_delta_bitwise(model_type, gpt2_tokenizer, config):
    edited, original = _edited(model_type, gpt2_tokenizer, config)
    (edit,) = edited.edits
    merged = edited.merge_and_unload()
    assert type(merged) is type(original)
    weight = merged.get_submodule(edit.module).weight
    is_conv1d = model_type == "gpt2"
    assert torch.equal(weight, original.get_submodule(edit.module).weight
                       + _delta_in_weight_layout(edit, is_conv1d))
    with pytest.raises(HfEditError, match="merge"):
        edited.edit(REQUESTS[1])


def test_edits_on_several_layers_keep_scaling_one(gpt2_tokenizer, config, wikitext_path):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    original = copy.deepcopy(model)
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    edited.edit(REQUESTS[:2])
    edited.edit(REQUESTS[2], method=ROMEConfig(**{**config.__dict__, "layers": (2,)}))
    peft_config = edited.peft_model.peft_config["default"]
    assert peft_config.rank_pattern == {"transformer.h.1.mlp.c_proj": 2, "transformer.h.2.mlp.c_proj": 1}
    assert peft_config.alpha_pattern == peft_config.rank_pattern
    for name in peft_config.rank_pattern:
        assert edited.base_model.get_submodule(name).scaling["default"] == 1.0
    direct = copy.deepcopy(original)
    with torch.no_grad():
        for edit in edited.edits:
            direct.get_submodule(edit.module).weight += _delta_in_weight_layout(edit, True)
    torch.testing.assert_close(_logits(edited, gpt2_tokenizer), _logits(direct, gpt2_tokenizer), rtol=0, atol=2e-5)


def _saved_base_and_edit(tmp_path, tokenizer, config, requests=REQUESTS[:2]):
    base_dir, edit_dir = tmp_path / "base", tmp_path / "edit"
    tiny_model("gpt2", vocab_size=len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    edited = EditedModel.from_pretrained(base_dir, edits=requests, method=config, progress=False)
    edited.save_pretrained(edit_dir)
    return base_dir, edit_dir, edited


def test_save_writes_adapter_and_manifest(tmp_path, gpt2_tokenizer, config):
    base_dir, edit_dir, edited = _saved_base_and_edit(tmp_path, gpt2_tokenizer, config)
    assert {"adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME} <= {p.name for p in edit_dir.iterdir()}
    adapter_config = json.loads((edit_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir)
    manifest = json.loads((edit_dir / MANIFEST_NAME).read_text())
    assert manifest["base_model"] == str(base_dir)
    assert [e["requests"][0]["subject"] for e in manifest["edits"]] == [r.subject for r in REQUESTS[:2]]
    first = manifest["edits"][0]
    assert first["method"] == "rome" and first["rank"] == 1 and first["layer"] == 1
    assert first["config"]["key_mode"] == "original"
    assert first["info"]["stats_fingerprint"] == edited.edits[0].info["stats_fingerprint"]
    assert first["info"]["context_templates"] == ["{}", "Hello world. {}"]
    assert (edit_dir / "adapter_model.safetensors").stat().st_size < 10_000


def test_save_and_load_round_trip_is_exact(tmp_path, gpt2_tokenizer, config):
    _, edit_dir, edited = _saved_base_and_edit(tmp_path, gpt2_tokenizer, config)
    loaded = EditedModel.from_pretrained(edit_dir, progress=False)
    assert torch.equal(_logits(loaded, gpt2_tokenizer), _logits(edited, gpt2_tokenizer))
    assert [e.request for e in loaded.edits] == [e.request for e in edited.edits]
    for a, b in zip(loaded.edits, edited.edits):
        assert torch.equal(a.factors.A, b.factors.A) and torch.equal(a.factors.B, b.factors.B)
    loaded.edit(REQUESTS[2])  # editing continues on a loaded model, with the saved templates
    assert loaded.edits[-1].info["context_templates"] == edited.edits[0].info["context_templates"]
    loaded.remove_edit(2)
    assert torch.equal(_logits(loaded, gpt2_tokenizer), _logits(edited, gpt2_tokenizer))


@pytest.mark.slow
def test_plain_peft_and_transformers_load_the_edit_in_a_fresh_process(tmp_path, gpt2_tokenizer, config):
    base_dir, edit_dir, edited = _saved_base_and_edit(tmp_path, gpt2_tokenizer, config)
    ids = gpt2_tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with_peft, with_transformers = logits_without_hf_edit(base_dir, edit_dir, ids, tmp_path)
    with one_thread():  # as the other process computed them
        expected = _logits(edited, gpt2_tokenizer)
    assert torch.equal(with_peft, expected)
    torch.testing.assert_close(with_transformers, expected, rtol=0, atol=1e-5)


def test_manifest_that_disagrees_with_the_adapter_is_rejected(tmp_path, gpt2_tokenizer, config):
    _, edit_dir, _ = _saved_base_and_edit(tmp_path, gpt2_tokenizer, config)
    manifest = json.loads((edit_dir / MANIFEST_NAME).read_text())
    manifest["edits"] = manifest["edits"][:1]
    (edit_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(EditFolderError, match="do not match"):
        EditedModel.from_pretrained(edit_dir, progress=False)


def test_passthrough_and_saving_without_edits(gpt2_tokenizer, config):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    assert edited.config is model.config and edited.device == model.device and edited.peft_model is None
    with pytest.raises(HfEditError, match="no edits"):
        edited.save_pretrained("unused")
    out = edited.generate(**gpt2_tokenizer("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 4
