"""ROME's batched v*: independent requests optimised together give each the update it gets alone."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditedModel, ROMEConfig
from hf_edit.errors import HfEditError
from hf_edit.evaluation import load_eval_data


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def requests(counterfact_path):
    return [case.request for case in load_eval_data(counterfact_path, n=5).cases]


@pytest.mark.parametrize("key_mode", ["original", "consistent"])
def test_preview_equals_each_edit_alone(gpt2_tokenizer, wikitext_path, requests, key_mode):
    config = ROMEConfig(layers=1, mom2_dataset=str(wikitext_path), mom2_n_samples=200, mom2_max_length=64,
                        context_templates=("{}", "Hello world. {}", "A short story. {}"), v_num_grad_steps=6,
                        key_mode=key_mode, guard=False, v_batch_size=None)
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=3)
    edited = EditedModel(model, gpt2_tokenizer, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    previews = edited.preview_edits(requests, method=config)
    assert not edited.edits and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    steps = set()
    for request, preview in zip(requests, previews):
        assert not isinstance(preview, HfEditError)
        (alone,) = edited.edit(request, method=config, check=False)
        (batched,) = preview
        assert batched.info["v_batch"] == len(requests)
        steps.add(batched.info["v_steps"])
        assert batched.info["v_steps"] == alone.info["v_steps"]
        # v* as optimised alone, within 1e-5 (float32 rounding of differently padded batches apart)
        torch.testing.assert_close(batched.value, alone.value, rtol=0, atol=1e-5)
        torch.testing.assert_close(batched.key, alone.key, rtol=0, atol=1e-5)
        assert _relative(batched.factors.delta_weight(), alone.factors.delta_weight()) < 1e-4
        edited.remove_edit(0)
    assert len(steps) > 1 or 6 in steps  # per-request early stop is exercised when steps differ


def test_a_failing_request_is_reported_and_the_others_computed(gpt2_tokenizer, wikitext_path, requests):
    from hf_edit.methods.rome import ROMEEditor

    config = ROMEConfig(layers=1, mom2_dataset=str(wikitext_path), mom2_n_samples=200, mom2_max_length=64,
                        context_templates=("{}",), v_num_grad_steps=3, guard=False, v_batch_size=4)
    edited = EditedModel(tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=3), gpt2_tokenizer, progress=False)
    bad = requests[1].__class__(prompt="{} is", subject="Nowhere to be seen", target_new=" x")
    mixed = [requests[0], bad, requests[2]]
    original = ROMEEditor.validate

    def validate(self, request):
        if request.subject == "Nowhere to be seen":
            from hf_edit.errors import SubjectNotFoundError

            raise SubjectNotFoundError("not in this test")
        original(self, request)

    ROMEEditor.validate = validate
    try:
        previews = edited.preview_edits(mixed, method=config)
    finally:
        ROMEEditor.validate = original
    assert isinstance(previews[1], HfEditError) and "Request 1" in str(previews[1])
    assert not isinstance(previews[0], HfEditError) and not isinstance(previews[2], HfEditError)
    (alone,) = edited.edit(requests[2], method=config, check=False)
    torch.testing.assert_close(previews[2][0].value, alone.value, rtol=0, atol=1e-5)


def test_fast_mode_changes_only_the_templates(gpt2_tokenizer):
    from dataclasses import replace

    from hf_edit.methods import EditContext
    from hf_edit.methods.rome import ROMEEditor

    base = ROMEConfig.preset("gpt2-xl")
    fast = base.fast()
    assert fast.context_template_length_params == ((5, 5), (10, 5))
    assert replace(fast, context_template_length_params=base.context_template_length_params) == base
    assert ROMEConfig(context_templates=("{}", "Hi. {}")).fast().context_templates is None
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=3)
    editor = ROMEEditor(ROMEConfig(layers=1, mom2_adjustment=False).fast(), EditContext.for_model(model, gpt2_tokenizer))
    assert len(editor.templates) == 11  # the bare prompt and 10 sampled templates (the reference: 21)
