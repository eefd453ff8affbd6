"""FT / FT+L: the reference's loss and schedule, the L∞ clamp, joint training, restoration, configs."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditRequest
from hf_edit.errors import ConfigError, InvalidRequestError, LayerOutOfRangeError, OptimizationError
from hf_edit.methods.ft import (
    FT_PRESETS,
    FTL_PRESETS,
    DenseUpdate,
    FTConfig,
    FTEditor,
    autoregressive_loss,
    FTLConfig,
    prompt_last_loss,
)
from hf_edit.methods import EditContext
from hf_edit.tokens import target_ids

PARIS = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
JORDAN = EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="football")
MALL = EditRequest(prompt="The headquarters of {} are in", subject="Harrods", target_new="Kuala Lumpur")
OS = EditRequest(prompt="{}, developed by", subject="Windows 95", target_new="Saint Petersburg")

REFERENCE_JSON = {"layers": [0], "num_steps": 25, "lr": 5e-4, "weight_decay": 0, "kl_factor": 0,
                  "norm_constraint": 5e-4, "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
                  "layer_module_tmp": "transformer.h.{}", "mlp_module_tmp": "transformer.h.{}.mlp",
                  "attn_module_tmp": "transformer.h.{}.attn", "ln_f_module": "transformer.ln_f",
                  "lm_head_module": "transformer.wte"}


@pytest.fixture
def gpt2(gpt2_tokenizer):
    return tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))


def _editor(model, tokenizer, config: FTConfig) -> FTEditor:
    return FTEditor(config, EditContext(model, tokenizer))


def _compute(model, tokenizer, requests, **config) -> list[DenseUpdate]:
    return _editor(model, tokenizer, FTConfig(**config)).compute_dense(requests)


@torch.no_grad()
def _apply(model, update: DenseUpdate, sign: float = 1.0) -> None:
    layer = model.get_submodule(update.target.name)
    layer.weight += sign * update.module_delta_weight().to(layer.weight)
    if update.delta_bias is not None:
        layer.bias += sign * update.delta_bias.to(layer.bias)


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: p.grad for n, p in model.named_parameters()}, model.training)


def _assert_unchanged(model, snapshot) -> None:
    state, flags, grads, training = snapshot
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is grads[n] for n, p in model.named_parameters())
    assert model.training == training


def _next_token(model, tokenizer, request) -> int:
    with torch.no_grad():
        return int(model(**tokenizer(request.filled_prompt, return_tensors="pt")).logits[0, -1].argmax())


# -- 1. FT+L: the element-wise clamp, and no change where there is no gradient -------------------------------

@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_ftl_clamps_elementwise_and_leaves_zero_gradient_columns(model_type, gpt2_tokenizer):
    model = tiny_model(model_type, vocab_size=len(gpt2_tokenizer))
    dead = 5  # make the projection's input feature 5 exactly 0 for every token: its column gets no gradient
    with torch.no_grad():
        if model_type == "gpt2":  # c_fc is a Conv1D (in, out): zero output column 5 and its bias: gelu(0) = 0
            model.transformer.h[1].mlp.c_fc.weight[:, dead] = 0
            model.transformer.h[1].mlp.c_fc.bias[dead] = 0
        else:  # down_proj input = act(gate(x)) * up(x): zero row 5 of up_proj
            model.model.layers[1].mlp.up_proj.weight[dead] = 0
    eps = 1e-3
    (update,) = _compute(model, gpt2_tokenizer, [PARIS, JORDAN], layers=1, lr=1e-2, num_steps=4,
                         norm_constraint=eps)
    dw = update.delta_weight
    assert dw.shape == (update.target.out_features, update.target.in_features) == (64, 128)
    assert dw.dtype == torch.float32 and dw.device.type == "cpu"
    tolerance = 1e-7  # (w0 ± ε) − w0 is exact up to one rounding of w0 ± ε
    assert dw.abs().max() <= eps + tolerance
    assert dw.abs().max() >= eps - tolerance  # the clamp bit (lr 1e-2 >> ε)
    assert (dw.abs() >= eps - tolerance).float().mean() > 0.5
    assert torch.equal(dw[:, dead], torch.zeros(64))  # exactly zero, not merely small
    assert (dw[:, dead + 1] != 0).all()
    assert update.info["max_abs_delta_weight"] == float(dw.abs().max())
    assert update.info["epsilon"] == eps
    if model_type == "gpt2":
        assert update.delta_bias is not None and update.delta_bias.shape == (64,)
        assert update.delta_bias.abs().max() <= eps + tolerance
        assert update.delta_bias.abs().max() >= eps - tolerance
    else:
        assert update.delta_bias is None and update.info["max_abs_delta_bias"] is None


# -- 2. FT edits ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_ft_flips_the_prediction(model_type, gpt2_tokenizer):
    model = tiny_model(model_type, vocab_size=len(gpt2_tokenizer))
    target = target_ids(gpt2_tokenizer, PARIS.target_new)[0]
    assert _next_token(model, gpt2_tokenizer, PARIS) != target
    (update,) = _compute(model, gpt2_tokenizer, [PARIS], layers=2, lr=1e-2, num_steps=10)
    assert update.target.layer == 2 and update.info["steps"] == 10 and not update.info["early_stopped"]
    assert update.info["epoch_losses"][-1] < update.info["epoch_losses"][0]
    _apply(model, update)
    assert _next_token(model, gpt2_tokenizer, PARIS) == target


# -- 3. the loss ---------------------------------------------------------------------------------------------

def _alone(model, tokenizer, request, teacher_forced: bool) -> torch.Tensor:
    """−mean log p over the target's ids, running the request alone (no padding)."""
    prompt = tokenizer(request.filled_prompt)["input_ids"]
    targets = target_ids(tokenizer, request.target_new)
    ids = prompt + targets[:-1] if teacher_forced else prompt
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    if teacher_forced:
        return -torch.stack([log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(targets)]).mean()
    return -log_probs[-1, targets].mean()


def test_prompt_last_loss_equals_an_independent_computation(gpt2, gpt2_tokenizer):
    requests = [PARIS, MALL, OS, JORDAN]
    lengths = [len(target_ids(gpt2_tokenizer, r.target_new)) for r in requests]
    prompt_lengths = {len(gpt2_tokenizer(r.filled_prompt)["input_ids"]) for r in requests}
    assert len(set(lengths)) > 1 and len(prompt_lengths) > 1  # padding and target masking both matter
    expected = torch.stack([_alone(gpt2, gpt2_tokenizer, r, teacher_forced=False) for r in requests])
    with torch.no_grad():
        per_example = prompt_last_loss(gpt2, gpt2_tokenizer, requests, per_example=True)
        batch = prompt_last_loss(gpt2, gpt2_tokenizer, requests)
    torch.testing.assert_close(per_example.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.double(), expected.mean(), rtol=1e-5, atol=1e-5)
    # The editor trains this loss: its first epoch's loss is the loss at w0.
    (update,) = _compute(gpt2, gpt2_tokenizer, requests, layers=0, num_steps=1)
    assert update.info["epoch_losses"][0] == pytest.approx(batch.item(), rel=1e-6)


def test_autoregressive_loss_is_teacher_forced(gpt2, gpt2_tokenizer):
    requests = [PARIS, MALL, OS]
    expected = torch.stack([_alone(gpt2, gpt2_tokenizer, r, teacher_forced=True) for r in requests])
    with torch.no_grad():
        got = autoregressive_loss(gpt2, gpt2_tokenizer, requests, per_example=True)
        prompt_last = prompt_last_loss(gpt2, gpt2_tokenizer, requests, per_example=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert got[0] == pytest.approx(prompt_last[0].item(), rel=1e-6)  # one-token target: the same
    assert abs(got[1] - prompt_last[1]) > 1e-3  # two tokens: different objectives


def test_autoregressive_objective_trains_and_differs(gpt2, gpt2_tokenizer):
    common = dict(layers=1, lr=5e-3, num_steps=5)
    (autoregressive,) = _compute(gpt2, gpt2_tokenizer, [MALL], loss="autoregressive", **common)
    (prompt_last,) = _compute(gpt2, gpt2_tokenizer, [MALL], **common)
    assert autoregressive.info["objective"] == "autoregressive"
    losses = autoregressive.info["epoch_losses"]
    assert losses[-1] < losses[0]
    assert not torch.allclose(autoregressive.delta_weight, prompt_last.delta_weight, atol=1e-6)
    before = autoregressive_loss(gpt2, gpt2_tokenizer, [MALL]).item()
    _apply(gpt2, autoregressive)
    assert autoregressive_loss(gpt2, gpt2_tokenizer, [MALL]).item() < before


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_one_step_is_adam_on_the_reference_loss(model_type, gpt2_tokenizer):
    """Independent oracle: the first Adam step is −lr·g/(|g|+eps) for the gradient g of the loss at w0, in the
    module's own layout; ΔW (Linear orientation) must be its transpose for Conv1D."""
    model = tiny_model(model_type, vocab_size=len(gpt2_tokenizer))
    lr = 1e-3
    (update,) = _compute(model, gpt2_tokenizer, [PARIS, MALL], layers=1, lr=lr, num_steps=1)
    layer = model.get_submodule(update.target.name)
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    loss = prompt_last_loss(model, gpt2_tokenizer, [PARIS, MALL])
    grads = torch.autograd.grad(loss, params)
    expected = [-lr * g / (g.abs() + 1e-8) for g in grads]
    weight = expected[0].T if update.target.is_conv1d else expected[0]
    assert update.target.is_conv1d == (model_type == "gpt2")
    torch.testing.assert_close(update.delta_weight, weight, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(update.module_delta_weight(), expected[0], rtol=1e-4, atol=1e-8)
    if layer.bias is not None:
        torch.testing.assert_close(update.delta_bias, expected[1], rtol=1e-4, atol=1e-8)


# -- 4. joint training ---------------------------------------------------------------------------------------

def test_requests_are_trained_jointly(gpt2, gpt2_tokenizer):
    requests = [PARIS, JORDAN]
    common = dict(layers=1, lr=2e-3, num_steps=5)
    joint = _compute(gpt2, gpt2_tokenizer, requests, **common)
    assert len(joint) == 1 and joint[0].info["n_requests"] == 2 and joint[0].info["steps"] == 5

    (first,) = _compute(gpt2, gpt2_tokenizer, [PARIS], **common)
    _apply(gpt2, first)
    (second,) = _compute(gpt2, gpt2_tokenizer, [JORDAN], **common)
    _apply(gpt2, first, -1)
    sequential = first.delta_weight + second.delta_weight
    assert not torch.allclose(joint[0].delta_weight, sequential, atol=1e-5)

    (one_at_a_time,) = _compute(gpt2, gpt2_tokenizer, requests, batch_size=1, **common)
    assert one_at_a_time.info["steps"] == 10 and one_at_a_time.info["batches"] == 10
    assert not torch.allclose(joint[0].delta_weight, one_at_a_time.delta_weight, atol=1e-5)

    with torch.no_grad():
        before = prompt_last_loss(gpt2, gpt2_tokenizer, requests, per_example=True)
        _apply(gpt2, joint[0])
        after = prompt_last_loss(gpt2, gpt2_tokenizer, requests, per_example=True)
    assert (after < before - 0.05).all()  # both targets became more likely


def test_several_layers_train_jointly(gpt2, gpt2_tokenizer):
    updates = _compute(gpt2, gpt2_tokenizer, [PARIS], layers=(2, 0), lr=1e-3, num_steps=3)
    assert [u.target.name for u in updates] == ["transformer.h.0.mlp.c_proj", "transformer.h.2.mlp.c_proj"]
    assert all(u.delta_weight.abs().max() > 0 for u in updates)
    assert updates[0].info["steps"] == updates[1].info["steps"] == 3


# -- 5. early stop -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_constraint", [None, 1e-3])
def test_early_stop_takes_no_step(gpt2, gpt2_tokenizer, norm_constraint):
    (update,) = _compute(gpt2, gpt2_tokenizer, [PARIS, JORDAN], layers=1, lr=1e-2, early_stop_loss=1e9,
                         norm_constraint=norm_constraint, batch_size=1)
    assert update.info["steps"] == 0 and update.info["epochs"] == 1 and update.info["early_stopped"]
    assert update.info["batches"] == 2
    assert torch.equal(update.delta_weight, torch.zeros_like(update.delta_weight))
    assert torch.equal(update.delta_bias, torch.zeros_like(update.delta_bias))


# -- 6. the model is left as it was --------------------------------------------------------------------------

def test_model_is_unchanged_after_compute(gpt2, gpt2_tokenizer):
    gpt2.train()
    gpt2.transformer.wte.weight.requires_grad_(False)
    gpt2.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)
    snapshot = _snapshot(gpt2)
    (update,) = _compute(gpt2, gpt2_tokenizer, [PARIS, JORDAN], layers=1, lr=1e-2, num_steps=3)
    assert update.delta_weight.abs().max() > 0
    _assert_unchanged(gpt2, snapshot)


def test_model_is_unchanged_after_a_non_finite_loss(gpt2, gpt2_tokenizer):
    weight = gpt2.transformer.h[1].mlp.c_proj.weight
    original = weight.detach().clone()
    snapshot = _snapshot(gpt2)
    calls, changed = [], []

    def poison(_module, _args, output):
        calls.append(1)
        if len(calls) >= 3:  # two steps were taken: the weight has moved
            changed.append(not torch.equal(weight, original))
            return output * float("nan")
        return None

    handle = gpt2.transformer.ln_f.register_forward_hook(poison)
    try:
        with pytest.raises(OptimizationError, match="nan"):
            _compute(gpt2, gpt2_tokenizer, [PARIS, JORDAN], layers=1, lr=1e-2, num_steps=5, batch_size=1)
    finally:
        handle.remove()
    assert changed == [True]
    _assert_unchanged(gpt2, snapshot)


def test_half_precision_model_trains_a_float32_master(gpt2_tokenizer):
    model = tiny_model("llama", vocab_size=len(gpt2_tokenizer)).to(torch.bfloat16)
    snapshot = _snapshot(model)
    (update,) = _compute(model, gpt2_tokenizer, [PARIS], layers=1, lr=1e-3, num_steps=3, norm_constraint=5e-4)
    assert update.delta_weight.dtype == torch.float32
    assert 0 < update.delta_weight.abs().max() <= 5e-4 + 1e-7
    assert math.isfinite(update.info["loss"])
    _assert_unchanged(model, snapshot)


def test_peft_wrapped_target_trains_the_base_layer(gpt2, gpt2_tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_proj"], fan_in_fan_out=True,
                                                 init_lora_weights=False))
    snapshot = _snapshot(peft_model)
    with torch.no_grad():
        with_lora = prompt_last_loss(peft_model, gpt2_tokenizer, [PARIS]).item()
        with peft_model.disable_adapter():
            without = prompt_last_loss(peft_model, gpt2_tokenizer, [PARIS]).item()
    assert abs(with_lora - without) > 1e-4
    editor = _editor(peft_model, gpt2_tokenizer, FTConfig(layers=1, lr=1e-3, num_steps=2))
    (update,) = editor.compute_dense([PARIS])
    assert update.target.name == "transformer.h.1.mlp.c_proj" and update.target.is_conv1d
    assert update.delta_weight.shape == (64, 128) and update.delta_weight.abs().max() > 0
    assert update.info["epoch_losses"][0] == pytest.approx(with_lora, rel=1e-6)  # with the LoRA active
    _assert_unchanged(peft_model, snapshot)


# -- 7. configuration ----------------------------------------------------------------------------------------

def test_presets():
    assert FTConfig.preset("gpt2-xl") == FTConfig(layers=(1,))
    assert FTLConfig.preset("openai-community/gpt2-xl") == FTLConfig(layers=(0,), norm_constraint=5e-4)
    assert FTLConfig.preset("gpt2-medium").norm_constraint == 2e-3
    assert FTLConfig.preset("gpt2-large").norm_constraint == 1e-3
    assert FTConfig.preset("gpt2-large").layers == (1,)
    assert FTConfig.preset("EleutherAI/gpt-j-6B") == FTConfig(layers=(21,))
    assert FTConfig.preset("foo/gpt-j-6B") == FTConfig(layers=(21,))  # one preset rule for every method
    assert FTLConfig.preset("EleutherAI/gpt-j-6b") == FTLConfig(layers=(0,), norm_constraint=5e-5)
    assert FTLConfig.preset("some/model") == FTLConfig(norm_constraint=5e-4)
    assert FTLConfig.preset("some/model").resolved_for(tiny_model("gpt2")).layers == (0,)
    assert FTConfig.preset(None) == FTConfig()
    assert FTConfig(norm_constraint=5e-4).name == "ft+l" and FTConfig().name == "ft"
    for preset in (*FT_PRESETS.values(), *FTL_PRESETS.values()):
        config = FTConfig(**preset)
        assert (config.lr, config.num_steps, config.weight_decay, config.batch_size) == (5e-4, 25, 0.0, 128)


def test_default_layers(gpt2):
    assert FTConfig().resolved_for(gpt2).layers == (1,)  # FT: num_hidden_layers // 3
    assert FTConfig(norm_constraint=1e-3).resolved_for(gpt2).layers == (0,)  # FT+L: layer 0
    gpt2.config.name_or_path = "EleutherAI/gpt-j-6B"  # a preset's id gives the preset's layer
    assert FTConfig().resolved_for(gpt2).layers == (21,)
    assert FTConfig(norm_constraint=1e-3).resolved_for(gpt2).layers == (0,)
    assert FTConfig(layers=2).resolved_for(gpt2).layers == (2,)


def test_reference_json(gpt2, gpt2_tokenizer, tmp_path, caplog):
    config = FTConfig.from_dict(REFERENCE_JSON)
    assert config.layers == (0,) and config.norm_constraint == 5e-4 and config.batch_size == 128
    assert config.rewrite_module_tmp == "transformer.h.{}.mlp.c_proj" and config.loss == "prompt_last"
    assert _editor(gpt2, gpt2_tokenizer, config).targets()[0].name == "transformer.h.0.mlp.c_proj"
    path = tmp_path / "ft.json"
    path.write_text(__import__("json").dumps(config.to_dict()))
    assert FTConfig.from_json(path) == config
    assert FTConfig.from_dict(dict(REFERENCE_JSON, norm_constraint=False, batch_size=64)) == \
        FTConfig(layers=(0,), norm_constraint=None, batch_size=64,
                 rewrite_module_tmp="transformer.h.{}.mlp.c_proj")
    # The reference's `type(x) is float` quirk: an integer ε means no constraint.
    with caplog.at_level(logging.WARNING, logger="hf_edit.methods.ft"):
        assert FTConfig.from_dict(dict(REFERENCE_JSON, norm_constraint=1)).norm_constraint is None
    assert "no constraint" in caplog.text
    with pytest.raises(ConfigError, match="wd_power_law"):
        FTConfig.from_dict(dict(REFERENCE_JSON, wd_power_law=[-0.87, 0.156]))
    with pytest.raises(ConfigError, match="Unknown"):
        FTConfig.from_dict(dict(REFERENCE_JSON, v_lr=0.5))


@pytest.mark.parametrize("bad", [dict(norm_constraint=0.0), dict(norm_constraint=-1e-3),
                                 dict(norm_constraint=float("nan")), dict(norm_constraint=1),
                                 dict(norm_constraint=True), dict(kl_factor=0.1), dict(lr=0.0),
                                 dict(num_steps=0), dict(batch_size=0), dict(loss="teacher"), dict(layers=()),
                                 dict(weight_decay=-1.0)])
def test_invalid_config(bad):
    with pytest.raises(ConfigError):
        FTConfig(**bad)


def test_target_modules(gpt2, gpt2_tokenizer):
    with pytest.raises(ConfigError, match="LayerNorm"):
        _editor(gpt2, gpt2_tokenizer, FTConfig(layers=0, rewrite_module_tmp="transformer.h.{}.ln_2")
                 ).targets()
    with pytest.raises(LayerOutOfRangeError):
        _editor(gpt2, gpt2_tokenizer, FTConfig(layers=5)).targets()
    (attn,) = _compute(gpt2, gpt2_tokenizer, [PARIS], layers=2, num_steps=1,
                       rewrite_module_tmp="transformer.h.{}.attn.c_attn")
    assert attn.target.name == "transformer.h.2.attn.c_attn" and attn.delta_weight.shape == (192, 64)
    assert attn.delta_bias.shape == (192,)
    assert [t.name for t in _editor(gpt2, gpt2_tokenizer, FTConfig(layers=(2, -1))).targets()] == \
        ["transformer.h.2.mlp.c_proj"]


def test_bad_requests_fail_fast(gpt2, gpt2_tokenizer):
    editor = _editor(gpt2, gpt2_tokenizer, FTConfig(layers=0))
    with pytest.raises(InvalidRequestError):
        editor.compute_dense([])


# -- 8. storage as a full-rank LoRA --------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_factors_are_identity_times_delta(model_type, gpt2_tokenizer):
    model = tiny_model(model_type, vocab_size=len(gpt2_tokenizer))
    (update,) = _compute(model, gpt2_tokenizer, [PARIS], layers=1, lr=1e-3, num_steps=2)
    factors = update.factors()
    out_features, in_features = update.target.out_features, update.target.in_features
    assert factors.rank == out_features
    assert factors.A.shape == (out_features, in_features) and factors.B.shape == (out_features, out_features)
    assert torch.equal(factors.B, torch.eye(out_features))
    assert torch.equal(factors.B @ factors.A, update.delta_weight)
    layer = model.get_submodule(update.target.name)
    assert update.module_delta_weight().shape == layer.weight.shape
    if model_type == "gpt2":  # Conv1D stores (in, out): the module-layout delta is the transpose
        assert torch.equal(update.module_delta_weight(), update.delta_weight.T)
        assert torch.equal(factors.bias, update.delta_bias)
    else:
        assert torch.equal(update.module_delta_weight(), update.delta_weight)
        assert factors.bias is None
    # The factors reproduce the edited module: x W' + b' == base output + x Aᵀ Bᵀ + Δb.
    x = torch.randn(3, in_features)
    with torch.no_grad():
        base = layer(x)
        _apply(model, update)
        edited = layer(x)
    lora = x @ factors.A.T @ factors.B.T + (factors.bias if factors.bias is not None else 0)
    torch.testing.assert_close(edited, base + lora, rtol=1e-5, atol=1e-6)
