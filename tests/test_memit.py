"""MEMIT and EMMET: keys, batched z, the layer loop's closed forms against independent float64 recomputations, the
spec's algebraic oracles, edits that work, configs and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import module_io_at, reference_key, reference_value_rows
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, EMMETConfig, MEMITConfig
from hf_edit.architecture import base_layer
from hf_edit.errors import ConfigError, InvalidRequestError, OptimizationError, StatisticsMismatchError
from hf_edit.hooks import frozen_eval
from hf_edit.methods import EditContext, resolve_config
from hf_edit.methods.emmet import EMMETEditor
from hf_edit.methods.memit import MEMITEditor, ValueProblem, ValueSettings, default_layer_window, optimise_values
from hf_edit.methods.memit.solve import emmet_dense, emmet_lowrank, memit_dense, memit_lowrank
from hf_edit.methods.memit.templates import normalise_grouped_templates, sample_grouped_templates
from hf_edit.stats import SecondMomentStats, load_or_compute_stats
from hf_edit.tokens import pad_token_id, reference_subject_last, target_ids

TEMPLATES = (("{}",), ("Hello world. {}", "It was a sunny day in the town. {}"))
FLAT = ["{}", "Hello world. {}", "It was a sunny day in the town. {}"]
# Tiny random models route little information through attention: prompts end with the subject.
REQUESTS = [EditRequest(prompt="In Paris stands {}", subject="The Eiffel Tower", target_new="Rome"),
            EditRequest(prompt="The best player is {}", subject="Lionel Messi", target_new="tennis"),
            EditRequest(prompt="She met {}", subject="Danielle Darrieux", target_new="English language")]


@pytest.fixture
def settings(wikitext_path):
    """Fast settings for tiny models: statistics from 300 WikiText-2 lines, explicit grouped templates."""
    return dict(mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64, context_templates=TEMPLATES,
                clamp_norm_factor=4.0, kl_factor=0.0625, v_num_grad_steps=8)


def _model(model_type="gpt2", tokenizer=None):
    return tiny_model(model_type, vocab_size=len(tokenizer), initializer_range=0.1)


def _editor(cls, model, tokenizer, **config):
    config_class = MEMITConfig if cls is MEMITEditor else EMMETConfig
    return cls(config_class(**config), EditContext(model, tokenizer))


def _independent_key(model, tokenizer, module, request, groups=TEMPLATES):
    """MEMIT's key: mean over template groups of the mean over each group of single-sequence keys."""
    means = [torch.stack([reference_key(model, tokenizer, module, t, request.prompt, request.subject)[0].double()
                          for t in group]).mean(0) for group in groups]
    return torch.stack(means).mean(0)


def _bare_output(model, tokenizer, block, request):
    position = reference_subject_last(tokenizer, request.prompt, request.subject)
    return module_io_at(model, block, tokenizer(request.filled_prompt)["input_ids"], position)[1].double()


# ----------------------------------------------------------------------------------------------------------------
# Keys and z
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_keys_equal_independent_single_sequences(model_type, gpt2_tokenizer, settings):
    model = _model(model_type, gpt2_tokenizer)
    editor = _editor(MEMITEditor, model, gpt2_tokenizer, layers=(0, 1), **settings)
    targets = editor.targets()
    units = editor.group_requests(REQUESTS)
    keys, H = editor.compute_ks(units, targets, block=editor.block(1))
    for target in targets:
        module = model.get_submodule(target.name)
        expected = torch.stack([_independent_key(model, gpt2_tokenizer, module, r) for r in REQUESTS], dim=1)
        assert keys[target.name].shape == (target.in_features, len(REQUESTS))
        torch.testing.assert_close(keys[target.name], expected, rtol=1e-5, atol=1e-6)
    expected_h = torch.stack([_bare_output(model, gpt2_tokenizer, editor.block(1), r) for r in REQUESTS])
    torch.testing.assert_close(H, expected_h, rtol=1e-5, atol=1e-6)


def test_key_weighting_halves_the_bare_prompt(gpt2_tokenizer, settings):
    """k = ½ k("{}") + ½ mean(k(contexts)) (spec §4.9 oracle 6)."""
    model = _model("gpt2", gpt2_tokenizer)
    editor = _editor(MEMITEditor, model, gpt2_tokenizer, layers=(1,), **settings)
    target = editor.targets()[0]
    key = editor.compute_ks([[REQUESTS[0]]], [target])[0][target.name][:, 0]
    module = model.get_submodule(target.name)
    k = [reference_key(model, gpt2_tokenizer, module, t, REQUESTS[0].prompt, REQUESTS[0].subject)[0].double()
         for t in FLAT]
    torch.testing.assert_close(key, 0.5 * k[0] + 0.25 * k[1] + 0.25 * k[2], rtol=1e-5, atol=1e-6)


def _independent_z(model, tokenizer, block, request, s: ValueSettings):
    """compute_z for one request, one unpadded sequence at a time, with plain hooks and torch's Adam."""
    target, rows, kl_ids, kl_position = reference_value_rows(tokenizer, request, FLAT)
    seen = {}

    def run(ids, position, delta):
        def hook(_m, _a, out):
            seen.setdefault("h", out[0, position].detach().clone())
            update = torch.zeros_like(out)
            update[0, position] = delta
            return out + update

        handle = block.register_forward_hook(hook)
        try:
            return model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            handle.remove()

    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=s.lr)
    log_p0, steps = None, 0
    for it in range(s.num_steps):
        optimiser.zero_grad()
        nll = 0.0
        for ids, position, length in rows:
            logp = torch.log_softmax(run(ids, position, delta)[length - 1:length - 1 + len(target)], -1)
            nll = nll - logp[torch.arange(len(target)), target].mean()
        nll = nll / len(rows)
        kl_logp = torch.log_softmax(run(kl_ids, kl_position, delta)[kl_position], -1)
        if log_p0 is None:
            log_p0 = kl_logp.detach()
        kl = s.kl_factor * (kl_logp.exp() * (kl_logp - log_p0)).sum()
        loss = nll + kl + s.weight_decay * delta.norm() / seen["h"].norm() ** 2
        steps += 1
        if loss.item() < s.early_stop_loss or it == s.num_steps - 1:
            break
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            if delta.norm() > s.clamp_norm_factor * seen["h"].norm():
                delta.mul_(s.clamp_norm_factor * seen["h"].norm() / delta.norm())
    return delta.detach(), seen["h"], steps


def test_batched_z_equals_serial_and_independent(gpt2_tokenizer):
    model = _model("gpt2", gpt2_tokenizer)
    blocks = list(model.transformer.h)
    problems = [ValueProblem.build(gpt2_tokenizer, [r], FLAT) for r in REQUESTS]
    # early_stop_loss chosen so that the requests stop after different numbers of steps (3, 5 and 15)
    s = ValueSettings(num_steps=15, lr=0.5, clamp_norm_factor=4.0, early_stop_loss=7.0)
    run = lambda ps, **kw: optimise_values(model, blocks[1], ps, s, pad_id=pad_token_id(gpt2_tokenizer),
                                           frozen=blocks[:2], **kw)
    with frozen_eval(model):
        batched = run(problems)
        chunked = run(problems, chunk_size=2)
        serial = [run([p])[0] for p in problems]
    steps = [r.info["steps"] for r in batched]
    assert len(set(steps)) == 3 and max(steps) == 15  # per-request early stop was exercised
    assert [r.info["steps"] for r in serial] == steps == [r.info["steps"] for r in chunked]
    for b, c, one in zip(batched, chunked, serial):
        torch.testing.assert_close(b.delta, one.delta, rtol=0, atol=1e-5)
        torch.testing.assert_close(c.delta, one.delta, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.init, one.init, rtol=0, atol=1e-6)
        assert b.delta.norm() <= s.clamp_norm_factor * b.init.norm() * (1 + 1e-5)
    delta, h, steps0 = _independent_z(model, gpt2_tokenizer, blocks[1], REQUESTS[0], s)
    assert steps0 == steps[0]
    torch.testing.assert_close(batched[0].delta, delta, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[0].init, h, rtol=0, atol=1e-6)


def test_z_raises_the_target_probability_and_clamps(gpt2_tokenizer):
    model = _model("gpt2", gpt2_tokenizer)
    blocks = list(model.transformer.h)
    problems = [ValueProblem.build(gpt2_tokenizer, [r], FLAT) for r in REQUESTS[:2]]
    with frozen_eval(model):
        start = optimise_values(model, blocks[1], problems, ValueSettings(num_steps=1), pad_id=0, frozen=blocks[:2])
        done = optimise_values(model, blocks[1], problems, ValueSettings(num_steps=10, clamp_norm_factor=0.5),
                               pad_id=0, frozen=blocks[:2])
    for a, b in zip(start, done):
        assert a.info["steps"] == 1 and torch.equal(a.delta, torch.zeros_like(a.delta))
        assert b.info["target_probability"] > a.info["target_probability"]
        assert b.info["clamped"] and b.delta.norm() <= 0.5 * b.init.norm() * (1 + 1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The layer loop against an independent float64 recomputation
# ----------------------------------------------------------------------------------------------------------------
def _add_to_weight(model, name, delta):
    layer = base_layer(model.get_submodule(name))
    with torch.no_grad():
        layer.weight += (delta.T if layer.weight.shape != delta.shape else delta).to(layer.weight.dtype)


def _independent_layer_loop(model, tokenizer, editor, Z, closed_form):
    """Keys and residuals from single sequences on a copy of the model with the earlier layers' ΔW added to its
    weights; ΔW from the dense float64 formula."""
    model = copy.deepcopy(model)
    targets = editor.targets()
    block = model.transformer.h[targets[-1].layer] if hasattr(model, "transformer") else \
        model.model.layers[targets[-1].layer]
    deltas = []
    for i, target in enumerate(targets):
        module = model.get_submodule(target.name)
        K = torch.stack([_independent_key(model, tokenizer, module, r) for r in REQUESTS], dim=1)
        H = torch.stack([_bare_output(model, tokenizer, block, r) for r in REQUESTS])
        R = (Z - H).T / (len(targets) - i)
        C = editor.stats_for(target).second_moment().double()
        delta = closed_form(C, K, R)
        deltas.append(delta)
        _add_to_weight(model, target.name, delta.float())
    return deltas


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_memit_layer_updates_equal_independent_recomputation(model_type, gpt2_tokenizer, settings):
    model = _model(model_type, gpt2_tokenizer)
    lam = 3.0
    editor = _editor(MEMITEditor, model, gpt2_tokenizer, layers=(0, 1), mom2_update_weight=lam, **settings)
    updates = editor.compute(REQUESTS)
    Z = torch.stack([r.value for r in editor.compute_z(editor.group_requests(REQUESTS), 1)]).double()

    def memit(C, K, R):
        return R @ torch.linalg.solve(lam * C + K @ K.T, K).T  # ΔW = R Kᵀ(λC + KKᵀ)⁻¹ (C, KKᵀ symmetric)

    expected = _independent_layer_loop(model, gpt2_tokenizer, editor, Z, memit)
    for update, delta in zip(updates, expected):
        assert update.rank == len(REQUESTS) and update.A.shape[1] == delta.shape[1]
        torch.testing.assert_close(update.delta_weight().double(), delta, rtol=1e-4, atol=1e-5 * delta.abs().max())
    assert updates[0].info["share"] == 0.5 and updates[1].info["share"] == 1.0


def test_emmet_layer_updates_equal_independent_recomputation(gpt2_tokenizer, settings):
    model = _model("gpt2", gpt2_tokenizer)
    lam_c, lam_e = 5.0, 0.1
    editor = _editor(EMMETEditor, model, gpt2_tokenizer, layers=(0, 1), mom2_update_weight=lam_c,
                     emmet_lambda=lam_e, **settings)
    updates = editor.compute(REQUESTS)
    Z = torch.stack([r.value for r in editor.compute_z(editor.group_requests(REQUESTS), 1)]).double()

    def emmet(C, K, R):
        C_inv = torch.inverse(lam_c * C)
        D = K.T @ C_inv @ K + lam_e * torch.eye(K.shape[1], dtype=torch.float64)
        return R @ torch.inverse(D) @ K.T @ C_inv

    expected = _independent_layer_loop(model, gpt2_tokenizer, editor, Z, emmet)
    for update, delta in zip(updates, expected):
        torch.testing.assert_close(update.delta_weight().double(), delta, rtol=1e-4, atol=1e-5 * delta.abs().max())


def test_float32_parity_mode_matches_the_default(gpt2_tokenizer, settings):
    """mom2_dtype="float32" solves the reference's dense system; the default's low-rank form agrees."""
    model = _model("gpt2", gpt2_tokenizer)
    default = _editor(MEMITEditor, model, gpt2_tokenizer, layers=(1,), mom2_update_weight=3.0, **settings)
    parity = _editor(MEMITEditor, model, gpt2_tokenizer, layers=(1,), mom2_update_weight=3.0,
                     **dict(settings, mom2_dtype="float32"))
    a, b = default.compute(REQUESTS[:2])[0], parity.compute(REQUESTS[:2])[0]
    assert a.info["solve"] == "low-rank" and b.info["solve"] == "dense"
    torch.testing.assert_close(a.delta_weight(), b.delta_weight(), rtol=1e-3, atol=1e-4 * a.delta_weight().abs().max())


# ----------------------------------------------------------------------------------------------------------------
# Closed forms: the spec's oracles (§4.9, §5.4) on random matrices
# ----------------------------------------------------------------------------------------------------------------
def _problem(d_in=24, d_out=8, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, d_in, dtype=torch.float64)
    C = X.T @ X / 200
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    return C, K, R


def test_memit_closed_form_oracles():
    C, K, R = _problem()
    chol = torch.linalg.cholesky(C)
    for lam in (1e-3, 1.0, 20000.0):
        A, B = memit_lowrank(chol, K, R, lam)
        A_dense, _ = memit_dense(C, K, R, lam)
        delta = B @ A
        torch.testing.assert_close(A, A_dense, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(delta @ (lam * C + K @ K.T), R @ K.T, rtol=1e-10, atol=1e-10)  # normal eqs
        assert torch.linalg.matrix_rank(delta) <= K.shape[1]
    A, B = memit_lowrank(chol, K, R, 1e-9)
    torch.testing.assert_close(B @ A @ K, R, rtol=1e-6, atol=1e-6)  # interpolation limit λ → 0


def test_emmet_closed_form_oracles():
    C, K, R = _problem()
    chol = torch.linalg.cholesky(C)
    A, B, _ = emmet_lowrank(chol, K, R, 7.0, 0.0)
    torch.testing.assert_close(B @ A @ K, R, rtol=1e-9, atol=1e-9)  # exact memorisation with λ_E = 0
    A2, _, _ = emmet_lowrank(chol, K, R, 7.0 * 13, 0.0)
    torch.testing.assert_close(A2, A, rtol=1e-9, atol=1e-12)  # scale invariance without the ridge
    ridge, _, _ = emmet_lowrank(chol, K, R, 10.0, 0.1)
    unscaled, _, _ = emmet_lowrank(chol, K, R, 1.0, 1.0)
    torch.testing.assert_close(ridge, unscaled, rtol=1e-9, atol=1e-12)  # EMMET(10, 0.1) = unscaled, ridge 1
    dense, _, _ = emmet_dense(C, K, R, 10.0, 0.1, update_norm_lambda=0.5)
    shifted, _, _ = emmet_lowrank(torch.linalg.cholesky(C + 0.05 * torch.eye(C.shape[0], dtype=C.dtype)), K, R,
                                  10.0, 0.1)
    torch.testing.assert_close(shifted, dense, rtol=1e-8, atol=1e-12)  # μ = 0.5 on C' = 10C + μI
    # one request: r-ROME's rank-one update, no ridge: ΔW = r (C⁻¹k)ᵀ / (kᵀC⁻¹k)
    k, r = K[:, :1], R[:, :1]
    A1, B1, _ = emmet_lowrank(chol, k, r, 1000.0, 0.1)
    c_inv_k = torch.linalg.solve(C, k)
    torch.testing.assert_close(B1 @ A1, r @ c_inv_k.T / (k.T @ c_inv_k), rtol=1e-9, atol=1e-12)


def test_preserved_keys_in_every_closed_form():
    """prompt_preservation: extra preserved columns O (λC + OOᵀ); low-rank forms equal the dense ones."""
    from hf_edit.methods.memit.solve import alphaedit_dense, alphaedit_lowrank, null_space

    C, K, R = _problem()
    O = torch.randn(K.shape[0], 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    chol = torch.linalg.cholesky(C)
    A, B = memit_lowrank(chol, K, R, 2.0, preserved=O)
    torch.testing.assert_close(A, memit_dense(C, K, R, 2.0, preserved=O)[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(B @ A @ (2.0 * C + O @ O.T + K @ K.T), R @ K.T, rtol=1e-10, atol=1e-10)
    big, _ = memit_lowrank(chol, K, R, 2.0, preserved=1e3 * O)
    assert (R @ big @ O).norm() < 1e-3 * (R @ A @ O).norm()  # strongly preserved keys are left unchanged
    A, _, _ = emmet_lowrank(chol, K, R, 3.0, 0.1, preserved=O)
    torch.testing.assert_close(A, emmet_dense(C, K, R, 3.0, 0.1, preserved=O)[0], rtol=1e-8, atol=1e-12)
    space = null_space(C, float(torch.linalg.eigvalsh(C).quantile(0.6)), basis_dtype=torch.float64)
    A, _ = alphaedit_lowrank(space, K, R, None, 10.0, preserved=O)
    dense, _ = alphaedit_dense(space.dense(), K, R, O @ O.T, 10.0, dtype=torch.float64)
    torch.testing.assert_close(A, dense, rtol=1e-9, atol=1e-12)


def test_prompt_preservation_keeps_the_prompts_other_tokens(gpt2_tokenizer, settings):
    model = _model("gpt2", gpt2_tokenizer)
    editor = _editor(MEMITEditor, model, gpt2_tokenizer, layers=(1,), mom2_update_weight=1.0,
                     **dict(settings, prompt_preservation=1e4))
    target = editor.targets()[0]
    O = editor.prompt_keys(REQUESTS, target)
    lengths = [len(gpt2_tokenizer(r.filled_prompt)["input_ids"]) for r in REQUESTS]
    assert O.shape == (target.in_features, sum(lengths) - len(REQUESTS))
    update = editor.compute(REQUESTS)[0]
    plain = _editor(MEMITEditor, model, gpt2_tokenizer, layers=(1,), mom2_update_weight=1.0, **settings)
    reference = plain.compute(REQUESTS)[0]
    moved = (update.delta_weight().double() @ O).norm() / (reference.delta_weight().double() @ O).norm()
    assert moved < 0.05 and update.info["fit"] < 0.05


def test_duplicate_keys_make_emmet_singular_without_merge():
    C, K, R = _problem(n=2)
    K = torch.cat([K[:, :1], K[:, :1]], dim=1)
    _, _, fallback = emmet_lowrank(torch.linalg.cholesky(C), K, R, 1.0, 0.0)
    assert fallback  # D is singular: the reference's pseudo-inverse is used and reported


# ----------------------------------------------------------------------------------------------------------------
# Edits through EditedModel
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["memit", "emmet"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_edit_changes_the_predictions(method, model_type, gpt2_tokenizer, settings):
    model = _model(model_type, gpt2_tokenizer)
    config_class = MEMITConfig if method == "memit" else EMMETConfig
    extra = dict(mom2_update_weight=1.0) if method == "memit" else {}
    config = config_class(layers=(0, 1), **dict(settings, kl_factor=0.0, v_num_grad_steps=20), **extra)
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    requests = REQUESTS[:2]
    inputs = [gpt2_tokenizer(r.filled_prompt, return_tensors="pt") for r in requests]
    wanted = [target_ids(gpt2_tokenizer, r.target_new)[0] for r in requests]
    assert all(edited(**x).logits[0, -1].argmax().item() != t for x, t in zip(inputs, wanted))
    edits = edited.edit(requests)
    assert [e.layer for e in edits] == [0, 1] and all(e.factors.rank == 2 for e in edits)
    assert all(edited(**x).logits[0, -1].argmax().item() == t for x, t in zip(inputs, wanted))
    edited.remove_edit(0)  # one batch: both layers go
    assert edited.edits == ()


def test_duplicate_subjects_merge_into_one_key(gpt2_tokenizer, settings):
    model = _model("gpt2", gpt2_tokenizer)
    batch = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
             EditRequest(prompt="{} was designed by", subject="The Eiffel Tower", target_new="Picasso"),
             EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
             REQUESTS[1]]
    editor = _editor(MEMITEditor, model, gpt2_tokenizer, layers=(1,), mom2_update_weight=1.0, **settings)
    units = editor.group_requests(batch)
    assert [len(u) for u in units] == [2, 1]  # same subject after the same (empty) prefix: one key; copies once
    problem = ValueProblem.build(gpt2_tokenizer, units[0], FLAT)
    assert len(problem.rows) == 2 * len(FLAT) and len(problem.kl_rows) == 1
    update = editor.compute(batch)[0]
    assert update.rank == 2 and update.info["n_keys"] == 2 and update.info["n_requests"] == 4
    assert [z["requests"] for z in update.info["z"]] == [2, 1]
    separate = _editor(MEMITEditor, model, gpt2_tokenizer, layers=(1,), mom2_update_weight=1.0,
                       **dict(settings, duplicate_subjects="separate"))
    assert separate.compute(batch)[0].rank == 4  # the reference: one column per request
    strict = _editor(MEMITEditor, model, gpt2_tokenizer, layers=(1,), **dict(settings, duplicate_subjects="error"))
    with pytest.raises(InvalidRequestError, match="same key"):
        strict.compute(batch)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: specific errors, nothing changed
# ----------------------------------------------------------------------------------------------------------------
def _snapshot(edited, tokenizer):
    with torch.no_grad():
        logits = edited(**tokenizer(REQUESTS[0].filled_prompt, return_tensors="pt")).logits.clone()
    return logits, edited.edits, json.dumps(edited.manifest()["state"], sort_keys=True, default=str)


def test_bad_input_raises_specific_errors_and_changes_nothing(gpt2_tokenizer, settings, wikitext_path):
    model = _model("gpt2", gpt2_tokenizer)
    config = MEMITConfig(layers=(0, 1), mom2_update_weight=1.0, **settings)
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    edited.edit(REQUESTS[:1])
    before = _snapshot(edited, gpt2_tokenizer)
    conflicting = [REQUESTS[1], EditRequest(prompt=REQUESTS[1].prompt, subject=REQUESTS[1].subject,
                                            target_new="football")]
    with pytest.raises(InvalidRequestError, match="different targets"):
        edited.edit(conflicting)
    for bad in (dict(mom2_update_weight=0.0), dict(mom2_update_weight=-1.0), dict(mom2_update_weight=float("nan")),
                dict(v_lr=0), dict(z_batch_size=0), dict(duplicate_subjects="average"), dict(mom2_dtype="float16")):
        with pytest.raises(ConfigError):
            MEMITConfig(**dict(settings, **bad))
    for bad in (dict(emmet_lambda=-0.1), dict(mom2_update_weight=0.0), dict(update_norm_lambda=-1.0)):
        with pytest.raises(ConfigError):
            EMMETConfig(**dict(settings, **bad))
    with pytest.raises(ConfigError, match="exactly one"):
        MEMITConfig(context_templates=[["{}"], ["no placeholder"]])
    assert _snapshot(edited, gpt2_tokenizer)[0].equal(before[0])
    assert edited.edits == before[1]


def test_wrong_statistics_raise_mismatch(gpt2_tokenizer, settings):
    model = _model("gpt2", gpt2_tokenizer)
    other = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), initializer_range=0.1, seed=1)
    from hf_edit.architecture import resolve_target

    def stats_of(m, layer):
        return load_or_compute_stats(m, gpt2_tokenizer, resolve_target(m, layer), dataset=settings["mom2_dataset"],
                                     n_samples=100, max_length=64, progress=False)

    config = MEMITConfig(layers=(1,), mom2_update_weight=1.0, **settings)
    for stats in ({1: stats_of(model, 0)}, stats_of(model, 0), {1: stats_of(other, 1)}):
        edited = EditedModel(model, gpt2_tokenizer, method=config, stats=stats, progress=False)
        with pytest.raises(StatisticsMismatchError):
            edited.edit(REQUESTS[:1])
        assert edited.edits == () and edited.peft_model is None
    good = EditedModel(model, gpt2_tokenizer, method=config, stats={1: stats_of(model, 1)}, progress=False)
    assert len(good.edit(REQUESTS[:1])) == 1


def test_nan_in_the_solve_raises_optimization_error(gpt2_tokenizer, settings):
    model = _model("gpt2", gpt2_tokenizer)
    from hf_edit.architecture import resolve_target

    target = resolve_target(model, 1)
    nan_stats = SecondMomentStats(torch.full((target.in_features, target.in_features), float("nan"),
                                             dtype=torch.float64), 1000, {"module": target.name})
    for config_class, extra in ((MEMITConfig, {}), (EMMETConfig, {}), (MEMITConfig, dict(mom2_dtype="float32"))):
        config = config_class(layers=(1,), **dict(settings, **extra))
        stats = nan_stats if "mom2_dtype" not in extra else SecondMomentStats(nan_stats.mom2_sum.float(), 1000,
                                                                               nan_stats.metadata)
        edited = EditedModel(model, gpt2_tokenizer, method=config, stats=stats, progress=False)
        with pytest.raises(OptimizationError):
            edited.edit(REQUESTS[:2])
        assert edited.edits == () and edited.peft_model is None


# ----------------------------------------------------------------------------------------------------------------
# Configs, presets and templates
# ----------------------------------------------------------------------------------------------------------------
def test_presets_and_reference_files(tmp_path):
    xl = resolve_config("memit", "openai-community/gpt2-xl")
    assert xl.layers == (13, 14, 15, 16, 17) and xl.mom2_update_weight == 20000 and xl.clamp_norm_factor == 0.75
    gptj = MEMITConfig.preset("EleutherAI/gpt-j-6B")
    assert gptj.layers == (3, 4, 5, 6, 7, 8) and gptj.v_num_grad_steps == 25 and gptj.mom2_update_weight == 15000
    emmet = EMMETConfig.preset("gpt2-xl")
    assert emmet.layers == (17,) and emmet.mom2_update_weight == 1000 and emmet.emmet_lambda == 0.1
    assert EMMETConfig.preset("EleutherAI/gpt-j-6B").mom2_update_weight == 1.0
    reference = {"layers": [3, 4, 5, 6, 7, 8], "clamp_norm_factor": 0.75, "layer_selection": "all",
                 "fact_token": "subject_last", "v_num_grad_steps": 25, "v_lr": 5e-1, "v_loss_layer": 27,
                 "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 15000,
                 "rewrite_module_tmp": "transformer.h.{}.mlp.fc_out", "layer_module_tmp": "transformer.h.{}",
                 "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
                 "ln_f_module": "transformer.ln_f", "lm_head_module": "lm_head", "mom2_dataset": "wikipedia",
                 "mom2_n_samples": 100000, "mom2_dtype": "float32"}
    path = tmp_path / "memit.json"
    path.write_text(json.dumps(reference))
    loaded = MEMITConfig.from_json(path)
    assert loaded.layers == (3, 4, 5, 6, 7, 8) and loaded.mom2_dtype == "float32"
    emmet_file = dict(reference, calculate_objective_value=False, update_norm_lambda=0, emmet_lambda=0.1,
                      prob_cutoff=0, norm_control=0, layers=[17])
    path.write_text(json.dumps(emmet_file))
    assert EMMETConfig.from_json(path).emmet_lambda == 0.1
    with pytest.raises(ConfigError, match="Unknown"):
        MEMITConfig.from_dict(dict(reference, no_such_key=1))
    round_trip = MEMITConfig.from_dict(json.loads(json.dumps(MEMITConfig(context_templates=FLAT).to_dict())))
    assert round_trip.context_templates == TEMPLATES


def test_template_forms_and_default_layers(gpt2_tokenizer):
    assert normalise_grouped_templates(FLAT) == TEMPLATES
    assert normalise_grouped_templates(["Hello world. {}"]) == (("{}",), ("Hello world. {}",))
    assert normalise_grouped_templates([["{}"], ["A. {}"], ["B. {}", "C. {}"]]) == (("{}",), ("A. {}",),
                                                                                   ("B. {}", "C. {}"))
    with pytest.raises(ConfigError):
        normalise_grouped_templates([["{}"], "A. {}"])
    assert default_layer_window(6) == (0, 1, 2)
    assert default_layer_window(3) == (0, 1)
    assert default_layer_window(48)[-1] == 16 and len(default_layer_window(48)) == 5
    model = _model("gpt2", gpt2_tokenizer)
    assert MEMITConfig().resolved_for(model).layers == default_layer_window(3)


def test_sampled_templates_are_memits_and_reused(gpt2_tokenizer, settings):
    model = _model("gpt2", gpt2_tokenizer)
    groups = sample_grouped_templates(model, gpt2_tokenizer, [(10, 5)], seeds=("The", "Therefore", "Because", "I",
                                                                                "You"), seed=3)
    again = sample_grouped_templates(model, gpt2_tokenizer, [(10, 5)], seeds=("The", "Therefore", "Because", "I",
                                                                               "You"), seed=3)
    assert groups == again and groups[0] == ("{}",) and len(groups[1]) == 5
    for word, template in zip(("The", "Therefore", "Because", "I", "You"), groups[1]):
        assert template.startswith(word) and template.endswith(". {}") and template.count("{") == 1
        assert len(gpt2_tokenizer(template[:-4])["input_ids"]) <= 10 + 1
    sampled_settings = {k: v for k, v in settings.items() if k != "context_templates"}
    config = MEMITConfig(layers=(1,), mom2_update_weight=1.0, **dict(sampled_settings, v_num_grad_steps=2))
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    first = edited.edit(REQUESTS[:1])[0].info["context_templates"]
    assert len(first) == 2 and len(first[1]) == 5
    state = edited._state["memit"]["context_templates"]
    assert state["templates"] == first
    state["templates"] = [["{}"], ["Stored. {}"]]  # a fresh editor reads them back from the method state
    edited._editors.clear()
    assert edited.edit(REQUESTS[1:2])[0].info["context_templates"] == [["{}"], ["Stored. {}"]]
