"""Causal tracing (hf_edit.tracing) against independent one-state-at-a-time restorations and the spec's oracles."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditRequest
from hf_edit.errors import ConfigError, SubjectNotFoundError
from hf_edit.tracing import (
    TraceProfile,
    TraceResult,
    choose_layers,
    noise_level,
    restore_window,
    scaled_window,
    suggest_layers,
    trace,
    trace_dataset,
    traced_profile,
    traces_cache_dir,
)

PROMPT = "{} is located in the city of"
SUBJECT = "The Eiffel Tower"

#: Independent module names per architecture: (layer, mlp output, attention output), ``{}`` = layer index.
NAMES = {
    "gpt2": ("transformer.h.{}", "transformer.h.{}.mlp", "transformer.h.{}.attn"),
    "llama": ("model.layers.{}", "model.layers.{}.mlp", "model.layers.{}.self_attn"),
    "gpt_neox": ("gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.attention"),
    "opt": ("model.decoder.layers.{}", "model.decoder.layers.{}.fc2", "model.decoder.layers.{}.self_attn"),
    "bloom": ("transformer.h.{}", "transformer.h.{}.mlp.dense_4h_to_h", "transformer.h.{}.self_attention.dense"),
    "falcon": ("transformer.h.{}", "transformer.h.{}.mlp", "transformer.h.{}.self_attention"),
    "gemma2": ("model.layers.{}", "model.layers.{}.mlp", "model.layers.{}.self_attn"),
}
KIND_INDEX = {"hidden": 0, "mlp": 1, "attn": 2}


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer):
    return tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=3, initializer_range=0.2)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def naive_probability(model, tokenizer, prompt, subject, answer_id, noise, seed, samples, template, restore):
    """The answer's probability averaged over samples, one forward pass per sample, restoring the modules
    ``template.format(l)`` at ``(token, l)`` for every pair in ``restore`` with plain hooks."""
    prefix, suffix = prompt.split("{}")
    enc = tokenizer(prefix + subject + suffix, return_offsets_mapping=True)
    start, end = len(prefix), len(prefix) + len(subject)
    span = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    first, stop = span[0], span[-1] + 1
    ids = torch.tensor([enc["input_ids"]])
    n = ids.shape[1]
    layers = sorted({layer for _, layer in restore})
    clean = {}

    def keep(layer):
        def hook(_m, _a, out):
            clean[layer] = _first(out).detach().reshape(n, -1).clone()
        return hook

    handles = [model.get_submodule(template.format(layer)).register_forward_hook(keep(layer)) for layer in layers]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    dim = model.get_input_embeddings().weight.shape[1]
    draws = np.random.RandomState(seed).randn(samples, stop - first, dim)
    total = 0.0
    for s in range(samples):
        def corrupt(_m, _a, out, s=s):
            out = out.clone()
            out[0, first:stop] += torch.from_numpy(draws[s] * noise).to(out.dtype)
            return out

        def restorer(layer):
            def hook(_m, _a, out):
                state = _first(out)
                new = state.reshape(n, -1).clone()
                for token, lay in restore:
                    if lay == layer:
                        new[token] = clean[layer][token]
                new = new.reshape(state.shape)
                return (new, *out[1:]) if isinstance(out, tuple) else new
            return hook

        handles = [model.get_input_embeddings().register_forward_hook(corrupt)]
        handles += [model.get_submodule(template.format(layer)).register_forward_hook(restorer(layer))
                    for layer in layers]
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        for h in handles:
            h.remove()
        total += logits.float().softmax(-1)[answer_id].item()
    return total / samples


# ---------------------------------------------------------------------------------------------------------------
# Oracles of the spec (§6.6)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,window", [("hidden", None), ("mlp", 2), ("attn", 3), ("hidden", 2)])
def test_indirect_effect_equals_independent_restoration(gpt2, gpt2_tokenizer, kind, window):
    result = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, kind=kind, samples=3, noise=2.0, window=window, seed=5,
                   batch_size=17)
    template = NAMES["gpt2"][KIND_INDEX[kind]]
    L = result.n_layers
    args = (gpt2, gpt2_tokenizer, PROMPT, SUBJECT, result.answer_id, 2.0, 5, 3, template)
    assert result.low_score == pytest.approx(naive_probability(*args, []), rel=1e-4)
    for token, layer in [(result.subject_last, 0), (result.subject_last, 1), (1, 2), (len(result.tokens) - 1, 1)]:
        width = result.window
        restore = [(token, lay) for lay in restore_window(layer, L, width)]
        expected = naive_probability(*args, restore)
        assert result.scores[token, layer].item() == pytest.approx(expected, rel=1e-4)
        assert result.effect[token, layer].item() == pytest.approx(expected - result.low_score, rel=1e-3, abs=1e-9)


def test_clean_probability_and_answer(gpt2, gpt2_tokenizer):
    result = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, samples=2)
    ids = torch.tensor([result.input_ids])
    with torch.no_grad():
        probs = gpt2(ids).logits[0, -1].softmax(-1)
    assert result.answer_id == int(probs.argmax())
    assert result.high_score == pytest.approx(probs.max().item(), rel=1e-5)
    assert result.answer == gpt2_tokenizer.decode([result.answer_id])
    assert result.tokens == [gpt2_tokenizer.decode([i]) for i in result.input_ids]
    assert "".join(result.tokens[slice(*result.subject_range)]).strip() == SUBJECT
    given = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, target="Paris", samples=2)
    assert given.answer_id == gpt2_tokenizer(" Paris")["input_ids"][0]
    assert given.high_score == pytest.approx(probs[given.answer_id].item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_zero_noise_changes_nothing(gpt2, gpt2_tokenizer, kind):
    result = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, kind=kind, samples=2, noise=0.0)
    assert result.low_score == pytest.approx(result.high_score, rel=1e-5)
    torch.testing.assert_close(result.scores, torch.full_like(result.scores, result.high_score), rtol=1e-5, atol=0)


def test_full_recovery_at_last_layer_last_token(gpt2, gpt2_tokenizer):
    result = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, kind="hidden", samples=4, noise=3.0)
    last, top = len(result.tokens) - 1, result.n_layers - 1
    assert abs(result.high_score - result.low_score) > 1e-3 * result.high_score  # the corruption does something
    assert result.scores[last, top].item() == pytest.approx(result.high_score, rel=1e-5)
    # The last layer's state at earlier tokens cannot reach the last position's logits.
    torch.testing.assert_close(result.scores[:last, top], torch.full((last,), result.low_score), rtol=1e-5, atol=0)
    # Nothing before the subject is corrupted: restoring it is a no-op.
    if result.subject_range[0] > 0:
        torch.testing.assert_close(result.scores[0], torch.full((result.n_layers,), result.low_score), rtol=1e-5,
                                   atol=0)


def test_restoring_every_hidden_state_recovers_clean(gpt2, gpt2_tokenizer):
    """With a window covering all layers, restoring block outputs at every subject token restores the clean run;
    checked with the independent hook implementation (the traced cells restore one token at a time)."""
    result = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, kind="hidden", samples=2, noise=3.0)
    L = result.n_layers
    restore = [(t, layer) for t in range(len(result.tokens)) for layer in range(L)]
    recovered = naive_probability(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, result.answer_id, 3.0, 0, 2,
                                  NAMES["gpt2"][0], restore)
    assert recovered == pytest.approx(result.high_score, rel=1e-5)


def test_deterministic_and_batch_size_invariant(gpt2, gpt2_tokenizer):
    a = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, kind="mlp", window=2, samples=3, noise=1.5, seed=2)
    b = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, kind="mlp", window=2, samples=3, noise=1.5, seed=2)
    assert torch.equal(a.scores, b.scores) and a.low_score == b.low_score
    c = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, kind="mlp", window=2, samples=3, noise=1.5, seed=2,
              batch_size=5)
    torch.testing.assert_close(a.scores, c.scores, rtol=1e-4, atol=1e-9)
    d = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, kind="mlp", window=2, samples=3, noise=1.5, seed=3)
    assert not torch.equal(a.scores, d.scores)


def test_default_noise_is_three_sigma_of_subject_embeddings(gpt2, gpt2_tokenizer):
    ids = gpt2_tokenizer(SUBJECT)["input_ids"]
    expected = 3 * gpt2.transformer.wte.weight[ids].detach().double().std().item()
    assert noise_level(gpt2, gpt2_tokenizer, [SUBJECT]) == pytest.approx(expected, rel=1e-9)
    result = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, samples=2)
    assert result.noise == pytest.approx(expected, rel=1e-9)
    both = ["The Eiffel Tower", "Danielle Darrieux"]
    all_ids = [i for s in both for i in gpt2_tokenizer(s)["input_ids"]]
    expected2 = 3 * gpt2.transformer.wte.weight[all_ids].detach().double().std().item()
    requests = [EditRequest(PROMPT, s, "Rome") for s in both]
    profile = trace_dataset(gpt2, gpt2_tokenizer, requests, samples=1, window=1, progress=False)
    assert profile.noise == pytest.approx(expected2, rel=1e-9)


def test_restore_window_matches_reference():
    assert list(restore_window(2, 48, 10)) == list(range(7))
    assert list(restore_window(46, 48, 10)) == list(range(41, 48))
    assert list(restore_window(17, 48, 10)) == list(range(12, 22))
    assert list(restore_window(3, 6, 1)) == [3]
    assert [scaled_window(n) for n in (48, 28, 12, 6, 2)] == [10, 6, 2, 1, 1]


def test_prompt_forms_positions_and_errors(gpt2, gpt2_tokenizer):
    a = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, samples=2, noise=1.0)
    b = trace(gpt2, gpt2_tokenizer, PROMPT.format(SUBJECT), SUBJECT, samples=2, noise=1.0, positions=[-1, 3])
    assert a.input_ids == b.input_ids and a.subject_range == b.subject_range
    traced = [3, len(a.tokens) - 1]
    torch.testing.assert_close(a.scores[traced], b.scores[traced], rtol=1e-4, atol=1e-9)
    assert torch.isnan(b.scores[0]).all()
    with pytest.raises(SubjectNotFoundError):
        trace(gpt2, gpt2_tokenizer, "Paris is a city", "Rome")
    with pytest.raises(ConfigError):
        trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, kind="resid")
    with pytest.raises(ConfigError):
        trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, samples=0)


# ---------------------------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox", "opt", "bloom", "falcon", "gemma2"])
def test_architectures(gpt2_tokenizer, model_type):
    model = tiny_model(model_type, vocab_size=len(gpt2_tokenizer), seed=1, initializer_range=0.2)
    hidden = trace(model, gpt2_tokenizer, PROMPT, SUBJECT, kind="hidden", samples=2, noise=2.0)
    L, T = model.config.num_hidden_layers, len(hidden.tokens)
    assert hidden.scores.shape == (T, L)
    assert hidden.scores[T - 1, L - 1].item() == pytest.approx(hidden.high_score, rel=1e-4)
    for kind in ("mlp", "attn"):
        result = trace(model, gpt2_tokenizer, PROMPT, SUBJECT, kind=kind, samples=2, noise=2.0, window=1,
                       positions=[hidden.subject_last, T - 1])
        template = NAMES[model_type][KIND_INDEX[kind]]
        for token in (hidden.subject_last, T - 1):
            expected = naive_probability(model, gpt2_tokenizer, PROMPT, SUBJECT, result.answer_id, 2.0, 0, 2,
                                         template, [(token, 1)])
            assert result.scores[token, 1].item() == pytest.approx(expected, rel=1e-4), (kind, token)
        clean = trace(model, gpt2_tokenizer, PROMPT, SUBJECT, kind=kind, samples=1, noise=0.0, window=1,
                      positions=[T - 1])
        assert clean.scores[T - 1].tolist() == pytest.approx([clean.high_score] * L, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Data sets, layer choice, cache, plots
# ---------------------------------------------------------------------------------------------------------------
REQUESTS = [
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": "piano"}},
    {"case_id": 7, "requested_rewrite": {"prompt": "{}, which is located in",
                                         "subject": "Autonomous University of Madrid",
                                         "target_new": {"str": "Sweden"}, "target_true": {"str": "Spain"}}},
]


def test_trace_dataset_matches_single_traces(gpt2, gpt2_tokenizer):
    """Facts of different lengths share padded batches; each equals its own single-fact trace."""
    profile = trace_dataset(gpt2, gpt2_tokenizer, REQUESTS, kind="mlp", samples=3, noise=1.5, window=2,
                            require_correct=False, batch_size=40, progress=False)
    assert profile.n == 4 and profile.n_skipped == 0 and profile.effects.shape == (4, 3)
    assert profile.case_ids == [None, None, None, 7]
    for i, (request, effect) in enumerate(zip(REQUESTS, profile.effects)):
        from hf_edit.requests import as_request
        req = as_request(request)
        single = trace(gpt2, gpt2_tokenizer, req.prompt, req.subject, kind="mlp", samples=3, noise=1.5, window=2)
        torch.testing.assert_close(effect, single.effect[single.subject_last], rtol=1e-3, atol=1e-9)
        assert profile.low_scores[i].item() == pytest.approx(single.low_score, rel=1e-4)
    torch.testing.assert_close(profile.mean, profile.effects.mean(0))
    torch.testing.assert_close(profile.stderr, profile.effects.std(0) / 2)
    last = trace_dataset(gpt2, gpt2_tokenizer, REQUESTS[:1], kind="hidden", samples=2, noise=1.5, token="last",
                         progress=False)
    single = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, samples=2, noise=1.5)
    torch.testing.assert_close(last.effects[0], single.effect[-1], rtol=1e-3, atol=1e-9)


def test_trace_dataset_skips_wrong_predictions(gpt2, gpt2_tokenizer, capsys):
    profile = trace_dataset(gpt2, gpt2_tokenizer, REQUESTS, samples=1, window=1, progress=False)
    # The random model does not predict " Spain" for the CounterFact record: skipped; the rest have no true object.
    assert profile.n == 3 and profile.n_skipped == 1
    assert capsys.readouterr().err == ""
    answer = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, samples=1).answer_id
    known = {"known_id": 0, "prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
             "attribute": gpt2_tokenizer.decode([answer]).strip()}
    assert trace_dataset(gpt2, gpt2_tokenizer, [known], samples=1, window=1, progress=False).n == 1


def _profile(mean, kind="mlp", window=1):
    effects = torch.tensor([mean, mean], dtype=torch.float32)
    return TraceProfile(kind=kind, token="subject_last", effects=effects, low_scores=torch.zeros(2),
                        high_scores=torch.ones(2), window=window, samples=10, noise=0.1, seed=0)


def test_choose_layers_rule():
    assert choose_layers([0.1, 0.5, 0.3, 0.2]) == (1,)
    assert choose_layers(_profile([0.1, 0.2, 0.6, 0.1, 0.0])) == (2,)
    # Window: the contiguous run with the largest sum (0.4 + 0.45 beats 0.6 + 0.1 and 0.1 + 0.4).
    assert choose_layers([0.0, 0.6, 0.1, 0.4, 0.45, 0.0], n_layers=2) == (3, 4)
    assert choose_layers([0.0, 0.6, 0.1, 0.4, 0.45, 0.0], n_layers=3) == (1, 2, 3)  # 1.1 beats 0.95
    assert choose_layers([0.3, 0.1], n_layers=2) == (0, 1)
    # Ties: the earliest.
    assert choose_layers([0.2, 0.5, 0.5, 0.1]) == (1,)
    assert choose_layers([0.3, 0.3, 0.3, 0.3], n_layers=2) == (0, 1)
    assert choose_layers(torch.tensor([float("nan"), 0.1, 0.2])) == (2,)
    with pytest.raises(ConfigError):
        choose_layers([0.1, 0.2], n_layers=3)
    with pytest.raises(ConfigError):
        choose_layers([0.1, 0.2], n_layers=0)
    with pytest.raises(ConfigError):
        choose_layers([float("nan")] * 3)
    with pytest.warns(UserWarning, match="MLP"):
        assert choose_layers(_profile([0.1, 0.3, 0.2], kind="hidden")) == (1,)
    with pytest.warns(UserWarning, match="window"):
        choose_layers(_profile([0.1, 0.3, 0.2, 0.0], window=10))


def test_cache_is_hit_the_second_time(gpt2, gpt2_tokenizer, isolated_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kwargs = {"samples": 2, "window": 1, "require_correct": False, "progress": False}
    first = traced_profile(gpt2, gpt2_tokenizer, REQUESTS, **kwargs)
    assert not first.from_cache and first.cache_path.parent == traces_cache_dir()
    assert traces_cache_dir() == Path(isolated_cache) / "traces" and first.cache_path.exists()
    calls = []
    handle = gpt2.register_forward_hook(lambda *_: calls.append(1))
    try:
        second = traced_profile(gpt2, gpt2_tokenizer, REQUESTS, **kwargs)
    finally:
        handle.remove()
    assert second.from_cache and not calls
    assert torch.equal(first.effects, second.effects) and first.to_dict() == second.to_dict()
    other = traced_profile(gpt2, gpt2_tokenizer, REQUESTS[:2], **kwargs)
    assert not other.from_cache and other.cache_path != first.cache_path
    hidden = traced_profile(gpt2, gpt2_tokenizer, REQUESTS, kind="hidden", **kwargs)
    assert not hidden.from_cache and hidden.kind == "hidden"
    assert suggest_layers(gpt2, gpt2_tokenizer, REQUESTS, **kwargs) == choose_layers(first)
    # A corrupted file is recomputed, with a warning.
    first.cache_path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        again = traced_profile(gpt2, gpt2_tokenizer, REQUESTS, **kwargs)
    assert not again.from_cache and torch.equal(again.effects, first.effects)
    explicit = traced_profile(gpt2, gpt2_tokenizer, REQUESTS, cache_dir=tmp_path / "c", **kwargs)
    assert explicit.cache_path.parent == tmp_path / "c"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing else written to the working directory


def test_serialisation_roundtrip(gpt2, gpt2_tokenizer):
    result = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, samples=2, noise=1.0, positions=[3])
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    back = TraceResult.from_dict(data)
    assert torch.equal(torch.isnan(back.scores), torch.isnan(result.scores))
    torch.testing.assert_close(back.scores.nan_to_num(), result.scores.nan_to_num())
    assert back.subject_range == result.subject_range and back.answer == result.answer
    profile = trace_dataset(gpt2, gpt2_tokenizer, REQUESTS[:1], samples=1, window=1, progress=False)
    data = json.loads(json.dumps(profile.to_dict(), allow_nan=False))
    back = TraceProfile.from_dict(data)
    assert back.n == 1 and torch.equal(back.effects, profile.effects)
    assert math.isnan(back.stderr[0]) and data["stderr"][0] is None


def test_plots_write_png(gpt2, gpt2_tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    result = trace(gpt2, gpt2_tokenizer, PROMPT, SUBJECT, target="Paris", kind="mlp", window=2, samples=2, noise=1.0)
    path = tmp_path / "trace.png"
    result.plot(path, model_name="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    profile = _profile([0.1, 0.3, 0.2])
    profile.plot(tmp_path / "profile.png")
    assert (tmp_path / "profile.png").stat().st_size > 0
    axes = Figure().subplots(1, 2)
    assert result.plot(axes[0]) is axes[0] and profile.plot(axes[1]) is axes[1]
    assert not os.path.exists("trace.png")


def test_peft_model_traces_with_adapters_and_keys_them(gpt2_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=3, initializer_range=0.2)
    kwargs = {"samples": 2, "noise": 1.0, "window": 1, "require_correct": False, "progress": False}
    plain = traced_profile(base, gpt2_tokenizer, REQUESTS[:2], **kwargs)
    config = LoraConfig(r=2, target_modules=["transformer.h.1.mlp.c_proj"], fan_in_fan_out=True,
                        init_lora_weights=False)
    peft = get_peft_model(base, config)
    with_adapter = traced_profile(peft, gpt2_tokenizer, REQUESTS[:2], **kwargs)
    assert not with_adapter.from_cache and with_adapter.cache_path != plain.cache_path
    direct = trace(peft, gpt2_tokenizer, PROMPT, SUBJECT, kind="mlp", window=1, samples=2, noise=1.0)
    with peft.disable_adapter():
        without = trace(peft, gpt2_tokenizer, PROMPT, SUBJECT, kind="mlp", window=1, samples=2, noise=1.0)
    assert direct.high_score != pytest.approx(without.high_score, rel=1e-6)


def test_single_token_subject(gpt2, gpt2_tokenizer):
    result = trace(gpt2, gpt2_tokenizer, "{} is the capital of", "Paris", samples=2)
    assert result.subject_range == (0, 1) and result.noise > 0
    assert result.noise == pytest.approx(noise_level(gpt2, gpt2_tokenizer, ["Paris"]))
