"""The batched value optimisation (:mod:`hf_edit.values`): running each row's prefix once (a key/value cache of
the tokens before its first δ position) gives the same δ as running whole rows, on every architecture."""

from __future__ import annotations

import pytest
import torch
from helpers import one_thread
from tiny_models import tiny_model

from hf_edit import EditRequest
from hf_edit.architecture import find_layout
from hf_edit.hooks import frozen_eval
from hf_edit.values import LogitLens, ValueProblem, ValueSettings, optimise_values

FLAT = ["{}", "Hello world. {}", "It was a sunny day in the town. {}"]
REQUESTS = [EditRequest(prompt="In Paris stands {}", subject="The Eiffel Tower", target_new="Rome"),
            EditRequest(prompt="The best player is {}", subject="Lionel Messi", target_new="tennis"),
            EditRequest(prompt="She met {} yesterday", subject="Danielle Darrieux", target_new="English language"),
            # a one-token subject at the start: the bare row and the KL row have no prefix at all (fully padded)
            EditRequest(prompt="{} is the capital of", subject="Paris", target_new="Italy")]
# Bloom's forward takes no position_ids: its rows always run whole (the fallback).
ARCHITECTURES = ["gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma2", "phi", "opt",
                 "falcon", "olmo2", "bloom"]


def _run(model, module, problems, settings, *, reuse, frozen=(), lens=None, chunk_size=None):
    """δ of every problem, and how many token positions (padding included) the last decoder block ran."""
    blocks = list(model.get_submodule(find_layout(model).layers))
    sizes = []
    handle = blocks[-1].register_forward_pre_hook(
        lambda _m, args, kwargs: sizes.append((args[0] if args else kwargs["hidden_states"]).shape[:-1].numel()),
        with_kwargs=True)
    try:
        with frozen_eval(model), one_thread():  # the same summation order in every run
            results = optimise_values(model, module, problems, ValueSettings(**settings, reuse_prefix=reuse),
                                      pad_id=0, frozen=frozen, lens=lens, chunk_size=chunk_size)
    finally:
        handle.remove()
    return results, sum(sizes)


def _assert_same(cached, whole):
    assert [r.info["steps"] for r in cached] == [r.info["steps"] for r in whole]
    for a, b in zip(cached, whole):
        torch.testing.assert_close(a.init, b.init, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.delta, b.delta, rtol=0, atol=2e-5 * max(1.0, b.delta.norm().item()))
        assert a.info["nll"] == pytest.approx(b.info["nll"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_prefix_reuse_equals_whole_rows(model_type, gpt2_tokenizer):
    model = tiny_model(model_type, vocab_size=len(gpt2_tokenizer), initializer_range=0.1)
    blocks = list(model.get_submodule(find_layout(model).layers))
    problems = [ValueProblem.build(gpt2_tokenizer, [r], FLAT) for r in REQUESTS]
    # early_stop_loss makes the requests stop at different steps: the batch changes composition (a new prefix pass)
    settings = dict(num_steps=8, lr=0.5, clamp_norm_factor=4.0, early_stop_loss=8.0)
    whole, whole_tokens = _run(model, blocks[1], problems, settings, reuse=False, frozen=blocks[:2])
    cached, tokens = _run(model, blocks[1], problems, settings, reuse=True, frozen=blocks[:2])
    _assert_same(cached, whole)
    assert len({r.info["steps"] for r in whole}) > 1
    if model_type == "bloom":
        assert tokens == whole_tokens
    else:  # each step ran only the tokens from each row's first δ position on (the prefixes once per composition)
        assert tokens < 0.8 * whole_tokens


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_prefix_reuse_with_subject_slots_several_modules_and_a_lens(model_type, gpt2_tokenizer):
    """Every subject token a slot (the cut is before the subject's first token), δ on two layers' MLP outputs,
    chunks, and the NLL read through a logit lens."""
    model = tiny_model(model_type, vocab_size=len(gpt2_tokenizer), initializer_range=0.1)
    layout = find_layout(model)
    blocks = list(model.get_submodule(layout.layers))
    mlps = [model.get_submodule(layout.projection_name(i)) for i in (0, 1)]
    problems = [ValueProblem.build(gpt2_tokenizer, [r], FLAT, "subject") for r in REQUESTS]
    assert sum(p.n_slots > 1 for p in problems) == 3
    # no KL: a slot that only a KL row has (the subject's first token at the start of a sentence) then gets no
    # gradient, instead of one that is rounding noise at the first step (which Adam would scale up to ±lr)
    settings = dict(num_steps=6, lr=0.5, clamp_norm_factor=4.0, kl_factor=0.0)
    whole, whole_tokens = _run(model, mlps, problems, settings, reuse=False, chunk_size=2)
    cached, tokens = _run(model, mlps, problems, settings, reuse=True, chunk_size=2)
    _assert_same(cached, whole)
    assert tokens < whole_tokens
    lens = LogitLens(blocks[1], model.get_submodule(layout.final_norm), model.get_output_embeddings())
    whole, _ = _run(model, blocks[0], problems, settings, reuse=False, frozen=blocks[:1], lens=lens)
    cached, _ = _run(model, blocks[0], problems, settings, reuse=True, frozen=blocks[:1], lens=lens)
    _assert_same(cached, whole)


def test_a_model_that_fills_no_plain_cache_runs_whole_rows_and_is_asked_once(gpt2_tokenizer, monkeypatch):
    """When the prefix pass yields no usable cache, the rows run whole, and later batch compositions (requests that
    stop early) do not try the prefix pass again."""
    import hf_edit.values as values_module

    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), initializer_range=0.1)
    blocks = list(model.get_submodule(find_layout(model).layers))
    problems = [ValueProblem.build(gpt2_tokenizer, [r], FLAT) for r in REQUESTS]
    settings = dict(num_steps=8, lr=0.5, clamp_norm_factor=4.0, early_stop_loss=8.0)
    whole, whole_tokens = _run(model, blocks[1], problems, settings, reuse=False, frozen=blocks[:2])
    calls = []
    monkeypatch.setattr(values_module, "_prefix_states", lambda *args: calls.append(args) or None)
    refused, tokens = _run(model, blocks[1], problems, settings, reuse=True, frozen=blocks[:2])
    assert len({r.info["steps"] for r in whole}) > 1 and len(calls) == 1
    assert tokens == whole_tokens
    for a, b in zip(refused, whole):
        assert torch.equal(a.delta, b.delta) and a.info["steps"] == b.info["steps"]


def test_progress_bar_counts_every_problem_as_it_stops(gpt2_tokenizer, monkeypatch):
    """Long batches show a bar over the problems, advanced as each stops (across chunks); a single problem or
    progress=False shows none."""
    import tqdm.auto

    bars = []

    class Recorder:
        def __init__(self, total, desc, leave):
            self.total, self.desc, self.count = total, desc, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.count += n

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), initializer_range=0.1)
    blocks = list(model.get_submodule(find_layout(model).layers))
    problems = [ValueProblem.build(gpt2_tokenizer, [r], FLAT) for r in REQUESTS]
    settings = ValueSettings(num_steps=4, lr=0.5, clamp_norm_factor=4.0)
    run = lambda ps, **kw: optimise_values(model, blocks[1], ps, settings, pad_id=0, frozen=blocks[:2], **kw)
    with frozen_eval(model):
        run(problems, progress=True, description="test z", chunk_size=3)
        run(problems[:1], progress=True, description="one z")
        run(problems, description="quiet z")
    assert [(b.desc, b.total, b.count) for b in bars] == [("test z", len(problems), len(problems))]
