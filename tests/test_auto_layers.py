"""``layers="auto"``: EditedModel picks the edit layer(s) by causal tracing of the requests (documented rule)."""

from __future__ import annotations

import warnings

import pytest
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, FTConfig, ROMEConfig
from hf_edit.errors import ConfigError
from hf_edit.methods import EditContext
from hf_edit.methods.rome import ROMEEditor
from hf_edit.tracing import choose_layers, scaled_window, traced_profile

REQUESTS = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
            EditRequest(prompt="{} plays the sport of", subject="Lionel Messi", target_new="tennis")]


def test_auto_layers_follow_the_traced_profile(gpt2_tokenizer, wikitext_path):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), n_layer=4)
    expected = choose_layers(traced_profile(model, gpt2_tokenizer, REQUESTS, kind="mlp", window=scaled_window(4),
                                            progress=False))
    edited = EditedModel(model, gpt2_tokenizer, progress=False, method=ROMEConfig(
        layers="auto", mom2_dataset=str(wikitext_path), mom2_n_samples=200, mom2_max_length=64,
        context_templates=("{}",), v_num_grad_steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edits = edited.edit(REQUESTS)
    assert {e.layer for e in edits} == set(expected)
    assert edits[0].config["layers"] == list(expected)  # the manifest records the choice ...
    auto = edits[0].info["auto_layers"]  # ... and how it was made
    assert auto["layers"] == list(expected) and auto["n_facts"] == 2 and len(auto["mean_effect"]) == 4
    assert "peak of the averaged MLP indirect effect" in auto["rule"]


def test_auto_is_resolved_only_by_edited_model(gpt2_tokenizer):
    with pytest.raises(ConfigError, match="suggest_layers"):
        ROMEEditor(ROMEConfig(layers="auto"), EditContext(tiny_model("gpt2"), gpt2_tokenizer))
    assert FTConfig(layers="auto").layers == "auto"
    with pytest.raises(ConfigError, match="'auto'"):
        ROMEConfig(layers="middle")
