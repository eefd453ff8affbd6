"""AlphaEdit: the factored projector, the closed form against the dense and the paper's form, the layer loop and
the key cache against an independent float64 recomputation, state that survives save/reload, and bad state."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_memit import REQUESTS, TEMPLATES, _add_to_weight, _bare_output, _independent_key, _model
from tiny_models import tiny_model

from hf_edit import AlphaEditConfig, EditedModel, EditRequest
from hf_edit.architecture import resolve_target
from hf_edit.errors import ConfigError, StatisticsMismatchError
from hf_edit.methods import resolve_config
from hf_edit.methods.memit.solve import alphaedit_dense, alphaedit_lowrank, null_space
from hf_edit.stats import load_or_compute_stats
from hf_edit.tokens import target_ids

MORE = [EditRequest(prompt="He saw {}", subject="Michael Jordan", target_new="baseball"),
        EditRequest(prompt="They visited {}", subject="The Louvre", target_new="London")]


def _spd(d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(300, d, generator=g, dtype=torch.float64) * torch.logspace(-2, 0.5, d, dtype=torch.float64)
    return X.T @ X / 300


@pytest.mark.parametrize("quantile", [0.25, 0.75])
def test_factored_projector_equals_the_dense_one(quantile):
    C = _spd()
    eigenvalues, vectors = torch.linalg.eigh(C)
    threshold = float(eigenvalues.quantile(quantile))
    space = null_space(C, threshold, basis_dtype=torch.float64)
    kept = vectors[:, eigenvalues < threshold]
    dense = kept @ kept.T
    assert space.kind == ("null" if quantile < 0.5 else "complement")
    assert space.nullity == int((eigenvalues < threshold).sum()) == int(torch.linalg.matrix_rank(dense))
    assert space.basis.numel() <= C.numel() // 2  # never more than half of a dense projector
    P = space.dense()
    torch.testing.assert_close(P, dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-12)
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-12)
    X = torch.randn(24, 5, dtype=torch.float64)
    torch.testing.assert_close(space.apply(X), dense @ X, rtol=0, atol=1e-12)
    parity = null_space(C.float(), threshold, dtype=torch.float32)  # the reference's float32 SVD
    torch.testing.assert_close(parity.dense(), dense, rtol=0, atol=1e-4)


def test_closed_form_equals_dense_and_paper_form():
    """Spec §5.4 oracles 6 and 7: (I − P)X = 0, and X = M⁻¹PKRᵀ equals R Kᵀ P (KKᵀP + K_pK_pᵀP + αI)⁻¹."""
    C = _spd()
    eigenvalues = torch.linalg.eigvalsh(C)
    g = torch.Generator().manual_seed(1)
    K, K_p = torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randn(24, 6, generator=g,
                                                                                dtype=torch.float64)
    R = torch.randn(8, 4, generator=g, dtype=torch.float64)
    for quantile in (0.25, 0.75):
        space = null_space(C, float(eigenvalues.quantile(quantile)), basis_dtype=torch.float64)
        P = space.dense()
        for previous in (None, K_p):
            A, B = alphaedit_lowrank(space, K, R, previous, 10.0)
            cache = None if previous is None else previous @ previous.T
            A_dense, _ = alphaedit_dense(P, K, R, cache, 10.0, dtype=torch.float64)
            torch.testing.assert_close(A, A_dense, rtol=1e-9, atol=1e-12)
            delta = B @ A
            gram = K @ K.T + (0 if cache is None else cache)
            paper = R @ K.T @ P @ torch.linalg.inv(gram @ P + 10.0 * torch.eye(24, dtype=torch.float64))
            torch.testing.assert_close(delta, paper, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(delta @ (torch.eye(24, dtype=torch.float64) - P), torch.zeros_like(delta),
                                       rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Through EditedModel, against an independent recomputation
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def config(wikitext_path, gpt2_tokenizer):
    """AlphaEdit settings for the tiny GPT-2: the threshold keeps ~3/4 of C's eigen-directions editable."""
    settings = dict(layers=(0, 1), mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64,
                    context_templates=TEMPLATES, clamp_norm_factor=4.0, kl_factor=0.0, v_num_grad_steps=20, L2=0.01)
    model = _model("gpt2", gpt2_tokenizer)
    stats = load_or_compute_stats(model, gpt2_tokenizer, resolve_target(model, 1), dataset=str(wikitext_path),
                                  n_samples=300, max_length=64, progress=False)
    threshold = float(torch.linalg.eigvalsh(stats.second_moment().double()).quantile(0.75))
    return AlphaEditConfig(nullspace_threshold=threshold, **settings)


def _logits(edited, tokenizer, request):
    with torch.no_grad():
        return edited(**tokenizer(request.filled_prompt, return_tensors="pt")).logits[0, -1]


def test_edits_work_and_match_an_independent_recomputation(config, gpt2_tokenizer):
    model = _model("gpt2", gpt2_tokenizer)
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    first = edited.edit(REQUESTS[:2])
    editor = edited._editor(config)
    units = editor.group_requests(MORE)
    Z = torch.stack([r.value for r in editor.compute_z(units, 1)]).double()  # batch 2's z, on the edited model
    second = edited.edit(MORE)
    for request in REQUESTS[:2] + MORE:
        assert _logits(edited, gpt2_tokenizer, request).argmax().item() == target_ids(
            gpt2_tokenizer, request.target_new)[0]

    # independent: batch 1 merged into a copy of the base weights
    merged = _model("gpt2", gpt2_tokenizer)  # the base weights (``model`` now holds the LoRA layers)
    for e in first:
        _add_to_weight(merged, e.module, e.factors.delta_weight())
    block = merged.transformer.h[1]
    state = edited._state["alphaedit"]
    # the cache: batch 1's keys recomputed at every layer on the model with batch 1 applied (spec §5.4 oracle 8)
    cached = {t.name: torch.stack([_independent_key(merged, gpt2_tokenizer, merged.get_submodule(t.name), r)
                                   for r in REQUESTS[:2]], dim=1) for t in editor.targets()}
    for i, (target, update) in enumerate(zip(editor.targets(), second)):
        module = merged.get_submodule(target.name)
        C = editor.stats_for(target).second_moment().double()
        eigenvalues, vectors = torch.linalg.eigh(C)
        kept = vectors[:, eigenvalues < config.nullspace_threshold]
        P = kept @ kept.T
        K_p = cached[target.name]
        torch.testing.assert_close(state[f"{target.name}/keys"][:2].double(), K_p.T, rtol=1e-5, atol=1e-5)
        K = torch.stack([_independent_key(merged, gpt2_tokenizer, module, r) for r in MORE], dim=1)
        H = torch.stack([_bare_output(merged, gpt2_tokenizer, block, r) for r in MORE])
        R = (Z - H).T / (2 - i)
        M = P @ (K @ K.T + K_p @ K_p.T) + config.L2 * torch.eye(P.shape[0], dtype=torch.float64)
        delta = torch.linalg.solve(M, P @ K @ R.T).T
        got = update.factors.delta_weight().double()
        torch.testing.assert_close(got, delta, rtol=1e-3, atol=1e-4 * delta.abs().max())
        # null space: keys in the preserved span are untouched, cached keys barely move
        torch.testing.assert_close(got @ (torch.eye(P.shape[0], dtype=torch.float64) - P),
                                   torch.zeros_like(got), rtol=0, atol=1e-5 * got.abs().max())
        assert update.info["previous_keys"] == 2 and update.info["projector_kind"] == "complement"
        _add_to_weight(merged, target.name, got.float())
    assert state[f"{second[0].module}/keys"].shape[0] == 4 and state["next_batch"] == 2
    assert [b for b, _ in state[f"{second[0].module}/key_batches"]] == [0, 1]


def test_cached_keys_are_preserved(config, gpt2_tokenizer):
    """The K_p term: with the cache, the second batch's update moves the first batch's keys far less."""
    moved = {}
    for with_cache in (True, False):
        edited = EditedModel(_model("gpt2", gpt2_tokenizer), gpt2_tokenizer, method=config, progress=False)
        edited.edit(REQUESTS[:2])
        state = edited._state["alphaedit"]
        K_p = {k: v.double().T for k, v in state.items() if k.endswith("/keys")}
        if not with_cache:
            for key in [k for k in state if k.endswith(("/keys", "/key_batches"))]:
                del state[key]
        second = edited.edit(MORE)
        moved[with_cache] = max((e.factors.delta_weight().double() @ K_p[f"{e.module}/keys"]).norm().item()
                                / e.factors.delta_weight().double().norm().item() for e in second)
    assert moved[True] < 0.2 * moved[False]


def test_save_reload_continues_the_sequence_exactly(config, gpt2_tokenizer, tmp_path):
    _model("gpt2", gpt2_tokenizer).save_pretrained(tmp_path / "base")
    gpt2_tokenizer.save_pretrained(tmp_path / "base")
    straight = EditedModel.from_pretrained(tmp_path / "base", method=config, progress=False)
    straight.edit(REQUESTS[:2])
    expected = straight.edit(MORE)

    saved = EditedModel.from_pretrained(tmp_path / "base", method=config, progress=False)
    saved.edit(REQUESTS[:2])
    saved.save_pretrained(tmp_path / "edit")
    manifest = json.loads((tmp_path / "edit" / "hf_edit.json").read_text())
    assert "next_batch" in manifest["state"]["alphaedit"]
    reloaded = EditedModel.from_pretrained(tmp_path / "edit", progress=False)
    assert torch.equal(reloaded._state["alphaedit"][f"{expected[0].module}/basis"],
                       saved._state["alphaedit"][f"{expected[0].module}/basis"])
    got = reloaded.edit(MORE, method=config)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.factors.A, b.factors.A, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.factors.B, b.factors.B, rtol=0, atol=1e-6)
    for key, value in straight._state["alphaedit"].items():
        other = reloaded._state["alphaedit"][key]
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(other, value, rtol=0, atol=1e-6)
        else:
            assert other == value


def test_state_of_other_statistics_is_refused(config, gpt2_tokenizer):
    from dataclasses import replace

    edited = EditedModel(_model("gpt2", gpt2_tokenizer), gpt2_tokenizer, method=config, progress=False)
    edited.edit(REQUESTS[:2])
    state = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
             for k, v in edited._state["alphaedit"].items()}
    before = _logits(edited, gpt2_tokenizer, REQUESTS[0])
    with pytest.raises(StatisticsMismatchError, match="other statistics"):
        edited.edit(MORE, method=replace(config, mom2_n_samples=250))
    assert torch.equal(_logits(edited, gpt2_tokenizer, REQUESTS[0]), before) and len(edited.edits) == 2
    assert state.keys() == edited._state["alphaedit"].keys()
    for key, value in state.items():
        now = edited._state["alphaedit"][key]
        assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value


def test_removed_batches_leave_the_key_cache(config, gpt2_tokenizer):
    edited = EditedModel(_model("gpt2", gpt2_tokenizer), gpt2_tokenizer, method=config, progress=False)
    edited.edit(REQUESTS[:2])
    edited.edit(MORE[:1])
    edited.remove_edit(0)  # batch 0 (both layers)
    edited.edit(MORE[1:])
    state = edited._state["alphaedit"]
    module = edited.edits[0].module
    assert state[f"{module}/key_batches"] == [[1, 1], [2, 1]] and state[f"{module}/keys"].shape[0] == 2


def test_zero_null_space_and_bad_values(wikitext_path, gpt2_tokenizer):
    for bad in (dict(L2=0.0), dict(L2=-1.0), dict(nullspace_threshold=0.0), dict(nullspace_threshold=float("inf"))):
        with pytest.raises(ConfigError):
            AlphaEditConfig(**bad)
    config = AlphaEditConfig(layers=(1,), mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64,
                             context_templates=TEMPLATES, nullspace_threshold=1e-30)
    edited = EditedModel(_model("gpt2", gpt2_tokenizer), gpt2_tokenizer, method=config, progress=False)
    with pytest.raises(ConfigError, match="nullspace_threshold"):
        edited.edit(REQUESTS[:1])
    assert edited.edits == () and not edited._state["alphaedit"].get("next_batch")


def test_presets_and_reference_file(tmp_path):
    llama = resolve_config("alphaedit", "meta-llama/Meta-Llama-3-8B-Instruct")
    assert llama.layers == (4, 5, 6, 7, 8) and llama.v_lr == 0.1 and llama.v_loss_layer == 31
    assert llama.nullspace_threshold == 2e-2 and llama.L2 == 10
    xl = AlphaEditConfig.preset("gpt2-xl")
    assert xl.layers == (13, 14, 15, 16, 17) and xl.v_num_grad_steps == 20
    assert AlphaEditConfig.preset("EleutherAI/gpt-j-6B").layers == (3, 4, 5, 6, 7, 8)
    reference = {"model_name": "Llama3-8B", "layers": [4, 5, 6, 7, 8], "clamp_norm_factor": 0.75,
                 "layer_selection": "all", "fact_token": "subject_last", "v_num_grad_steps": 25, "v_lr": 1e-1,
                 "v_loss_layer": 31, "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True,
                 "mom2_update_weight": 15000, "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
                 "layer_module_tmp": "model.layers.{}", "mlp_module_tmp": "model.layers.{}.mlp",
                 "attn_module_tmp": "model.layers.{}.self_attn", "ln_f_module": "model.norm",
                 "lm_head_module": "lm_head", "mom2_dataset": "wikipedia", "mom2_n_samples": 100000,
                 "mom2_dtype": "float32", "nullspace_threshold": 2e-2, "L2": 10}
    path = tmp_path / "Llama3-8B.json"
    path.write_text(json.dumps(reference))
    loaded = AlphaEditConfig.from_json(path)
    assert loaded.layers == (4, 5, 6, 7, 8) and loaded.mom2_dtype == "float32" and loaded.L2 == 10


def test_llama_edit_and_float32_parity(config, gpt2_tokenizer):
    from dataclasses import replace

    def model():
        return tiny_model("llama", vocab_size=len(gpt2_tokenizer), initializer_range=0.1)

    default = EditedModel(model(), gpt2_tokenizer, method=replace(config, nullspace_threshold=1.0), progress=False)
    edits = default.edit(REQUESTS[:2])
    for request in REQUESTS[:2]:
        assert _logits(default, gpt2_tokenizer, request).argmax().item() == target_ids(
            gpt2_tokenizer, request.target_new)[0]
    parity = EditedModel(model(), gpt2_tokenizer, method=replace(config, nullspace_threshold=1.0, mom2_dtype="float32",
                                                               solve_dtype="float32"), progress=False)
    dense = parity.edit(REQUESTS[:2])
    assert dense[0].info["solve"] == "dense" and edits[0].info["solve"] == "low-rank"
    for a, b in zip(edits, dense):
        delta = a.factors.delta_weight()
        torch.testing.assert_close(b.factors.delta_weight(), delta, rtol=0, atol=2e-2 * delta.abs().max())
