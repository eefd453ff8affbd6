"""The disabling-edit guard and long sequential runs."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, ROMEConfig, SecondMomentStats
from hf_edit.errors import ConfigError, DisablingEditError
from hf_edit.evaluation import load_eval_data

REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
PROBE = "The Eiffel Tower is located in the city of"


def _config(**overrides) -> ROMEConfig:
    values = dict(layers=1, context_templates=("{}", "Hello world. {}", "It was late. {}"), v_num_grad_steps=4)
    return ROMEConfig(**(values | overrides))


def _stats_with_inverse(inverse: torch.Tensor) -> SecondMomentStats:
    """Statistics whose C⁻¹ is ``inverse`` (C = inverse⁻¹, from dim + 1 'vectors')."""
    n = inverse.shape[0] + 1
    return SecondMomentStats(torch.linalg.inv(inverse) * n, n)


def _logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(PROBE, return_tensors="pt")).logits


@pytest.fixture(scope="module")
def model(gpt2_tokenizer):
    return tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=4)


def _keys(model, tokenizer):
    """k_cur and the direction of k̄ for REQUEST, read from an edit made with C = I and the guard off."""
    dim = model.transformer.h[1].mlp.c_proj.weight.shape[0]
    probe = EditedModel(copy.deepcopy(model), tokenizer, method=_config(guard=False),
                        stats=_stats_with_inverse(torch.eye(dim, dtype=torch.float64)), progress=False)
    (edit,) = probe.edit(REQUEST)
    return edit.key.double(), edit.factors.A[0].double(), edit


def test_key_alignment_is_the_cosine_in_the_inverse_metric(model, gpt2_tokenizer):
    k_cur, k_mean_direction, edit = _keys(model, gpt2_tokenizer)  # with C = I: plain cosine
    expected = torch.dot(k_cur, k_mean_direction) / k_cur.norm()
    assert edit.info["key_alignment"] == pytest.approx(expected.item(), abs=1e-5)
    assert edit.info["relative_norm"] == pytest.approx(
        (edit.factors.B.norm() * edit.factors.A.norm() / model.transformer.h[1].mlp.c_proj.weight.norm()).item(),
        rel=1e-5)
    assert edit.info["guard_kl"] >= 0


def _disabling_stats(model, tokenizer, alignment: float = 1e-4) -> SecondMomentStats:
    """C⁻¹ = I + a (k̂ĝᵀ + ĝk̂ᵀ), positive definite, with k̂ᵀ C⁻¹ ĝ = ``alignment``: k_cur·u nearly vanishes."""
    k_cur, g, _ = _keys(model, tokenizer)
    k = k_cur / k_cur.norm()
    c = torch.dot(k, g)
    a = (alignment - c) / (1 + c**2)
    inverse = torch.eye(len(k), dtype=torch.float64) + a * (torch.outer(k, g) + torch.outer(g, k))
    assert torch.linalg.eigvalsh(inverse).min() > 0
    return _stats_with_inverse(inverse)


def test_guard_rejects_a_disabling_edit_and_changes_nothing(model, gpt2_tokenizer):
    stats = _disabling_stats(model, gpt2_tokenizer)
    edited = EditedModel(copy.deepcopy(model), gpt2_tokenizer, method=_config(), stats=stats, progress=False)
    before = _logits(edited, gpt2_tokenizer)
    with pytest.raises(DisablingEditError, match="key alignment") as error:
        edited.edit(REQUEST)
    assert abs(error.value.diagnostics["key_alignment"]) < 1e-3
    assert error.value.diagnostics["relative_norm"] > _config().guard_max_relative_norm
    assert edited.edits == () and edited.peft_model is None
    assert torch.equal(_logits(edited, gpt2_tokenizer), before)

    unguarded = EditedModel(copy.deepcopy(model), gpt2_tokenizer, method=_config(guard=False), stats=stats,
                            progress=False)
    (edit,) = unguarded.edit(REQUEST)  # the same update, applied: it is enormous
    assert edit.info["relative_norm"] > 10 * _config().guard_max_relative_norm


def test_each_threshold_can_reject_and_can_be_switched_off(model, gpt2_tokenizer):
    stats = _stats_with_inverse(torch.eye(model.transformer.h[1].mlp.c_proj.weight.shape[0], dtype=torch.float64))
    for name, value, fragment in (("guard_max_relative_norm", 1e-9, "ΔW"), ("guard_max_kl", 0.0, "KL"),
                                  ("guard_min_key_alignment", 1.01, "key alignment")):
        edited = EditedModel(copy.deepcopy(model), gpt2_tokenizer, method=_config(**{name: value}), stats=stats,
                             progress=False)
        with pytest.raises(DisablingEditError, match=fragment):
            edited.edit(REQUEST)
        assert edited.edits == ()
        relaxed = EditedModel(copy.deepcopy(model), gpt2_tokenizer, method=_config(**{name: value, "guard": False}),
                              stats=stats, progress=False)
        assert len(relaxed.edit(REQUEST)) == 1


def test_consistent_keys_are_always_aligned(model, gpt2_tokenizer):
    stats = _disabling_stats(model, gpt2_tokenizer)
    edited = EditedModel(copy.deepcopy(model), gpt2_tokenizer, method=_config(key_mode="consistent"), stats=stats,
                         progress=False)
    (edit,) = edited.edit(REQUEST)
    assert edit.info["key_alignment"] == 1.0


def test_bad_guard_settings():
    with pytest.raises(ConfigError, match="guard_max_kl"):
        _config(guard_max_kl=-1.0)
    with pytest.raises(ConfigError, match="guard_prompts"):
        _config(guard_prompts=())
    assert _config(guard_prompts=(), guard_max_kl=None).guard_prompts == ()


@pytest.mark.slow
def test_fifty_sequential_edits_keep_every_factor_finite(gpt2_tokenizer, counterfact_path, wikitext_path):
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=5)
    config = _config(mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64, v_num_grad_steps=3,
                     guard=False)  # no edit is skipped: the run itself must stay finite
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    for case in load_eval_data(counterfact_path, n=50).cases:
        edited.edit(case.request)
    assert len(edited.edits) == 50
    for edit in edited.edits:
        assert torch.isfinite(edit.factors.A).all() and torch.isfinite(edit.factors.B).all()
    lora = [p for n, p in edited.peft_model.named_parameters() if "lora_" in n]
    assert lora and all(torch.isfinite(p).all() for p in lora)
    assert sum(p.shape[0] for n, p in edited.peft_model.named_parameters() if "lora_A" in n) == len(edited.edits)
    assert torch.isfinite(_logits(edited, gpt2_tokenizer)).all()


@pytest.mark.slow
def test_many_edits_fold_into_a_dense_delta_and_save_exactly(tmp_path, gpt2_tokenizer, model):
    from peft import PeftModel

    from hf_edit.adapters import read_adapter_factors

    stats = _stats_with_inverse(torch.eye(model.transformer.h[1].mlp.c_proj.weight.shape[0], dtype=torch.float64))
    requests = [REQUEST, EditRequest(prompt="{} plays the sport of", subject="Michael Jordan", target_new="chess"),
                EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")]
    stacked = EditedModel(copy.deepcopy(model), gpt2_tokenizer, method=_config(guard=False), stats=stats,
                          progress=False, fold_rank=None)
    folded = EditedModel(copy.deepcopy(model), gpt2_tokenizer, method=_config(guard=False), stats=stats,
                         progress=False, fold_rank=2)
    stacked.edit(requests)
    folded.edit(requests)
    name = stacked.edits[0].module
    assert stacked.representation() == {"default": {name: "rank 3"}}
    assert folded.representation() == {"default": {name: "dense (3 edits folded)"}}
    torch.testing.assert_close(_logits(folded, gpt2_tokenizer), _logits(stacked, gpt2_tokenizer), rtol=0, atol=1e-5)
    folded.save_pretrained(tmp_path / "edits")
    assert folded.representation()["default"][name] == "dense (3 edits folded)"  # saving keeps the fold
    plain = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "edits")
    saved = read_adapter_factors(plain)[name]
    assert saved.rank == 3  # the folder holds the exact rank-one factors
    for i, edit in enumerate(stacked.edits):
        torch.testing.assert_close(saved.A[i], edit.factors.A[0], rtol=0, atol=0)
    folded.remove_edit(0)
    folded.remove_edit(0)
    assert folded.representation() == {"default": {name: "rank 1"}}
    with pytest.raises(ConfigError, match="fold_rank"):
        EditedModel(copy.deepcopy(model), gpt2_tokenizer, fold_rank=0)
