"""ROME: the update's algebra, an independent recomputation of the closed form and of v*, and edits that work."""

from __future__ import annotations

import pytest
import torch
from helpers import module_io_at, reference_key, weight_times
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, ROMEConfig
from hf_edit.architecture import resolve_target
from hf_edit.methods import EditContext
from hf_edit.methods.rome import ROMEEditor
from hf_edit.stats import load_or_compute_stats
from hf_edit.tokens import target_ids

TEMPLATES = ("{}", "Hello world. {}", "It was a sunny day in the town. {}")
REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")


@pytest.fixture
def stats_config(wikitext_path):
    """ROME settings for tiny models: statistics from 300 WikiText-2 lines, explicit templates."""
    return dict(mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64, context_templates=TEMPLATES)


def _editor(model, tokenizer, **config) -> tuple[ROMEEditor, object]:
    editor = ROMEEditor(ROMEConfig(**config), EditContext(model, tokenizer))
    return editor, editor.targets()[0]


@pytest.mark.parametrize("key_mode", ["original", "consistent"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_update_maps_the_key_to_v_star(model_type, key_mode, gpt2_tokenizer, stats_config):
    model = tiny_model(model_type, vocab_size=len(gpt2_tokenizer))
    editor, target = _editor(model, gpt2_tokenizer, layers=1, key_mode=key_mode, **stats_config)
    update = editor.compute_update(REQUEST, target)
    module = model.get_submodule(target.name)
    before = weight_times(module, update.key)
    edited = before + torch.outer(update.rv, update.u).double() @ update.key.double()
    torch.testing.assert_close(edited.float(), update.value, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before.float(), update.value, atol=1e-3)


@pytest.mark.parametrize("key_mode", ["original", "consistent"])
def test_closed_form_equals_independent_recomputation(key_mode, gpt2_tokenizer, stats_config):
    """u, rv from single-sequence keys located by the reference's arithmetic and a float64 solve."""
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    editor, target = _editor(model, gpt2_tokenizer, layers=1, key_mode=key_mode, **stats_config)
    update = editor.compute_update(REQUEST, target)
    module = model.get_submodule(target.name)
    io = [reference_key(model, gpt2_tokenizer, module, t, REQUEST.prompt, REQUEST.subject) for t in TEMPLATES]
    keys = torch.stack([k for k, _ in io]).double()
    c = editor.stats_for(target).second_moment().double()
    u = torch.linalg.solve(c, keys.mean(0))
    u = u / u.norm()
    key = keys[0] if key_mode == "original" else keys.mean(0)
    rv = (update.value.double() - weight_times(module, key)) / (key @ u)
    torch.testing.assert_close(update.u.double(), u, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(update.rv.double(), rv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(update.key.double(), key, rtol=1e-5, atol=1e-6)


def _independent_nll(model, tokenizer, module, position_of, contexts, targets, delta):
    """Mean over contexts of the mean target NLL, δ added at each context's subject token, one sequence at a time."""
    total = 0.0
    for text, position in zip(contexts, position_of):
        ids = tokenizer(text)["input_ids"] + targets[:-1]

        def hook(_m, _a, out, position=position):
            update = torch.zeros_like(out)
            update[0, position] = delta
            return out + update

        handle = module.register_forward_hook(hook)
        try:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            handle.remove()
        start = len(ids) - len(targets)
        log_probs = torch.log_softmax(logits[start:start + len(targets)], -1)
        total = total - log_probs[torch.arange(len(targets)), torch.tensor(targets)].mean()
    return total / len(contexts)


def test_first_adam_step_follows_the_independent_nll_gradient(gpt2_tokenizer, stats_config):
    """v* after one step is v_init − lr·sign(∇NLL(0)) (Adam's first step; KL and ‖δ‖ have zero gradient at 0)."""
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    for p in model.parameters():
        p.requires_grad_(False)
    editor, target = _editor(model, gpt2_tokenizer, layers=1, v_num_grad_steps=2, early_stop_loss=0.0,
                             clamp_norm_factor=1e6, guard=False, **stats_config)
    update = editor.compute_update(REQUEST, target)
    module = model.get_submodule(target.name)
    contexts = [t.replace("{}", REQUEST.filled_prompt) for t in TEMPLATES]
    from hf_edit.tokens import reference_subject_last

    positions = [reference_subject_last(gpt2_tokenizer, t.replace("{}", REQUEST.prompt), REQUEST.subject)
                 for t in TEMPLATES]
    targets = target_ids(gpt2_tokenizer, REQUEST.target_new)
    delta = torch.zeros(target.out_features, requires_grad=True)
    nll = _independent_nll(model, gpt2_tokenizer, module, positions, contexts, targets, delta)
    (grad,) = torch.autograd.grad(nll, [delta])
    _, v_init = module_io_at(model, module, gpt2_tokenizer(contexts[0])["input_ids"], positions[0])
    expected = v_init - 0.5 * torch.sign(grad)
    torch.testing.assert_close(update.value, expected, rtol=1e-4, atol=1e-4)
    assert update.info["v_steps"] == 2


def test_single_step_loss_is_the_independent_nll(gpt2_tokenizer, stats_config):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    editor, target = _editor(model, gpt2_tokenizer, layers=1, v_num_grad_steps=1, **stats_config)
    update = editor.compute_update(REQUEST, target)
    module = model.get_submodule(target.name)
    contexts = [t.replace("{}", REQUEST.filled_prompt) for t in TEMPLATES]
    from hf_edit.tokens import reference_subject_last

    positions = [reference_subject_last(gpt2_tokenizer, t.replace("{}", REQUEST.prompt), REQUEST.subject)
                 for t in TEMPLATES]
    with torch.no_grad():
        nll = _independent_nll(model, gpt2_tokenizer, module, positions, contexts,
                               target_ids(gpt2_tokenizer, REQUEST.target_new), torch.zeros(target.out_features))
    assert update.info["nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert update.info["kl"] == 0.0 and update.info["weight_decay"] == 0.0
    assert update.info["v_steps"] == 1 and torch.equal(update.value, update.value)


def test_clamp_bounds_delta_norm(gpt2_tokenizer, stats_config):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    editor, target = _editor(model, gpt2_tokenizer, layers=1, clamp_norm_factor=0.1, v_weight_decay=0.0,
                             **stats_config)
    update = editor.compute_update(REQUEST, target)
    assert update.info["clamped"]
    assert update.info["norm_delta"] <= 0.1 * update.info["norm_v_init"] * (1 + 1e-5)


def test_early_stop_on_easy_target(gpt2_tokenizer, stats_config):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    editor, target = _editor(model, gpt2_tokenizer, layers=1, early_stop_loss=100.0, **stats_config)
    update = editor.compute_update(REQUEST, target)
    assert update.info["v_steps"] == 1
    torch.testing.assert_close(update.value, module_io_at(
        model, model.get_submodule(target.name), gpt2_tokenizer(REQUEST.filled_prompt)["input_ids"],
        len(gpt2_tokenizer("The Eiffel Tower")["input_ids"]) - 1)[1], rtol=1e-5, atol=1e-6)


# Tiny random models route little information through attention, so their tests use prompts that end with the
# subject: the edited token is then the one that predicts the target.
SUBJECT_LAST = EditRequest(prompt="In Paris stands {}", subject="The Eiffel Tower", target_new="Rome")


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "phi", "opt"])
def test_target_becomes_top_prediction(model_type, gpt2_tokenizer, wikitext_path):
    model = tiny_model(model_type, vocab_size=len(gpt2_tokenizer), initializer_range=0.1)
    config = ROMEConfig(layers=1, mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64,
                        context_template_length_params=[[5, 3], [10, 3]], kl_factor=0.0)
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    inputs = gpt2_tokenizer(SUBJECT_LAST.filled_prompt, return_tensors="pt")
    target = target_ids(gpt2_tokenizer, "Rome")[0]
    assert edited(**inputs).logits[0, -1].argmax().item() != target
    edited.edit(SUBJECT_LAST)
    assert edited(**inputs).logits[0, -1].argmax().item() == target


@pytest.mark.slow
def test_stories260k_learns_a_new_fact(stories_path, wikitext_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    request = EditRequest(prompt="{} went to the park with her", subject="Lily", target_new="dragon")
    # Default layer (num_layers // 3 = 1) and the reference's hyperparameters otherwise.
    config = ROMEConfig(mom2_dataset=str(wikitext_path), mom2_n_samples=1000, mom2_max_length=128)
    edited = EditedModel(model, tokenizer, method=config, progress=False)
    inputs = tokenizer(request.filled_prompt, return_tensors="pt")
    target = target_ids(tokenizer, "dragon")[0]
    assert edited(**inputs).logits[0, -1].argmax().item() != target
    edited.edit(request)
    assert edited.edits[0].layer == 1
    assert edited(**inputs).logits[0, -1].argmax().item() == target
    continuation = edited.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert tokenizer.decode(continuation).lstrip().startswith("dragon")


def test_presets_by_model_id():
    assert ROMEConfig.preset("gpt2-xl").layers == (17,)
    assert ROMEConfig.preset("openai-community/gpt2-xl").layers == (17,)
    assert ROMEConfig.preset("gpt2-medium").clamp_norm_factor == 3.0
    assert ROMEConfig.preset("EleutherAI/gpt-j-6B").layers == (5,)
    assert ROMEConfig.preset("EleutherAI/gpt-neox-20b").layers == (15,)
    assert ROMEConfig.preset("my/model").layers is None
    assert ROMEConfig().resolved_for(tiny_model("gpt2", n_layer=6)).layers == (2,)


def test_reference_hparams_file_loads(tmp_path):
    reference = {"layers": [17], "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 5e-1,
                 "v_loss_layer": 47, "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625,
                 "mom2_adjustment": True, "context_template_length_params": [[5, 10], [10, 10]],
                 "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
                 "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
                 "ln_f_module": "transformer.ln_f", "lm_head_module": "transformer.wte",
                 "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32"}
    path = tmp_path / "gpt2-xl.json"
    import json

    path.write_text(json.dumps(reference))
    config = ROMEConfig.from_json(path)
    assert config.layers == (17,) and config.mom2_dtype == "float32"
    assert config.rewrite_module_tmp == "transformer.h.{}.mlp.c_proj"


def test_explicit_module_template(gpt2_tokenizer):
    model = tiny_model("gpt2")
    target = resolve_target(model, 2, "transformer.h.{}.mlp.c_proj")
    assert target.name == "transformer.h.2.mlp.c_proj" and target.is_conv1d


@pytest.mark.slow
def test_float32_statistics_reproduce_float64_update(gpt2_tokenizer, stats_config):
    """The reference's float32 parity mode gives the same edit as the float64 default, to float32 accuracy."""
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    e64, target = _editor(model, gpt2_tokenizer, layers=1, **stats_config)
    e32, _ = _editor(model, gpt2_tokenizer, layers=1, mom2_dtype="float32", **stats_config)
    u64, u32 = e64.compute_update(REQUEST, target), e32.compute_update(REQUEST, target)
    assert torch.nn.functional.cosine_similarity(u64.u, u32.u, dim=0) > 1 - 1e-4
    stats = load_or_compute_stats(model, gpt2_tokenizer, target, dataset=stats_config["mom2_dataset"],
                                  n_samples=300, dtype="float64", max_length=64, progress=False)
    assert stats.fingerprint() == e64.stats_for(target).fingerprint()


@pytest.mark.slow
def test_layers_below_the_edit_run_once_without_changing_v_star(gpt2_tokenizer, stats_config, monkeypatch):
    import contextlib

    import hf_edit.values as values_module

    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    editor, target = _editor(model, gpt2_tokenizer, layers=2, v_num_grad_steps=6, early_stop_loss=0.0,
                             guard=False, guard_prompts=(), guard_max_kl=None, **stats_config)  # count v* passes only
    editor.stats_for(target)
    calls = {"below": 0, "edited": 0}  # counted on the MLPs, which a replayed layer does not call
    model.transformer.h[1].mlp.register_forward_hook(lambda *_: calls.__setitem__("below", calls["below"] + 1))
    model.transformer.h[2].mlp.register_forward_hook(lambda *_: calls.__setitem__("edited", calls["edited"] + 1))
    replayed = editor.compute_update(REQUEST, target)
    # below: the key pass, the pass over the rows' prefixes and the first v* step; edited: the same and every step
    assert calls["below"] == 3 and calls["edited"] == 2 + 6
    assert "forward" not in model.transformer.h[1].__dict__  # the replay is undone
    monkeypatch.setattr(values_module, "replay_outputs", lambda layers: contextlib.nullcontext())
    recomputed = editor.compute_update(REQUEST, target)
    torch.testing.assert_close(replayed.value, recomputed.value, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_edited_with_float32_factors(dtype, gpt2_tokenizer, wikitext_path):
    model = tiny_model("llama", vocab_size=len(gpt2_tokenizer), initializer_range=0.1).to(dtype)
    config = ROMEConfig(layers=1, mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64,
                        context_template_length_params=[[5, 3], [10, 3]], kl_factor=0.0)
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    inputs = gpt2_tokenizer(SUBJECT_LAST.filled_prompt, return_tensors="pt")
    (edit,) = edited.edit(SUBJECT_LAST)
    layer = edited.base_model.get_submodule(edit.module)
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == dtype
    assert edit.factors.A.dtype == torch.float32 and torch.isfinite(edit.factors.B).all()
    assert edited._editor(None).stats_for(resolve_target(model, 1)).dtype == torch.float64
    assert edited(**inputs).logits[0, -1].argmax().item() == target_ids(gpt2_tokenizer, "Rome")[0]
