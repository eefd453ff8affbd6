"""Integrated-gradients attribution of MLP neurons and knowledge-neuron selection (spec §1.3-1.5, oracles §1.9).

The oracle below is written independently of :mod:`hf_edit.attribution`: one integration point at a time, one
target token at a time, full logits, plain autograd, and the reference's own hook points (GPT-2: the output of
``c_fc``; Llama: the output of ``gate_proj`` / the input of ``down_proj``).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import TINY_CONFIGS, tiny_model

from hf_edit.architecture import resolve_target
from hf_edit.attribution import (
    AttributionResult,
    coarse_neurons,
    find_knowledge_neurons,
    integrated_gradients,
    neuron_module_names,
    refine_neurons,
)
from hf_edit.errors import ConfigError, InvalidRequestError, LayerOutOfRangeError

STORY_PROMPT = "Lily went to the park to play with her"


# ------------------------------------------------------------------------------------------------ oracle


def _patch(module: torch.nn.Module, where: str, value: torch.Tensor | None):
    """Hook replacing the module's output (``where="output"``) or input (``"input"``) at (0, last) by ``value``;
    with ``value=None`` it records that vector instead."""
    seen = {}

    def out_hook(_m, _args, out):
        if value is None:
            seen["z"] = out[0, -1].detach().clone()
            return None
        out = out.clone()
        out[0, -1] = value
        return out

    def in_hook(_m, args):
        if value is None:
            seen["z"] = args[0][0, -1].detach().clone()
            return None
        x = args[0].clone()
        x[0, -1] = value
        return (x, *args[1:])

    handle = module.register_forward_hook(out_hook) if where == "output" else module.register_forward_pre_hook(in_hook)
    return handle, seen


def _prob(model, ids, token):
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)[token]


def oracle_scores(model, ids, targets, modules, where, steps, rule="reference"):
    """S[l] = mean over target tokens of z ⊙ (1/m) Σ_k ∇F_t(α_k z), computed one point at a time."""
    alphas = torch.linspace(0, 1, steps) if rule == "reference" else torch.arange(1, steps + 1) / steps
    rows = []
    for module in modules:
        handle, seen = _patch(module, where, None)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        handle.remove()
        z = seen["z"]
        total = torch.zeros_like(z, dtype=torch.float64)
        for token in targets:
            grads = torch.zeros_like(total)
            for alpha in alphas:
                point = (alpha * z).requires_grad_(True)
                handle, _ = _patch(module, where, point)
                try:
                    (grad,) = torch.autograd.grad(_prob(model, ids, token), point)
                finally:
                    handle.remove()
                grads += grad.double()
            total += z.double() * grads / steps
        rows.append(total / len(targets))
    return torch.stack(rows).float()


def _assert_close(actual, expected, rel=1e-4):
    scale = expected.abs().max()
    assert scale > 0
    assert (actual - expected).abs().max() <= rel * scale, float((actual - expected).abs().max() / scale)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer):
    return tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))


@pytest.fixture(scope="module")
def stories(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(stories_path)


# ------------------------------------------------------------------------------------------------ oracle equality


@pytest.mark.parametrize("space", ["pre_activation", "post_activation"])
def test_gpt2_matches_unbatched_oracle_with_multi_token_target(gpt2, gpt2_tokenizer, space):
    prompt, target = "The Eiffel Tower is located in the city of", "Eiffel Tower"
    targets = gpt2_tokenizer(target, add_special_tokens=False)["input_ids"]
    assert len(targets) == 4  # no leading space, several tokens: all scored at the last prompt position
    result = integrated_gradients(gpt2, gpt2_tokenizer, prompt, target, steps=6, batch_size=4, neuron_space=space)
    mlps = [block.mlp for block in gpt2.transformer.h]
    modules, where = ([m.c_fc for m in mlps], "output") if space == "pre_activation" else \
        ([m.c_proj for m in mlps], "input")
    expected = oracle_scores(gpt2, gpt2_tokenizer(prompt)["input_ids"], targets, modules, where, steps=6)
    assert result.scores.shape == (3, 128) and result.layers == (0, 1, 2)
    assert result.target_ids == tuple(targets)
    _assert_close(result.scores, expected)


@pytest.mark.parametrize("space", ["pre_activation", "post_activation"])
def test_stories_llama_matches_unbatched_oracle(stories, space):
    model, tokenizer = stories
    target_ids = tokenizer("ball", add_special_tokens=False)["input_ids"]
    assert len(target_ids) == 2
    result = integrated_gradients(model, tokenizer, STORY_PROMPT, "ball", layers=[1, -1], steps=5, batch_size=3,
                                  neuron_space=space, rule="paper")
    mlps = [model.model.layers[i].mlp for i in (1, 4)]
    modules, where = ([m.gate_proj for m in mlps], "output") if space == "pre_activation" else \
        ([m.down_proj for m in mlps], "input")
    expected = oracle_scores(model, tokenizer(STORY_PROMPT)["input_ids"], target_ids, modules, where, steps=5,
                             rule="paper")
    assert result.layers == (1, 4) and result.scores.shape == (2, 172)
    _assert_close(result.scores, expected)


def test_tiny_llama_from_config_matches_oracle_with_custom_baseline_zero():
    model = tiny_model("llama")
    ids, targets = [3, 17, 42, 9, 100], [7]
    result = integrated_gradients(model, None, ids, targets, steps=4, batch_size=5, neuron_space="post_activation",
                                  baseline=torch.zeros(128))
    expected = oracle_scores(model, ids, targets, [layer.mlp.down_proj for layer in model.model.layers], "input", 4)
    _assert_close(result.scores, expected)
    assert result.baseline == "custom"


# ------------------------------------------------------------------------------------------------ IG properties


def _prob_with_neurons(model, ids, token, module_name, value):
    """F_t with the input of ``module_name`` at the last position overwritten (``value=None``: unpatched)."""
    module = model.get_submodule(module_name)
    handle, _ = _patch(module, "input", value) if value is not None else (None, None)
    try:
        with torch.no_grad():
            return float(_prob(model, ids, token))
    finally:
        if handle is not None:
            handle.remove()


def test_completeness_gap_shrinks_with_steps(stories):
    """Σ_j S[l, j] ≈ F(z) − F(0) for one layer: relative gap below 2% at 200 steps and at least 5× smaller than at
    20 steps (the Riemann error is O(1/m); measured: 2.3e-3 → 2.3e-4 at layer 2)."""
    model, tokenizer = stories
    ids = tokenizer(STORY_PROMPT)["input_ids"]
    token = tokenizer("friend", add_special_tokens=False)["input_ids"]
    assert len(token) == 1
    down = "model.layers.2.mlp.down_proj"
    difference = _prob_with_neurons(model, ids, token[0], down, None) - \
        _prob_with_neurons(model, ids, token[0], down, torch.zeros(172))
    assert abs(difference) > 0.05
    for space in ("pre_activation", "post_activation"):
        gaps = []
        for steps in (20, 200):
            result = integrated_gradients(model, tokenizer, STORY_PROMPT, "friend", layers=2, steps=steps,
                                          batch_size=100, neuron_space=space)
            gaps.append(abs(float(result.scores.sum()) - difference) / abs(difference))
        assert gaps[1] < 0.02 and gaps[1] < gaps[0] / 5, (space, gaps)


def test_completeness_with_a_custom_baseline(stories):
    model, tokenizer = stories
    ids = tokenizer(STORY_PROMPT)["input_ids"]
    token = tokenizer("friend", add_special_tokens=False)["input_ids"][0]
    torch.manual_seed(0)
    base = 0.1 * torch.randn(172)
    down = "model.layers.3.mlp.down_proj"
    difference = _prob_with_neurons(model, ids, token, down, None) - _prob_with_neurons(model, ids, token, down, base)
    result = integrated_gradients(model, tokenizer, STORY_PROMPT, "friend", layers=[3], steps=200, batch_size=200,
                                  baseline=base, neuron_space="post_activation")
    assert abs(float(result.scores.sum()) - difference) < 0.02 * abs(difference)


def test_target_prob_is_the_unpatched_probability(stories):
    model, tokenizer = stories
    ids = tokenizer(STORY_PROMPT)["input_ids"]
    targets = tokenizer("ball", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
    result = integrated_gradients(model, tokenizer, STORY_PROMPT, "ball", layers=[0], steps=2)
    assert result.target_prob == pytest.approx(float(probs[targets].mean()), rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 7, 10, 20, 100])
def test_batched_equals_unbatched(stories, batch_size):
    """Chunks of any size (dividing ``steps`` or not, spanning layers or not) give the scores of one point per
    pass (spec §1.9.4)."""
    model, tokenizer = stories
    one = integrated_gradients(model, tokenizer, STORY_PROMPT, "ball", steps=20, batch_size=1)
    other = integrated_gradients(model, tokenizer, STORY_PROMPT, "ball", steps=20, batch_size=batch_size)
    torch.testing.assert_close(other.scores, one.scores, rtol=1e-5, atol=1e-6 * float(one.scores.abs().max()))


def test_multi_token_score_is_mean_of_single_token_scores(stories):
    model, tokenizer = stories
    a, b = tokenizer("ball", add_special_tokens=False)["input_ids"]
    ids = tokenizer(STORY_PROMPT)["input_ids"]
    both = integrated_gradients(model, None, ids, [a, b], layers=[0, 3], steps=8)
    single = [integrated_gradients(model, None, ids, [t], layers=[0, 3], steps=8).scores for t in (a, b)]
    torch.testing.assert_close(both.scores, (single[0] + single[1]) / 2, rtol=1e-5,
                               atol=1e-6 * float(both.scores.abs().max()))


def test_target_leading_space_option(gpt2, gpt2_tokenizer):
    plain = integrated_gradients(gpt2, gpt2_tokenizer, "The capital of France is", "Paris", layers=0, steps=2)
    spaced = integrated_gradients(gpt2, gpt2_tokenizer, "The capital of France is", "Paris", layers=0, steps=2,
                                  target_leading_space=True)
    assert plain.target_ids == (40313,) and spaced.target_ids == (6342,)  # "Paris" vs " Paris"


@pytest.mark.parametrize("model_type", [t for t in TINY_CONFIGS if t != "mixtral"])
def test_every_architecture_is_complete(model_type):
    """For every architecture find_layout handles, in both neuron spaces: Σ S ≈ F(z) − F(0) within 5% at 64 steps,
    where F(0) zeroes the input of the MLP output projection (act(0) = 0, so a zero pre-activation is a zero
    neuron).  The target is the token whose probability the layer's neurons change most (a well-conditioned
    difference; measured gaps at 64 steps: at most 2.2% (OPT, ReLU, pre-activation), mostly below 0.1%)."""
    model = tiny_model(model_type)
    ids, layer = [3, 17, 42, 9, 100], 1
    projection = resolve_target(model, layer).name

    def zeroed_hook(_m, args):  # OPT flattens (batch * seq, width)
        x = args[0].clone()
        x.view(-1, x.shape[-1])[len(ids) - 1] = 0
        return (x, *args[1:])

    with torch.no_grad():
        clean = model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
        handle = model.get_submodule(projection).register_forward_pre_hook(zeroed_hook)
        try:
            zero = model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
        finally:
            handle.remove()
    token = int((clean - zero).abs().argmax())
    difference = float(clean[token] - zero[token])
    for space in ("pre_activation", "post_activation"):
        result = integrated_gradients(model, None, ids, [token], layers=[layer], steps=64, batch_size=64,
                                      neuron_space=space)
        assert result.scores.shape == (1, resolve_target(model, layer).in_features)
        assert result.target_prob == pytest.approx(float(clean[token]), rel=1e-5)
        assert abs(float(result.scores.sum()) - difference) <= 0.05 * abs(difference), (space, difference)


def test_neuron_modules_per_architecture():
    assert neuron_module_names(tiny_model("gpt2"), [0]) == ["transformer.h.0.mlp.act"]
    assert neuron_module_names(tiny_model("gpt2"), [0], "post_activation") == ["transformer.h.0.mlp.c_proj"]
    assert neuron_module_names(tiny_model("llama"), [2]) == ["model.layers.2.mlp.act_fn"]
    assert neuron_module_names(tiny_model("llama"), [2], "post_activation") == ["model.layers.2.mlp.down_proj"]
    assert neuron_module_names(tiny_model("opt"), [1]) == ["model.decoder.layers.1.activation_fn"]
    assert neuron_module_names(tiny_model("bloom"), [0]) == ["transformer.h.0.mlp.gelu_impl"]


def test_explicit_neuron_module_template_equals_default():
    model = tiny_model("gpt2")
    default = integrated_gradients(model, None, [1, 2, 3], [4], steps=3)
    named = integrated_gradients(model, None, [1, 2, 3], [4], steps=3,
                                 neuron_module_template="transformer.h.{}.mlp.act")
    torch.testing.assert_close(named.scores, default.scores)
    assert named.neuron_space == "custom"


def test_peft_wrapped_model_equals_merged_model():
    """Active LoRA adapters take part in the attribution: a PeftModel scores as its merged weights do (the
    post-activation hook then sits on the LoRA wrapper of the projection)."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = tiny_model("gpt2")
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["transformer.h.1.mlp.c_proj", "transformer.h.0.mlp.c_fc"],
                        fan_in_fan_out=True, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for space in ("pre_activation", "post_activation"):
        wrapped = integrated_gradients(peft_model, None, [1, 2, 3, 4], [5], steps=4, neuron_space=space)
        plain = integrated_gradients(merged, None, [1, 2, 3, 4], [5], steps=4, neuron_space=space)
        _assert_close(wrapped.scores, plain.scores, rel=1e-4)
        assert wrapped.neuron_modules == plain.neuron_modules
    assert not torch.equal(plain.scores, integrated_gradients(base, None, [1, 2, 3, 4], [5], steps=4,
                                                              neuron_space="post_activation").scores)


# ------------------------------------------------------------------------------------------------ result object


def test_top_save_and_load(tmp_path):
    scores = torch.tensor([[0.1, 0.9, -2.0], [0.5, 0.0, 0.7]])
    result = AttributionResult(scores=scores, layers=(4, 7), target_ids=(5,), prompt="p", target="t", steps=20)
    assert result.top(3) == [(4, 1, pytest.approx(0.9)), (7, 2, pytest.approx(0.7)), (7, 0, pytest.approx(0.5))]
    assert result.top(0) == [] and len(result.top(100)) == 6
    torch.testing.assert_close(result.layer_scores(7), scores[1])
    with pytest.raises(LayerOutOfRangeError):
        result.layer_scores(5)
    folder = result.save(tmp_path / "attr")
    assert sorted(p.name for p in folder.iterdir()) == ["attribution.json", "attribution.safetensors"]
    assert json.loads((folder / "attribution.json").read_text())["layers"] == [4, 7]
    loaded = AttributionResult.load(folder)
    torch.testing.assert_close(loaded.scores, scores)
    assert loaded.metadata() == result.metadata()


def test_real_result_round_trips(gpt2, gpt2_tokenizer, tmp_path):
    result = integrated_gradients(gpt2, gpt2_tokenizer, "The capital of France is", "Paris", layers=[2], steps=2)
    loaded = AttributionResult.load(result.save(tmp_path))
    assert loaded.metadata() == result.metadata()
    torch.testing.assert_close(loaded.scores, result.scores)
    assert loaded.prompt == "The capital of France is" and loaded.model_type == "gpt2"


def test_save_to_one_safetensors_file(gpt2, gpt2_tokenizer, tmp_path):
    from safetensors.torch import load_file

    result = integrated_gradients(gpt2, gpt2_tokenizer, "The capital of France is", "Paris", layers=[0, 2], steps=2)
    path = result.save(tmp_path / "sub" / "scores.safetensors")
    assert path == tmp_path / "sub" / "scores.safetensors" and path.is_file()
    torch.testing.assert_close(load_file(str(path))["scores"], result.scores)  # a plain safetensors file
    loaded = AttributionResult.load(path)
    assert loaded.metadata() == result.metadata()
    torch.testing.assert_close(loaded.scores, result.scores)
    from safetensors.torch import save_file

    save_file({"scores": result.scores}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no hf_edit attribution metadata"):
        AttributionResult.load(tmp_path / "plain.safetensors")


# ------------------------------------------------------------------------------------------------ selection


SCORE_MAP = torch.tensor([
    [0.00, 1.00, 0.20, 0.21, -3.0],
    [0.50, 0.19, 0.20, 0.90, 0.05],
])


def test_coarse_adaptive_threshold_is_strict_and_global():
    neurons = coarse_neurons(SCORE_MAP, adaptive_threshold=0.2)  # τ = 0.2 · 1.0; 0.20 itself is excluded
    assert neurons == [(0, 1), (0, 3), (1, 0), (1, 3)]
    assert len(neurons) == int((SCORE_MAP > 0.2 * SCORE_MAP.max()).sum())
    assert coarse_neurons(SCORE_MAP, adaptive_threshold=0.6) == [(0, 1), (1, 3)]
    assert coarse_neurons(SCORE_MAP, adaptive_threshold=0.2, layers=[10, 11]) == [(10, 1), (10, 3), (11, 0), (11, 3)]


def test_coarse_threshold_on_a_result_maps_rows_to_layers():
    result = AttributionResult(scores=SCORE_MAP, layers=(3, 8), target_ids=(1,))
    assert coarse_neurons(result, threshold=0.5) == [(3, 1), (8, 3)]
    assert coarse_neurons(result, adaptive_threshold=0.2) == [(3, 1), (3, 3), (8, 0), (8, 3)]


def test_coarse_percentile_uses_numpy_percentile():
    # 10 values: the 80th percentile (linear interpolation) lies between 0.5 and 0.9, so 0.9 and 1.0 exceed it.
    assert coarse_neurons(SCORE_MAP, percentile=80) == [(0, 1), (1, 3)]
    assert coarse_neurons(SCORE_MAP, percentile=100) == []


def test_coarse_needs_exactly_one_threshold():
    with pytest.raises(ConfigError):
        coarse_neurons(SCORE_MAP)
    with pytest.raises(ConfigError):
        coarse_neurons(SCORE_MAP, threshold=0.1, adaptive_threshold=0.2)


def test_refine_keeps_neurons_shared_by_more_than_p_of_prompts():
    sets = [[(0, 1), (1, 3), (2, 2)], [(0, 1), (1, 3)], [(0, 1), (5, 5)], [(0, 1), (1, 3), (2, 2)]]
    assert refine_neurons(sets, p=0.5) == [(0, 1), (1, 3)]  # counts 4, 3 > 2; (2, 2) has 2, not > 2
    assert refine_neurons(sets, p=0.4) == [(0, 1), (1, 3), (2, 2)]  # (2, 2): 2 > 1.6
    assert refine_neurons(sets, p=0.25) == [(0, 1), (1, 3), (2, 2)]  # (5, 5): 1, not > 1
    assert refine_neurons(sets, p=0.9) == [(0, 1)]
    assert refine_neurons(sets, p=0.5, refine=False) == [(0, 1), (1, 3), (2, 2), (5, 5)]
    assert refine_neurons([[(1, 2)]], p=0.4) == [(1, 2)]  # one prompt: refinement changes nothing


def test_find_knowledge_neurons_combines_prompts(stories):
    model, tokenizer = stories
    prompts = [STORY_PROMPT, "Tom and his mom went to the park to play with a"]
    found = find_knowledge_neurons(model, tokenizer, prompts, "ball", adaptive_threshold=0.3, p=0.5, refine=True,
                                   steps=4)
    assert [coarse_neurons(r, adaptive_threshold=0.3) for r in found.attributions] == found.per_prompt
    assert found.neurons == refine_neurons(found.per_prompt, p=0.5)
    union = find_knowledge_neurons(model, tokenizer, prompts, "ball", steps=4)  # ROME: 0.2, union
    assert union.neurons == refine_neurons([coarse_neurons(r, adaptive_threshold=0.2) for r in union.attributions],
                                           refine=False)
    assert union.neurons and all(n in union.neurons for n in found.neurons)
    grouped = union.by_layer()
    assert sum(len(v) for v in grouped.values()) == len(union.neurons)
    explicit = find_knowledge_neurons(model, tokenizer, prompts, "ball", steps=4,
                                      neuron_module_template="model.layers.{}.mlp.act_fn")
    assert explicit.neurons == union.neurons


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_rejected(gpt2, gpt2_tokenizer):
    with pytest.raises(ConfigError):
        integrated_gradients(gpt2, gpt2_tokenizer, "a", "b", steps=0)
    with pytest.raises(ConfigError):
        integrated_gradients(gpt2, gpt2_tokenizer, "a", "b", batch_size=0)
    with pytest.raises(ConfigError):
        integrated_gradients(gpt2, gpt2_tokenizer, "a", "b", rule="trapezoid")
    with pytest.raises(ConfigError):
        integrated_gradients(gpt2, gpt2_tokenizer, "a", "b", neuron_space="gelu")
    with pytest.raises(ConfigError):
        integrated_gradients(gpt2, gpt2_tokenizer, "a", "b", baseline=torch.zeros(5))
    with pytest.raises(LayerOutOfRangeError):
        integrated_gradients(gpt2, gpt2_tokenizer, "a", "b", layers=[3])
    with pytest.raises(InvalidRequestError):
        integrated_gradients(gpt2, gpt2_tokenizer, "a", "")
    with pytest.raises(InvalidRequestError):
        integrated_gradients(gpt2, gpt2_tokenizer, "", "b")
    with pytest.raises(ConfigError):
        integrated_gradients(gpt2, None, "a", [1])


def test_model_state_is_restored(gpt2, gpt2_tokenizer):
    gpt2.train()
    flags = [p.requires_grad for p in gpt2.parameters()]
    integrated_gradients(gpt2, gpt2_tokenizer, "The capital of France is", "Paris", layers=0, steps=2)
    assert gpt2.training and [p.requires_grad for p in gpt2.parameters()] == flags
    assert all(p.grad is None for p in gpt2.parameters())
    gpt2.eval()
