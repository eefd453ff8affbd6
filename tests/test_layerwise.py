"""The layer-wise method: jointly optimised values at every edited layer, EMMET's equality-constrained updates.

Checked against independent computations: the joint optimisation over several modules equals a plain-torch loop;
each layer's update adds exactly its δ at every templated key (and nothing at the prompt's other tokens); with
exact preservation the edited model reproduces the δ configuration it was solved for on the bare prompt.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace

import pytest
import torch
from helpers import reference_value_rows
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, LayerwiseConfig
from hf_edit.architecture import find_layout, unwrap_model
from hf_edit.errors import ConfigError
from hf_edit.hooks import add_at_positions, frozen_eval
from hf_edit.methods import EditContext
from hf_edit.methods.layerwise import LayerwiseEditor
from hf_edit.methods.memit import ValueProblem, ValueSettings, optimise_values
from hf_edit.tokens import pad_token_id, reference_subject_last, target_ids

TEMPLATES = (("{}",), ("Hello world. {}", "It was a sunny day in the town. {}"))
FLAT = ["{}", "Hello world. {}", "It was a sunny day in the town. {}"]
REQUESTS = [EditRequest(prompt="In Paris stands {}", subject="The Eiffel Tower", target_new="Rome"),
            EditRequest(prompt="The best player is {}", subject="Lionel Messi", target_new="tennis")]


@pytest.fixture
def settings(wikitext_path):
    return dict(mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64, context_templates=TEMPLATES,
                v_num_grad_steps=10)


def _model(model_type, tokenizer):
    return tiny_model(model_type, vocab_size=len(tokenizer), initializer_range=0.1)


def _projections(model, layers):
    model = unwrap_model(model)
    layout = find_layout(model)
    return [model.get_submodule(layout.projection_name(i)) for i in layers]


def _subject_tokens(tokenizer, text: str, subject: str) -> list[int]:
    """Positions of the tokens covering the subject's last occurrence in ``text``, last first (from offsets)."""
    start = text.rindex(subject)
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    covering = [i for i, (a, b) in enumerate(offsets) if b > a and a < start + len(subject) and b > start]
    return covering[::-1]


def _plain_joint(model, tokenizer, modules, request, s: ValueSettings, subject_tokens: bool = False):
    """The joint optimisation written out: one unpadded sequence at a time, one δ per module (and per subject token
    counted from the last, with ``subject_tokens``), torch's Adam."""
    target, rows, kl_ids, kl_position = reference_value_rows(tokenizer, request, FLAT)
    if subject_tokens:
        texts = [t.replace("{}", request.prompt).replace("{}", request.subject) for t in FLAT]
        rows = [(ids, _subject_tokens(tokenizer, text, request.subject), length)
                for (ids, _p, length), text in zip(rows, texts)]
        kl_positions = _subject_tokens(tokenizer, request.subject + " is a", request.subject)
    else:
        rows = [(ids, [position], length) for ids, position, length in rows]
        kl_positions = [kl_position]
    n_slots = max(len(p) for _ids, p, _l in rows + [(None, kl_positions, None)])
    h = {}

    def run(ids, positions, delta):
        handles = []
        for m, module in enumerate(modules):
            def hook(_mod, _a, out, m=m):
                update = torch.zeros_like(out)
                for slot, position in enumerate(positions):
                    h.setdefault((m, slot), out[0, position].detach().clone())
                    update[0, position] = delta[m, slot]
                return out + update
            handles.append(module.register_forward_hook(hook))
        try:
            return model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            for handle in handles:
                handle.remove()

    delta = torch.zeros(len(modules), n_slots, model.config.hidden_size, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=s.lr)
    log_p0 = None
    for it in range(s.num_steps):
        optimiser.zero_grad()
        nll = 0.0
        for ids, positions, length in rows:
            logp = torch.log_softmax(run(ids, positions, delta)[length - 1:length - 1 + len(target)], -1)
            nll = nll - logp[torch.arange(len(target)), target].mean()
        nll = nll / len(rows)
        kl_logp = torch.log_softmax(run(kl_ids, kl_positions, delta)[kl_positions[0]], -1)
        if log_p0 is None:
            log_p0 = kl_logp.detach()
        kl = s.kl_factor * (kl_logp.exp() * (kl_logp - log_p0)).sum()
        init = torch.stack([torch.stack([h[m, k] for k in range(n_slots)]) for m in range(len(modules))])
        loss = nll + kl + s.weight_decay * (delta.norm(dim=-1) / init.norm(dim=-1) ** 2).sum()
        if loss.item() < s.early_stop_loss or it == s.num_steps - 1:
            break
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            for m in range(len(modules)):
                for k in range(n_slots):
                    bound = s.clamp_norm_factor * init[m, k].norm()
                    if delta[m, k].norm() > bound:
                        delta[m, k] *= bound / delta[m, k].norm()
    init = torch.stack([torch.stack([h[m, k] for k in range(n_slots)]) for m in range(len(modules))])
    if n_slots == 1:
        return delta.detach()[:, 0], init[:, 0]
    return delta.detach(), init


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_joint_values_equal_a_plain_loop_and_batching(model_type, gpt2_tokenizer):
    model = _model(model_type, gpt2_tokenizer)
    modules = _projections(model, [0, 1, 2])
    problems = [ValueProblem.build(gpt2_tokenizer, [r], FLAT) for r in REQUESTS]
    s = ValueSettings(num_steps=8, lr=0.5, clamp_norm_factor=0.5, weight_decay=0.5, early_stop_loss=0.0)
    with frozen_eval(model):
        batched = optimise_values(model, modules, problems, s, pad_id=pad_token_id(gpt2_tokenizer))
        alone = [optimise_values(model, modules, [p], s, pad_id=pad_token_id(gpt2_tokenizer))[0] for p in problems]
        delta, init = _plain_joint(model, gpt2_tokenizer, modules, REQUESTS[0], s)
    assert batched[0].delta.shape == (3, model.config.hidden_size)
    assert batched[0].info["clamped"] and len(batched[0].info["clamp_ratio"]) == 3
    for b, a in zip(batched, alone):
        torch.testing.assert_close(b.delta, a.delta, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[0].delta, delta, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[0].init, init, rtol=0, atol=1e-6)
    # one module given as a list equals the single-module call (which keeps its (width,) shapes)
    with frozen_eval(model):
        single = optimise_values(model, modules[1], problems[:1], s, pad_id=pad_token_id(gpt2_tokenizer))[0]
        listed = optimise_values(model, modules[1:2], problems[:1], s, pad_id=pad_token_id(gpt2_tokenizer))[0]
    assert single.delta.shape == (model.config.hidden_size,)
    torch.testing.assert_close(single.delta, listed.delta[0], rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_one_value_per_subject_token_equals_a_plain_loop(model_type, gpt2_tokenizer):
    """``fact_token="subject"``: one δ per module and subject token (counted from the last; the subject splits into
    different numbers of tokens after different templates), each clamped against its own h."""
    model = _model(model_type, gpt2_tokenizer)
    modules = _projections(model, [0, 1])
    problems = [ValueProblem.build(gpt2_tokenizer, [r], FLAT, "subject") for r in REQUESTS]
    assert problems[0].n_slots > 1
    s = ValueSettings(num_steps=8, lr=0.5, clamp_norm_factor=0.5, weight_decay=0.5, early_stop_loss=0.0)
    with frozen_eval(model):
        batched = optimise_values(model, modules, problems, s, pad_id=pad_token_id(gpt2_tokenizer))
        alone = optimise_values(model, modules, problems[:1], s, pad_id=pad_token_id(gpt2_tokenizer))[0]
        delta, init = _plain_joint(model, gpt2_tokenizer, modules, REQUESTS[0], s, subject_tokens=True)
    assert batched[0].delta.shape == (2, problems[0].n_slots, model.config.hidden_size)
    torch.testing.assert_close(batched[0].delta, delta, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[0].init, init, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[0].delta, alone.delta, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type,value_tokens", [("gpt2", "subject"), ("llama", "subject"),
                                                    ("gpt_neox", "subject"), ("gpt2", "fact")])
def test_each_layer_adds_its_delta_at_every_key(model_type, value_tokens, gpt2_tokenizer, settings):
    """ΔW_l k = δ_{l,s} at every templated key (every value token s) read under the δ configuration; ΔW_l o ≈ 0 at
    preserved keys."""
    model = _model(model_type, gpt2_tokenizer)
    config = LayerwiseConfig(layers=(0, 1), emmet_lambda=0.0, prompt_preservation=1e6, template_keys="each",
                             value_tokens=value_tokens, **settings)
    editor = LayerwiseEditor(config, EditContext(model, gpt2_tokenizer))
    request = REQUESTS[0]
    updates = editor.compute([request])
    with frozen_eval(model):
        values = editor.compute_values([[request]])
        keys = editor.read_keys([[request]], values, _projections(model, [0, 1]))
    texts = [t.replace("{}", request.prompt).replace("{}", request.subject) for t in FLAT]
    n_tokens = [len(_subject_tokens(gpt2_tokenizer, text, request.subject)) for text in texts]
    assert keys.n_rows == (sum(n_tokens) if value_tokens == "subject" else len(FLAT))
    assert [u.layer for u in updates] == [0, 1] and all(u.A.shape[0] == keys.n_rows for u in updates)
    for i, update in enumerate(updates):
        delta_w = update.B.double() @ update.A.double()
        fitted = keys.inputs[i].double() @ delta_w.T  # (rows, d)
        expected = torch.stack([keys.value(values[0].delta, i, slot) for slot in keys.slot_of]).double()
        torch.testing.assert_close(fitted, expected, rtol=1e-4, atol=1e-4 * expected.norm(dim=1).max().item())
        preserved = editor.prompt_keys([request], editor.targets()[i]) / 1e3  # undo √μ
        leak = (delta_w @ preserved).norm() / (delta_w @ keys.inputs[i].double().T).norm()
        assert leak < 1e-2


def _bare_logits_with(model, tokenizer, request, layers, deltas):
    """The model's last logits on the bare prompt with δ[l] (or δ[l, s] at the subject's s-th token from the last)
    added at layer l's MLP output."""
    ids = tokenizer(request.filled_prompt)["input_ids"]
    positions = _subject_tokens(tokenizer, request.filled_prompt, request.subject)
    assert positions[0] == reference_subject_last(tokenizer, request.prompt, request.subject)
    with torch.no_grad(), ExitStack() as added:
        for module, delta in zip(_projections(model, layers), deltas):
            per_token = delta[None] if delta.dim() == 1 else delta[:len(positions)]
            added.enter_context(add_at_positions(module, per_token, torch.tensor(positions[:len(per_token)]),
                                                 (1, len(ids)), rows=torch.zeros(len(per_token), dtype=torch.long)))
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("value_tokens", ["subject", "fact"])
def test_edit_reproduces_the_delta_configuration_and_disables_bitwise(value_tokens, gpt2_tokenizer, settings):
    """With only the bare template and exact preservation, the edited model's output on the prompt is the model's
    with every δ added at the subject's tokens (or its last token): what the values were optimised for."""
    model = _model("gpt2", gpt2_tokenizer)
    request = REQUESTS[0]
    config = LayerwiseConfig(layers=(0, 1, 2), emmet_lambda=0.0, prompt_preservation=1e8, value_tokens=value_tokens,
                             **dict(settings, context_templates=(("{}",),), v_num_grad_steps=20, kl_factor=0.0))
    edited = EditedModel(model, gpt2_tokenizer, method=config, progress=False)
    inputs = gpt2_tokenizer(request.filled_prompt, return_tensors="pt")
    before = edited(**inputs).logits.detach().clone()
    wanted = target_ids(gpt2_tokenizer, request.target_new)[0]
    assert before[0, -1].argmax().item() != wanted
    edits = edited.edit([request])
    assert [e.layer for e in edits] == [0, 1, 2]
    after = edited(**inputs).logits[0, -1].detach()
    assert after.argmax().item() == wanted
    with edited.disable_edits():
        assert torch.equal(edited(**inputs).logits, before)
        with frozen_eval(model):
            values = LayerwiseEditor(config, EditContext(model, gpt2_tokenizer)).compute_values([[request]])
        expected = _bare_logits_with(model, gpt2_tokenizer, request, (0, 1, 2), values[0].delta)
    torch.testing.assert_close(after, expected, rtol=1e-3, atol=1e-3)


def test_clamp_escalation_gives_each_request_the_first_clamp_that_reaches_its_target(gpt2_tokenizer, settings):
    """Each request's values come from the smallest clamp of [clamp_norm_factor, *clamp_escalation] whose
    template-averaged target probability reaches the threshold (the largest when none does), and equal an
    optimisation run with that clamp alone."""
    model = _model("gpt2", gpt2_tokenizer)
    ladder = (0.02, 0.2, 2.0)
    config = LayerwiseConfig(layers=(0, 1), clamp_norm_factor=ladder[0], clamp_escalation=ladder[1:],
                             escalation_threshold=0.3, kl_factor=0.0, **settings)
    editor = LayerwiseEditor(config, EditContext(model, gpt2_tokenizer))
    units = [[r] for r in REQUESTS]
    with frozen_eval(model):
        results = editor.compute_values(units)
        problems = [ValueProblem.build(gpt2_tokenizer, u, FLAT, "subject") for u in units]
        alone = {f: optimise_values(model, _projections(model, [0, 1]), problems,
                                    replace(editor.value_settings(), clamp_norm_factor=f),
                                    pad_id=pad_token_id(gpt2_tokenizer)) for f in ladder}
    used = []
    for p, result in enumerate(results):
        reached = [f for f in ladder if alone[f][p].info["target_probability"] >= 0.3]
        expected = reached[0] if reached else ladder[-1]
        used.append(expected)
        assert result.info["clamp_norm_factor"] == expected
        torch.testing.assert_close(result.delta, alone[expected][p].delta, rtol=0, atol=1e-5)
    assert used != [ladder[0]] * len(results)  # the ladder was climbed
    off = LayerwiseEditor(LayerwiseConfig(layers=(0, 1), clamp_norm_factor=ladder[0], clamp_escalation=(),
                                          kl_factor=0.0, **settings), EditContext(model, gpt2_tokenizer))
    with frozen_eval(model):
        assert all(r.info["clamp_norm_factor"] == ladder[0] for r in off.compute_values(units))


def test_template_keys_auto_and_bad_config(gpt2_tokenizer, settings):
    model = _model("gpt2", gpt2_tokenizer)
    editor = LayerwiseEditor(LayerwiseConfig(layers=(0,), **settings), EditContext(model, gpt2_tokenizer))
    targets = editor.targets()
    width = model.config.n_inner or 4 * model.config.hidden_size
    assert editor._each(width // 4, targets) and not editor._each(width // 4 + 1, targets)
    with pytest.raises(ConfigError, match="template_keys"):
        LayerwiseConfig(template_keys="rows")
    with pytest.raises(ConfigError, match="value_tokens"):
        LayerwiseConfig(value_tokens="all")
    with pytest.raises(ConfigError, match="clamp_escalation"):
        LayerwiseConfig(clamp_escalation=(4.0, 2.0))
    with pytest.raises(ConfigError, match="escalation_threshold"):
        LayerwiseConfig(escalation_threshold=0.0)
    with pytest.raises(ConfigError, match="fact_token"):
        LayerwiseConfig(fact_token="last")
    with pytest.raises(ConfigError, match="clamp_norm_factor"):
        LayerwiseConfig(clamp_norm_factor=0.0)
