"""KN (knowledge neurons) as a PEFT adapter (methods spec §1, oracles §1.9).

The expected deltas are computed here independently of the editor: the greedy token o from a plain forward pass,
v from the embedding rows, the neuron set from the threshold rule applied to the attribution scores (whose
integrated gradients are checked against an unbatched oracle in ``test_attribution.py``), and the reference's
in-place weight edit written out row by row.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, KNConfig
from hf_edit.architecture import unwrap_model
from hf_edit.attribution import AttributionResult, coarse_neurons, integrated_gradients
from hf_edit.errors import (
    ConfigError,
    InvalidRequestError,
    LayerOutOfRangeError,
    OptimizationError,
    UnsupportedArchitectureError,
)
from hf_edit.methods import EditContext, config_from_dict, get_method
from hf_edit.methods.kn import KNEditor, kn_token_ids

EIFFEL = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome",
                     target_true="Paris")
MESSI = EditRequest(prompt="{} plays the sport of", subject="Lionel Messi", target_new="tennis")
STORY = EditRequest(prompt="{} went to the park to play with her", subject="Lily", target_new="cat",
                    target_true="ball")

# KN's reference tokens ("Paris", not " Paris") seldom make the scored token the top prediction: hf_edit's post-edit
# check warns about that, which is expected here
pytestmark = pytest.mark.filterwarnings("ignore::hf_edit.errors.EditDidNotTakeWarning")

# kmeng01/rome hparams/KN/gpt2-xl.json, verbatim
REFERENCE_HPARAMS = {"lr_scale": 1.0, "n_toks": 10, "model_name": "gpt2-xl", "refine": False, "batch_size": 20,
                     "steps": 20, "adaptive_threshold": 0.2, "p": 0.4}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer):
    return tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))


@pytest.fixture(scope="module")
def stories(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(stories_path)


def _editor(model, tokenizer, **config) -> KNEditor:
    return KNEditor(KNConfig(**config), EditContext.for_model(model, tokenizer))


def _greedy(model, tokenizer, prompt: str) -> int:
    with torch.no_grad():
        return int(model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax())


def _expected(model, tokenizer, request: EditRequest, embedding: torch.Tensor, steps: int = 20):
    """(selected neurons by layer, v, in-place edited copy of the model) computed as the reference does."""
    target_true = tokenizer(request.target_true, add_special_tokens=False)["input_ids"]
    scores = integrated_gradients(model, tokenizer, request.filled_prompt, target_true, steps=steps)
    tau = 0.2 * scores.scores.max()
    by_layer = {}
    for row, layer in enumerate(scores.layers):
        chosen = (scores.scores[row] > tau).nonzero().squeeze(1).tolist()
        if chosen:
            by_layer[layer] = chosen
    original = _greedy(model, tokenizer, request.filled_prompt)
    targets = tokenizer(request.target_new, add_special_tokens=False)["input_ids"]  # no leading space
    value = embedding[targets].sum(0) - 2 * embedding[original]
    return by_layer, value, original, targets


# ------------------------------------------------------------------------------------------------ config


def test_reference_hparams_file_loads(tmp_path):
    path = tmp_path / "gpt2-xl.json"
    path.write_text(json.dumps(REFERENCE_HPARAMS))
    config = KNConfig.from_json(path)
    assert config == KNConfig() == KNConfig.preset("openai-community/gpt2-xl")
    assert (config.steps, config.batch_size, config.adaptive_threshold, config.p, config.refine) == \
        (20, 20, 0.2, 0.4, False)
    assert config.selection() == {"adaptive_threshold": 0.2}
    assert type(config_from_dict(config.to_dict())) is KNConfig and config_from_dict(config.to_dict()) == config
    assert get_method("kn").config_class is KNConfig
    with pytest.raises(ConfigError, match="Unknown KN hyperparameters"):
        KNConfig.from_dict({**REFERENCE_HPARAMS, "bogus": 1})


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=1.5), dict(p=1.0), dict(p=-0.1),
                                 dict(threshold=0.1, percentile=50), dict(percentile=101),
                                 dict(prompt_variants=("no placeholder",)), dict(prompt_variants=("{} {}",)),
                                 dict(neuron_space="gelu"), dict(embedding="both"), dict(rule="trapezoid"),
                                 dict(attribution_target="x"), dict(original_scale=float("nan")),
                                 dict(neuron_module_tmp="transformer.h.0.mlp.act"), dict(paraphrase_key="")])
def test_bad_config_values_are_rejected(bad):
    with pytest.raises(ConfigError):
        KNConfig(**bad)


def test_eleutherai_variant_and_selection_modes():
    config = KNConfig.eleutherai(["The city where {} stands is"], steps=10)
    assert (config.adaptive_threshold, config.p, config.refine, config.batch_size, config.steps) == \
        (0.3, 0.5, True, 10, 10)
    assert config.prompt_variants == ("The city where {} stands is",)
    assert config.paraphrase_key == "paraphrase_prompts"
    assert KNConfig(threshold=0.01).selection() == {"threshold": 0.01}
    assert KNConfig(percentile=99.5).selection() == {"percentile": 99.5}


def test_default_layers_are_every_layer(gpt2, gpt2_tokenizer):
    assert _editor(gpt2, gpt2_tokenizer).config.layers == (0, 1, 2)
    assert _editor(gpt2, gpt2_tokenizer, layers=-1).config.layers == (-1,)
    assert [t.layer for t in _editor(gpt2, gpt2_tokenizer, layers=(2, 0)).targets()] == [0, 2]


# ------------------------------------------------------------------------------------------------ the delta


def test_gpt2_conv1d_delta_is_v_on_the_selected_rows(gpt2, gpt2_tokenizer):
    """Oracle §1.9.7 on GPT-2's Conv1D (weight stored d_ff × d): rows N_l of c_proj change, each by v."""
    embedding = gpt2.transformer.wte.weight.detach()
    by_layer, value, original, targets = _expected(gpt2, gpt2_tokenizer, EIFFEL, embedding)
    # "Rome" without the leading space is two tokens ("R", "ome"): each embedding is added once
    assert len(targets) == 2 and gpt2_tokenizer.decode(targets) == "Rome"
    # the reference's in-place edit, row by row: -2 E[o], then + E[t_i] per token
    reference = copy.deepcopy(gpt2)
    with torch.no_grad():
        for layer, rows in by_layer.items():
            weight = reference.transformer.h[layer].mlp.c_proj.weight
            for j in rows:
                weight[j, :] -= 2 * embedding[original]
                for row in embedding[targets]:
                    weight[j, :] += row

    edited = EditedModel(copy.deepcopy(gpt2), gpt2_tokenizer, progress=False)
    edits = edited.edit(EIFFEL, method=KNConfig())
    assert [e.layer for e in edits] == sorted(by_layer)
    for edit in edits:
        assert edit.module == f"transformer.h.{edit.layer}.mlp.c_proj" and edit.factors.rank == 1
        a = edit.factors.A[0]
        assert set(a.unique().tolist()) <= {0.0, 1.0} and a.nonzero().squeeze(1).tolist() == by_layer[edit.layer]
        torch.testing.assert_close(edit.factors.B[:, 0], value, rtol=0, atol=1e-6)
        assert edit.info["original_id"] == original and edit.info["target_ids"] == targets
        assert edit.info["layer_neurons"] == by_layer[edit.layer]
    merged = edited.merge_and_unload()
    for layer in range(3):
        before = gpt2.transformer.h[layer].mlp.c_proj.weight
        after = merged.transformer.h[layer].mlp.c_proj.weight
        delta = after - before  # (d_ff, d): Conv1D layout
        changed = (delta != 0).any(1).nonzero().squeeze(1).tolist()
        assert changed == by_layer.get(layer, [])
        if changed:
            torch.testing.assert_close(delta[changed], value.expand(len(changed), -1), rtol=0, atol=1e-6)
        torch.testing.assert_close(after, reference.transformer.h[layer].mlp.c_proj.weight, rtol=0, atol=1e-6)
        assert torch.equal(merged.transformer.h[layer].mlp.c_fc.weight, gpt2.transformer.h[layer].mlp.c_fc.weight)


def test_llama_linear_delta_is_v_on_the_selected_columns(stories):
    """Gated MLP (Linear layout, down_proj is d × d_ff): neuron j is coordinate j of down_proj's input,
    act(gate_proj x)_j · (up_proj x)_j; its value slot is column j of down_proj, which gets v."""
    model, tokenizer = stories
    assert model.config.tie_word_embeddings
    embedding = model.model.embed_tokens.weight.detach()
    by_layer, value, _, _ = _expected(model, tokenizer, STORY, embedding)
    assert by_layer
    edited = EditedModel(copy.deepcopy(model), tokenizer, progress=False)
    edits = edited.edit(STORY, method=KNConfig())
    assert {e.layer: e.factors.A[0].nonzero().squeeze(1).tolist() for e in edits} == by_layer

    # what a neuron is: at the first edited layer, down_proj's input x (x_j = act(gate_proj h)_j · (up_proj h)_j)
    # is unchanged by the edit, and its output moves by (sum of x_j over the selected j) · v
    layer = min(by_layer)
    mlp = unwrap_model(edited.base_model).model.layers[layer].mlp
    seen = {}
    hooks = [mlp.register_forward_hook(lambda m, a, o: seen.update(h=a[0][0, -1].detach())),
             mlp.down_proj.register_forward_hook(lambda m, a, o: seen.update(x=a[0][0, -1].detach(),
                                                                             y=o[0, -1].detach()))]
    ids = tokenizer(STORY.filled_prompt, return_tensors="pt")
    with torch.no_grad():
        with edited.disable_edits():
            edited(**ids)
        h, x, y = seen["h"], seen["x"], seen["y"]
        torch.testing.assert_close(x, mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        edited(**ids)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(seen["x"], x, rtol=0, atol=0)
    torch.testing.assert_close(seen["y"] - y, x[by_layer[layer]].sum() * value, rtol=1e-4, atol=1e-5)

    merged = edited.merge_and_unload()
    for i in range(model.config.num_hidden_layers):
        delta = merged.model.layers[i].mlp.down_proj.weight - model.model.layers[i].mlp.down_proj.weight  # (d, d_ff)
        changed = (delta != 0).any(0).nonzero().squeeze(1).tolist()
        assert changed == by_layer.get(i, [])
        if changed:
            torch.testing.assert_close(delta[:, changed], value[:, None].expand(-1, len(changed)), rtol=0,
                                       atol=1e-6)
        for name in ("gate_proj", "up_proj"):
            assert torch.equal(getattr(merged.model.layers[i].mlp, name).weight,
                               getattr(model.model.layers[i].mlp, name).weight)


def test_untied_model_offers_input_and_output_embeddings(gpt2_tokenizer):
    model = tiny_model("llama", vocab_size=len(gpt2_tokenizer), tie_word_embeddings=False)
    assert not torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    request = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome", target_true="France")
    targets = gpt2_tokenizer("Rome", add_special_tokens=False)["input_ids"]
    original = _greedy(model, gpt2_tokenizer, request.filled_prompt)
    for source, matrix in (("input", model.get_input_embeddings().weight),
                           ("output", model.get_output_embeddings().weight)):
        edit = _editor(model, gpt2_tokenizer, embedding=source, steps=4, batch_size=12).compute_edit(request)
        torch.testing.assert_close(edit.value, (matrix[targets].sum(0) - 2 * matrix[original]).detach(),
                                   rtol=0, atol=1e-6)


def test_scales_and_leading_space_options(gpt2, gpt2_tokenizer):
    embedding = gpt2.transformer.wte.weight.detach()
    original = _greedy(gpt2, gpt2_tokenizer, EIFFEL.filled_prompt)
    edit = _editor(gpt2, gpt2_tokenizer, layers=0, steps=4, target_leading_space=True, original_scale=1.0,
                   target_scale=2.0).compute_edit(EIFFEL)
    spaced = gpt2_tokenizer(" Rome", add_special_tokens=False)["input_ids"]
    assert edit.target_ids == spaced and edit.attribution_ids == gpt2_tokenizer(" Paris")["input_ids"]
    torch.testing.assert_close(edit.value, 2 * embedding[spaced].sum(0) - embedding[original], rtol=0, atol=1e-6)
    assert kn_token_ids(gpt2_tokenizer, "Rome") == gpt2_tokenizer("Rome")["input_ids"]


# ------------------------------------------------------------------------------------------------ neuron selection


def test_selection_follows_the_threshold(gpt2, gpt2_tokenizer):
    """Oracle §1.9.5: N = {S > 0.2 · max S} over all layers, strict; every selected score exceeds τ."""
    edit = _editor(gpt2, gpt2_tokenizer).compute_edit(EIFFEL)
    scores = edit.knowledge_neurons.attributions[0].scores
    tau = 0.2 * scores.max()
    assert len(edit.neurons) == int((scores > tau).sum()) > 0
    assert min(scores[layer, j] for layer, j in edit.neurons) > tau
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[tuple(zip(*edit.neurons, strict=True))] = False
    assert scores[mask].max() <= tau
    assert edit.info["tau"] == pytest.approx(float(tau)) and edit.info["n_neurons"] == len(edit.neurons)
    assert edit.info["attributed"] == "target_true"
    # absolute threshold and percentile
    absolute = _editor(gpt2, gpt2_tokenizer, threshold=float(scores.median())).compute_edit(EIFFEL)
    assert absolute.neurons == coarse_neurons(scores, threshold=float(scores.median()))
    top = _editor(gpt2, gpt2_tokenizer, percentile=99.0).compute_edit(EIFFEL)
    assert top.neurons == coarse_neurons(scores, percentile=99.0)


def test_prompt_variants_with_refinement_keep_shared_neurons(gpt2, gpt2_tokenizer):
    variants = ("In the city of {} there is", "{} can be found in the city of")
    request = EditRequest(prompt=EIFFEL.prompt, subject=EIFFEL.subject, target_new="Rome", target_true="Paris",
                          metadata={"paraphrase_prompts": ["Where is The Eiffel Tower? In"]})
    union = _editor(gpt2, gpt2_tokenizer, steps=4, prompt_variants=variants,
                    paraphrase_key="paraphrase_prompts").compute_edit(request)
    assert union.prompts == [EIFFEL.filled_prompt, "In the city of The Eiffel Tower there is",
                             "The Eiffel Tower can be found in the city of", "Where is The Eiffel Tower? In"]
    sets = [set(s) for s in union.knowledge_neurons.per_prompt]
    assert set(union.neurons) == set().union(*sets)
    refined = _editor(gpt2, gpt2_tokenizer, steps=4, prompt_variants=variants, paraphrase_key="paraphrase_prompts",
                      refine=True, p=0.5).compute_edit(request)
    assert set(refined.neurons) == {n for n in set().union(*sets) if sum(n in s for s in sets) > 2}
    assert _editor(gpt2, gpt2_tokenizer, paraphrase_key="paraphrase_prompts").prompts(EIFFEL) == \
        [EIFFEL.filled_prompt]  # a request without the field has no extra prompts


def test_request_without_target_true_attributes_the_prediction(gpt2, gpt2_tokenizer):
    edit = _editor(gpt2, gpt2_tokenizer, layers=(1, 2), steps=4).compute_edit(MESSI)
    original = _greedy(gpt2, gpt2_tokenizer, MESSI.filled_prompt)
    assert edit.attributed == "prediction" and edit.attribution_ids == [original]
    forced = _editor(gpt2, gpt2_tokenizer, layers=(1, 2), steps=4,
                     attribution_target="prediction").compute_edit(EIFFEL)
    assert forced.attribution_ids == [_greedy(gpt2, gpt2_tokenizer, EIFFEL.filled_prompt)]


def test_no_selected_neuron_raises_and_applies_nothing(gpt2, gpt2_tokenizer):
    edited = EditedModel(copy.deepcopy(gpt2), gpt2_tokenizer, progress=False)
    with pytest.raises(OptimizationError, match="no neuron"):
        edited.edit(EIFFEL, method=KNConfig(threshold=1e9, steps=4))
    assert edited.edits == ()


# ------------------------------------------------------------------------------------------------ editing


def test_several_requests_in_one_compute_equal_sequential_edits(gpt2, gpt2_tokenizer):
    config = KNConfig(layers=(1, 2), steps=4)
    updates = KNEditor(config, EditContext.for_model(gpt2, gpt2_tokenizer)).compute([EIFFEL, MESSI])
    edited = EditedModel(copy.deepcopy(gpt2), gpt2_tokenizer, progress=False)
    edits = edited.edit([EIFFEL, MESSI], method=config)
    assert [(u.module, u.requests) for u in updates] == [(e.module, e.requests) for e in edits]
    for update, edit in zip(updates, edits, strict=True):
        assert torch.equal(update.A, edit.factors.A)
        torch.testing.assert_close(update.B, edit.factors.B, rtol=0, atol=0)
    assert len({e.adapter for e in edits}) == 1  # stackable: ranks add up per module (rank_pattern)


def test_an_edit_changes_the_prediction_on_the_fact_model(cf_facts_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cf_facts_path)
    base = AutoModelForCausalLM.from_pretrained(cf_facts_path, dtype=torch.float32).eval()
    request = EditRequest(prompt="{} was employed in", subject="Nancy Astor, Viscountess Astor", target_new="Paris",
                          target_true="London")
    ids = tokenizer(request.filled_prompt, return_tensors="pt")
    london, paris = tokenizer(" London")["input_ids"][0], tokenizer(" Paris")["input_ids"][0]
    assert _greedy(base, tokenizer, request.filled_prompt) == london  # the model knows the fact

    edited = EditedModel(base, tokenizer, progress=False)
    (edit,) = edited.edit(request, method=KNConfig())  # the reference: "P"+"aris" added, " London" subtracted
    with torch.no_grad():
        probs = edited(**ids).logits[0, -1].softmax(-1)
    assert edit.info["original_id"] == london and int(probs.argmax()) != london and probs[london] < 1e-3
    assert int(probs.argmax()) in edit.info["target_ids"]  # the no-space tokens of "Paris" now win
    edited.remove_edit(0)
    edited.edit(request, method=KNConfig(target_leading_space=True))
    with torch.no_grad():
        assert int(edited(**ids).logits[0, -1].argmax()) == paris


# ------------------------------------------------------------------------------------------------ bad input


def _zero_width_dropping_tokenizer(gpt2_tokenizer):
    """The GPT-2 tokenizer with a normaliser that drops zero-width spaces (as BERT's clean_text drops control
    characters): "\\u200b" tokenises to nothing, " \\u200b" to a space."""
    from tokenizers import Regex, normalizers
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(gpt2_tokenizer.backend_tokenizer)
    backend.normalizer = normalizers.Replace(Regex("\u200b"), "")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def test_bad_input_raises_before_anything_is_computed(gpt2, gpt2_tokenizer, monkeypatch):
    tokenizer = _zero_width_dropping_tokenizer(gpt2_tokenizer)
    assert tokenizer("\u200b", add_special_tokens=False)["input_ids"] == []
    assert tokenizer(" \u200b", add_special_tokens=False)["input_ids"] != []  # fine with ROME's leading space
    edited = EditedModel(copy.deepcopy(gpt2), tokenizer, progress=False)
    edited.edit(EIFFEL, method=KNConfig(layers=1, steps=2))
    before = edited(**tokenizer(EIFFEL.filled_prompt, return_tensors="pt")).logits.detach()
    calls = []
    monkeypatch.setattr(KNEditor, "compute_edit", lambda self, request: calls.append(request))
    bad_new = EditRequest(prompt=EIFFEL.prompt, subject=EIFFEL.subject, target_new="\u200b")
    with pytest.raises(InvalidRequestError, match="tokenises to nothing"):
        edited.edit([MESSI, bad_new], method=KNConfig())  # a bad request after a good one
    bad_true = EditRequest(prompt=EIFFEL.prompt, subject=EIFFEL.subject, target_new="Rome", target_true="\u200b")
    with pytest.raises(InvalidRequestError, match="target_true"):
        edited.edit(bad_true, method=KNConfig())
    long = EditRequest(prompt="{}" + " and on" * 200, subject="It", target_new="Rome")
    with pytest.raises(InvalidRequestError, match="allows 128"):
        edited.edit(long, method=KNConfig())
    with pytest.raises(LayerOutOfRangeError):
        edited.edit(MESSI, method=KNConfig(layers=(0, 7)))
    with pytest.raises(ConfigError, match="must contain"):
        edited.edit(MESSI, method=KNConfig(rewrite_module_tmp="transformer.h.0.mlp.c_proj"))
    with pytest.raises(ConfigError, match="not found"):
        edited.edit(MESSI, method=KNConfig(neuron_module_tmp="transformer.h.{}.mlp.nothing"))
    assert calls == []
    assert len(edited.edits) == 1
    assert torch.equal(edited(**tokenizer(EIFFEL.filled_prompt, return_tensors="pt")).logits, before)


def test_models_kn_cannot_edit_are_rejected(gpt2_tokenizer):
    # OPT with a projected embedding: E has width 32, the MLP output width 64
    opt = tiny_model("opt", vocab_size=len(gpt2_tokenizer), word_embed_proj_dim=32)
    with pytest.raises(UnsupportedArchitectureError, match="must agree"):
        _editor(opt, gpt2_tokenizer).validate(EIFFEL)
    # a tokenizer larger than the model's vocabulary
    small = tiny_model("gpt2", vocab_size=256)
    with pytest.raises(InvalidRequestError, match="embedding rows"):
        _editor(small, gpt2_tokenizer).validate(EIFFEL)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_attribute_prints_top_neurons_and_saves_scores(gpt2, gpt2_tokenizer, tmp_path, capsys):
    from hf_edit.cli import main

    folder = tmp_path / "model"
    gpt2.save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    out = tmp_path / "scores.safetensors"
    assert main(["attribute", "--model", str(folder), "--prompt", EIFFEL.prompt, "--subject", EIFFEL.subject,
                 "--target", "Paris", "--layers", "0", "2", "--steps", "4", "--top", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = AttributionResult.load(out)
    expected = integrated_gradients(gpt2, gpt2_tokenizer, EIFFEL.filled_prompt, "Paris", layers=[0, 2], steps=4)
    assert saved.layers == (0, 2) and saved.prompt == EIFFEL.filled_prompt
    torch.testing.assert_close(saved.scores, expected.scores)
    layer, neuron, _ = expected.top(1)[0]
    assert f"| {layer}     | {neuron}" in printed and "KN's coarse selection" in printed
    assert f"{len(coarse_neurons(expected, adaptive_threshold=0.2))} neuron(s)" in printed
    assert main(["attribute", "--model", str(folder), "--prompt", "no placeholder", "--subject", "x",
                 "--target", "Paris"]) == 2
    assert "exactly one {}" in capsys.readouterr().err
    assert main(["attribute", "--model", str(folder), "--prompt", "{} is", "--target", "Paris"]) == 2
