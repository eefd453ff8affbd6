"""Half precision and models dispatched across devices with accelerate (CPU plus disk offload)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from hf_edit import EditedModel, EditRequest, ROMEConfig
from hf_edit.stats import model_fingerprint

REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
PROBE = "The Eiffel Tower is located in the city of"


@pytest.fixture
def config(wikitext_path):
    return ROMEConfig(layers=1, mom2_dataset=str(wikitext_path), mom2_n_samples=200, mom2_max_length=64,
                      context_templates=("{}", "Hello world. {}"), v_num_grad_steps=4, guard=False)


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(PROBE, return_tensors="pt")).logits.float()


def test_disk_offloaded_model_is_edited_like_the_plain_one(tmp_path, gpt2_tokenizer, config):
    pytest.importorskip("accelerate")
    model = tiny_model("llama", vocab_size=len(gpt2_tokenizer))
    model.save_pretrained(tmp_path / "llama")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", device_map=device_map,
                                                     offload_folder=tmp_path / "offload")
    assert any(p.is_meta for p in offloaded.model.layers[2].parameters())  # really offloaded
    assert model_fingerprint(offloaded) == model_fingerprint(model)  # offloaded weights are read, not skipped

    plain = EditedModel(copy.deepcopy(model), gpt2_tokenizer, method=config, progress=False)
    dispatched = EditedModel(offloaded, gpt2_tokenizer, method=config, progress=False)
    (expected,), (edit,) = plain.edit(REQUEST), dispatched.edit(REQUEST)
    torch.testing.assert_close(edit.factors.A, expected.factors.A, rtol=0, atol=1e-6)
    torch.testing.assert_close(edit.factors.B, expected.factors.B, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(dispatched, gpt2_tokenizer), _logits(plain, gpt2_tokenizer), rtol=0,
                               atol=1e-5)
    with dispatched.disable_edits():
        torch.testing.assert_close(_logits(dispatched, gpt2_tokenizer), _logits(model, gpt2_tokenizer), rtol=0,
                                   atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merging_into_half_precision_warns_that_the_edit_is_quantised(dtype, gpt2_tokenizer, config):
    model = tiny_model("llama", vocab_size=len(gpt2_tokenizer)).to(dtype)
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    (edit,) = edited.edit(REQUEST)
    assert edit.factors.A.dtype == edit.factors.B.dtype == torch.float32
    with pytest.warns(UserWarning, match="quantises"):
        edited.merge_and_unload()


def test_merging_in_float32_does_not_warn(gpt2_tokenizer, config):
    edited = EditedModel(tiny_model("llama", vocab_size=len(gpt2_tokenizer)), gpt2_tokenizer, method=config,
                         progress=False)
    edited.edit(REQUEST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        edited.merge_and_unload()
