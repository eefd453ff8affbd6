"""Context templates: the seeded top-k sampler and the validation of user-supplied templates."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from hf_edit import templates as templates_module
from hf_edit.errors import ConfigError
from hf_edit.templates import BARE_TEMPLATE, normalise_templates, sample_context_templates

LENGTHS = [[5, 3], [10, 2]]


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer):
    return tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))


def sample(model, tokenizer, length_params=LENGTHS, seed: int = 0) -> list[str]:
    return sample_context_templates(model, tokenizer, length_params, top_k=5, seed=seed)


def assert_well_formed(templates: list[str]) -> None:
    assert templates[0] == BARE_TEMPLATE
    for template in templates[1:]:
        assert template.endswith(". {}")
        assert template.count("{}") == 1
        rest = template.replace("{}", "")
        assert "{" not in rest and "}" not in rest


def test_templates_are_seeded_and_well_formed(gpt2, gpt2_tokenizer):
    torch.manual_seed(0)
    first = sample(gpt2, gpt2_tokenizer)
    torch.manual_seed(99)  # the global seed plays no part
    again = sample(gpt2, gpt2_tokenizer)
    other = sample(gpt2, gpt2_tokenizer, seed=1)
    assert first == again
    assert first != other
    assert len(first) == len(other) == 1 + sum(n for _, n in LENGTHS)
    assert_well_formed(first)
    assert_well_formed(other)
    assert len(set(first[1:])) > 1  # actually sampled, not one repeated string


def test_zero_samples_give_only_the_bare_template(gpt2, gpt2_tokenizer):
    assert sample(gpt2, gpt2_tokenizer, [[5, 0]]) == [BARE_TEMPLATE]


@pytest.mark.parametrize("bad", [[[0, 2]], [[5, -1]]])
def test_invalid_length_params(gpt2, gpt2_tokenizer, bad):
    with pytest.raises(ConfigError):
        sample(gpt2, gpt2_tokenizer, bad)


def test_braces_are_removed_from_samples(gpt2, gpt2_tokenizer):
    """With the head pushed towards brace tokens, samples are full of braces; none may reach a template."""
    brace_ids = sorted(i for token, i in gpt2_tokenizer.get_vocab().items() if "{" in token or "}" in token)
    favoured = torch.tensor(brace_ids[:4] + gpt2_tokenizer(" the")["input_ids"])  # top-5 = 4 brace tokens + " the"
    assert len(favoured) == 5

    def push(_module, _args, logits):
        bias = torch.zeros(logits.shape[-1])
        bias[favoured] = 1000.0
        return logits + bias

    handle = gpt2.lm_head.register_forward_hook(push)
    try:
        rows = templates_module._sample_continuations(gpt2, gpt2_tokenizer.eos_token_id, 4, 9, 5,
                                                      torch.Generator().manual_seed(0), torch.device("cpu"))
        templates = sample(gpt2, gpt2_tokenizer, [[10, 4]])
    finally:
        handle.remove()
    raw = gpt2_tokenizer.batch_decode(rows.tolist())
    assert sum(text.count("{") + text.count("}") for text in raw) > 10  # the model really samples braces
    assert_well_formed(templates)
    assert any("the" in t for t in templates[1:])  # the remaining text survives


def test_length_counts_the_start_token(gpt2, gpt2_tokenizer, monkeypatch):
    """[[5, 2]]: two rows of 5 tokens including the start token, i.e. 4 sampled tokens, from one start token."""
    calls, first_inputs = [], []
    sample_rows = templates_module._sample_continuations

    def spy(*args, **kwargs):
        rows = sample_rows(*args, **kwargs)
        calls.append(rows)
        return rows

    def record_first_input(_module, _args, kwargs):
        if not first_inputs:
            first_inputs.append(kwargs["input_ids"].clone())

    monkeypatch.setattr(templates_module, "_sample_continuations", spy)
    handle = gpt2.register_forward_pre_hook(record_first_input, with_kwargs=True)
    try:
        templates = sample(gpt2, gpt2_tokenizer, [[5, 2]])
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0].shape == (2, 4)
    start = gpt2_tokenizer.bos_token_id if gpt2_tokenizer.bos_token_id is not None else gpt2_tokenizer.eos_token_id
    assert first_inputs[0].tolist() == [[start], [start]]  # the start token is not part of the decoded text
    decoded = gpt2_tokenizer.batch_decode(calls[0].tolist(), skip_special_tokens=True)
    assert templates == [BARE_TEMPLATE] + [templates_module._clean(text) + ". {}" for text in decoded]


def test_sampling_leaves_global_rng_and_model_alone(gpt2, gpt2_tokenizer):
    torch.manual_seed(1234)
    rng_before = torch.random.get_rng_state()
    weights_before = {name: p.detach().clone() for name, p in gpt2.state_dict().items()}
    flags_before = (gpt2.training, [p.requires_grad for p in gpt2.parameters()])
    sample(gpt2, gpt2_tokenizer)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    after = gpt2.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in weights_before.items())
    assert (gpt2.training, [p.requires_grad for p in gpt2.parameters()]) == flags_before


# ----------------------------------------------------------------------------------------------------------------
# User templates
# ----------------------------------------------------------------------------------------------------------------
def test_bare_template_is_prepended_and_reported():
    assert normalise_templates(["Hello. {}", "It rained. {}"]) == (["{}", "Hello. {}", "It rained. {}"], True)


def test_templates_starting_with_the_bare_one_are_kept():
    assert normalise_templates(["{}", "Hello. {}"]) == (["{}", "Hello. {}"], False)


def test_bare_template_elsewhere_is_moved_to_the_front():
    templates, prepended = normalise_templates(["Hello. {}", "{}"])
    assert templates == ["{}", "Hello. {}"] and prepended


@pytest.mark.parametrize("bad", ["no placeholder", "{} and {}", "a { b. {}", "a } b. {}", "{{}}", "{0}. {}"])
def test_invalid_templates(bad):
    with pytest.raises(ConfigError, match="exactly one"):
        normalise_templates(["{}", bad])
