"""MEND and KE as editing methods: the gradient factors, the networks' maths, and edits as exact LoRA factors.

Oracles from the methods spec (§2.8, §3.10): the rank-one factors reproduce the autograd weight gradient; padding
does not change them; a fresh MEND network is the identity map (ΔW = η∇W without normalisation, η Σ δ̂ûᵀ with
it); the Welford statistics equal numpy's; KE's hand-set head gives back the gradient; KE edits have rank T + 1;
each matrix uses its own learned step size; the adapter's ΔW is B A; an editor refuses another base model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, KEConfig, MENDConfig
from hf_edit.architecture import base_layer, unwrap_model
from hf_edit.editors import (
    EditorMismatchError,
    EditorNetwork,
    EditorNetworkError,
    find_edited_matrices,
    gradient_factors,
    target_nll,
)
from hf_edit.editors.matrices import TokenBatch, requests_batch
from hf_edit.editors.networks import ke_factors
from hf_edit.errors import ConfigError, LayerOutOfRangeError

REQUESTS = [EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
            EditRequest(prompt="{} plays the sport of", subject="Lionel Messi", target_new="ice hockey")]
KE_SMALL = {"hidden_dim": 16, "condition_dim": 16, "lstm_hidden": 16}
# untrained networks make edits that do not take; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore::hf_edit.errors.EditDidNotTakeWarning")


@pytest.fixture(scope="module")
def tokenizer(cf_facts_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cf_facts_path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("mend_base")
    tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(base_dir) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def autograd_gradients(model, names, batch) -> dict[str, torch.Tensor]:
    """∇W of the mean target NLL by plain autograd, in the Linear orientation."""
    inner = unwrap_model(model)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    target_nll(logits, batch).backward()
    out = {}
    for name in names:
        layer = base_layer(inner.get_submodule(name))
        grad = layer.weight.grad.detach().clone()
        out[name] = grad.T if type(layer).__name__ == "Conv1D" else grad
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return out


# -- gradient factors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
def test_factors_reproduce_the_weight_gradient_exactly(model_type, tokenizer):
    model = tiny_model(model_type, vocab_size=len(tokenizer))
    matrices = find_edited_matrices(model)
    assert {m.layer for m in matrices} == {0, 1, 2}  # the last three of three layers
    names = [m.name for m in matrices]
    batch = requests_batch(tokenizer, REQUESTS)
    factors, _ = gradient_factors(model, names, batch)
    expected = autograd_gradients(model, names, batch)
    n_targets = int(batch.label_mask.sum())
    for m in matrices:
        f = factors[m.name]
        assert f.inputs.shape == (f.n, m.in_features) and f.grads.shape == (f.n, m.out_features)
        torch.testing.assert_close(f.weight_gradient(), expected[m.name], rtol=0, atol=1e-6)
        if m.layer == 2:  # the top block: only positions that predict a target token contribute
            assert f.n == n_targets
        else:
            assert n_targets < f.n <= int(batch.attention_mask.sum()) - len(REQUESTS)


def test_padding_does_not_change_the_factors(tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tokenizer))
    names = [m.name for m in find_edited_matrices(model)]
    batch = requests_batch(tokenizer, REQUESTS[:1])
    padded = TokenBatch(torch.nn.functional.pad(batch.input_ids, (0, 5), value=7),
                        torch.nn.functional.pad(batch.attention_mask, (0, 5), value=0),
                        torch.nn.functional.pad(batch.label_mask, (0, 5), value=False), batch.rows)
    plain, _ = gradient_factors(model, names, batch)
    more, _ = gradient_factors(model, names, padded)
    for name in names:
        assert more[name].n == plain[name].n  # the pad rows are dropped
        torch.testing.assert_close(more[name].inputs, plain[name].inputs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(more[name].grads, plain[name].grads, rtol=1e-5, atol=1e-7)


# -- the MEND network ----------------------------------------------------------------------------------------------
def test_fresh_mend_network_is_the_identity(tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tokenizer))
    network = EditorNetwork.create("mend", model, config={"rank": 32, "norm": False})
    torch.manual_seed(0)
    for name, transform in network.transforms.items():
        for mode in range(transform.blocks[0].mode_scale.shape[0]):
            u, d = torch.randn(5, transform.in_features), torch.randn(5, transform.out_features)
            u2, d2 = transform(u, d, mode)
            assert torch.equal(u2, u) and torch.equal(d2, d)
    # so the edit is one gradient step of size η: ΔW = η ∇W (the spec's oracle 1)
    names = [m.name for m in network.matrices]
    batch = requests_batch(tokenizer, REQUESTS)
    factors, _ = gradient_factors(model, names, batch)
    gradients = autograd_gradients(model, names, batch)
    with torch.no_grad():
        deltas = network(factors)
    for name, (A, B) in deltas.items():
        torch.testing.assert_close(B @ A, 1e-4 * gradients[name], rtol=1e-5, atol=1e-10)


def test_normalisation_statistics_and_normalised_identity(tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tokenizer))
    network = EditorNetwork.create("mend", model, layers=(2,), config={"rank": 16})
    names = [m.name for m in network.matrices]
    seen = []
    for request in REQUESTS:  # two observations: the statistics merge (Chan) equals one pass (numpy)
        factors, _ = gradient_factors(model, names, requests_batch(tokenizer, [request]))
        network.observe(factors)
        seen.append(factors)
    c_fc = network.matrices[0]
    transform = network.transform_of(c_fc.name)
    rows_u = torch.cat([f[c_fc.name].inputs for f in seen]).double().numpy()
    rows_d = torch.cat([f[c_fc.name].grads for f in seen]).double().numpy()
    assert int(transform.count) == len(rows_u)
    np.testing.assert_allclose(transform.u_mean.numpy(), rows_u.mean(0), rtol=1e-4, atol=1e-6)
    std = (transform.u_m2 / (transform.count - 1)).sqrt().numpy()
    np.testing.assert_allclose(std, rows_u.std(0, ddof=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(transform.d_mean.numpy(), rows_d.mean(0), rtol=1e-4, atol=1e-9)
    # identity network with normalisation: ΔW = η Σ_t δ̂_t û_tᵀ (the spec's oracle 2)
    factors = seen[0]
    f = factors[c_fc.name]
    u_hat = (f.inputs - transform.u_mean) / ((transform.u_m2 / (transform.count - 1)).sqrt() + 1e-7)
    d_hat = (f.grads - transform.d_mean) / ((transform.d_m2 / (transform.count - 1)).sqrt() + 1e-7)
    with torch.no_grad():
        A, B = network(factors)[c_fc.name]
    torch.testing.assert_close(B @ A, 1e-4 * d_hat.T @ u_hat, rtol=1e-4, atol=1e-8)


# -- MEND edits ----------------------------------------------------------------------------------------------------
def test_mend_edit_is_the_lora_factors_with_each_matrix_its_own_step_size(base_dir, tokenizer, tmp_path):
    network = EditorNetwork.create("mend", load(base_dir), config={"rank": 32})
    with torch.no_grad():  # distinct step sizes: a swapped pairing (the reference's GPT-2 quirk) would show
        network.edit_lrs.copy_(torch.arange(1, len(network.matrices) + 1) * 1e-3)
    network.save_pretrained(tmp_path / "mend")
    edited = EditedModel.from_pretrained(base_dir, progress=False)
    edits = edited.edit(REQUESTS, method=MENDConfig(editor=str(tmp_path / "mend")))
    assert [e.module for e in edits] == [m.name for m in network.matrices]
    assert len({e.batch for e in edits}) == 1 and all(e.requests == tuple(REQUESTS) for e in edits)
    # the factors are the network's output on the base model's gradient factors
    names = [m.name for m in network.matrices]
    batch = requests_batch(tokenizer, REQUESTS)
    factors, _ = gradient_factors(load(base_dir), names, batch)
    with torch.no_grad():
        expected = network(factors)
    for i, e in enumerate(edits):
        A, B = expected[e.module]
        assert e.factors.rank == factors[e.module].n == e.info["rank"]
        torch.testing.assert_close(e.factors.A, A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e.factors.B, B, rtol=1e-5, atol=1e-9)
        transform = network.transform_of(e.module)
        _, d_t = transform(factors[e.module].inputs, factors[e.module].grads, network.modes[e.module])
        torch.testing.assert_close(e.factors.B, (i + 1) * 1e-3 * d_t.T, rtol=1e-5, atol=1e-9)
        assert e.info["edit_lrs"][e.module] == pytest.approx((i + 1) * 1e-3)
    top = [e for e in edits if e.layer == 2]
    assert all(e.factors.rank == int(batch.label_mask.sum()) for e in top)
    # the adapter adds exactly B A to each weight
    deltas = {e.module: e.factors.B @ e.factors.A for e in edits}
    merged = edited.merge_and_unload()
    base = load(base_dir)
    for module, delta in deltas.items():
        change = merged.get_submodule(module).weight.detach() - base.get_submodule(module).weight.detach()
        torch.testing.assert_close(change.T, delta, rtol=1e-5, atol=1e-7)


def test_mend_config_checks(base_dir, tmp_path):
    EditorNetwork.create("mend", load(base_dir), layers=(1, 2), config={"rank": 8}).save_pretrained(tmp_path / "m")
    edited = EditedModel.from_pretrained(base_dir, progress=False)
    with pytest.raises(ConfigError, match="needs a trained editor network"):
        edited.edit(REQUESTS[0], method=MENDConfig())
    with pytest.raises(ConfigError, match="rewrite_module_tmp"):
        MENDConfig(editor="x", rewrite_module_tmp="transformer.h.{}.mlp.c_proj")
    with pytest.raises(LayerOutOfRangeError):
        edited.edit(REQUESTS[0], method=MENDConfig(editor=str(tmp_path / "m"), layers=(99,)))
    with pytest.raises(ConfigError, match="edits layers"):
        edited.edit(REQUESTS[0], method=MENDConfig(editor=str(tmp_path / "m"), layers=(0,)))
    with pytest.raises(EditorNetworkError):
        edited.edit(REQUESTS[0], method=MENDConfig(editor=str(tmp_path / "missing")))
    with pytest.raises(EditorNetworkError, match="not a KE"):
        edited.edit(REQUESTS[0], method=KEConfig(editor=str(tmp_path / "m")))
    assert edited.edits == ()
    edits = edited.edit(REQUESTS[0], method=MENDConfig(editor=str(tmp_path / "m"), layers=(2,)))
    assert {e.layer for e in edits} == {2}


def test_an_editor_refuses_another_base_model(base_dir, tokenizer, tmp_path):
    for kind, config in (("mend", {"rank": 8}), ("ke", KE_SMALL)):
        EditorNetwork.create(kind, load(base_dir), layers=(2,), config=config).save_pretrained(tmp_path / kind)
    other = tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=64, seed=1)
    edited = EditedModel(other, tokenizer, progress=False)
    for config_class in (MENDConfig, KEConfig):
        kind, before = config_class.method, edited.edits
        with pytest.raises(EditorMismatchError, match="weights differ"):
            edited.edit(REQUESTS[0], method=config_class(editor=str(tmp_path / kind)))
        assert edited.edits == before
        edits = edited.edit(REQUESTS[0], method=config_class(editor=str(tmp_path / kind), check_base_model=False))
        assert edits  # the check can be turned off explicitly
    bigger = tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=64, n_inner=256)
    with pytest.raises(EditorMismatchError, match="mlp.c_fc is 256x64"):
        EditorNetwork.from_pretrained(tmp_path / "mend").check_base_model(bigger)


# -- KE ------------------------------------------------------------------------------------------------------------
def test_ke_head_passes_the_gradient_through_and_has_rank_t_plus_one(tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tokenizer))
    names = [m.name for m in find_edited_matrices(model)]
    batch = requests_batch(tokenizer, REQUESTS[:1])
    factors, _ = gradient_factors(model, names, batch)
    gradients = autograd_gradients(model, names, batch)
    for m in find_edited_matrices(model):
        i, o = m.in_features, m.out_features
        # rowa constant (α = 1/in), cola = in·1, colb = 0, η → +∞: ΔW equals the gradient (spec §2.8 oracle 2)
        raw = torch.cat([torch.full((o,), float(i)), torch.zeros(i), torch.zeros(o), torch.zeros(i),
                         torch.tensor([1e4])])
        A, B = ke_factors(raw, factors[m.name], i, o, max_scale=1.0)
        assert A.shape == (factors[m.name].n + 1, i) and B.shape == (o, factors[m.name].n + 1)
        torch.testing.assert_close(B @ A, gradients[m.name], rtol=1e-5, atol=1e-7)
        # any head output: the factors equal the dense Δ = s (G ⊙ a + b) of the reference (Conv1D layout)
        raw = torch.randn(2 * (i + o) + 1)
        A, B = ke_factors(raw, factors[m.name], i, o, max_scale=1.0)
        cola, rowa, colb, rowb, eta = raw[:o], raw[o:o + i], raw[o + i:2 * o + i], raw[2 * o + i:-1], raw[-1]
        a = torch.softmax(rowa, 0)[:, None] * cola[None]
        b = torch.softmax(rowb, 0)[:, None] * colb[None]
        dense = torch.sigmoid(eta) * (gradients[m.name].T * a + b)
        torch.testing.assert_close((B @ A).T, dense, rtol=1e-4, atol=1e-7)
        assert torch.linalg.matrix_rank(B @ A) <= factors[m.name].n + 1


def test_ke_conditions_each_edit_on_its_own_sentence(tokenizer):
    model = tiny_model("gpt2", vocab_size=len(tokenizer))
    network = EditorNetwork.create("ke", model, layers=(2,), config=KE_SMALL)
    names = [m.name for m in network.matrices]
    batch = requests_batch(tokenizer, REQUESTS)
    factors, _ = gradient_factors(model, names, requests_batch(tokenizer, REQUESTS[:1]))
    with pytest.raises(ConfigError, match="own sentence"):
        network(factors, batch.input_ids, batch.attention_mask)
    one = network(factors, batch.input_ids[:1], batch.attention_mask[:1])
    assert all(A.shape[0] == factors[n].n + 1 for n, (A, _) in one.items())


def test_ke_edit_round_trip(base_dir, tokenizer, tmp_path):
    EditorNetwork.create("ke", load(base_dir), config=KE_SMALL).save_pretrained(tmp_path / "ke")
    edited = EditedModel.from_pretrained(base_dir, progress=False)
    probe = tokenizer(REQUESTS[0].filled_prompt, return_tensors="pt")
    with torch.no_grad():
        before = edited(**probe).logits
    edits = edited.edit(REQUESTS, method=KEConfig(editor=str(tmp_path / "ke")))
    names = [m.name for m in find_edited_matrices(load(base_dir))]
    ranks = {}
    for request in REQUESTS:  # each request alone: T + 1 per matrix; together: the sum
        factors, _ = gradient_factors(load(base_dir), names, requests_batch(tokenizer, [request]))
        for name, f in factors.items():
            ranks[name] = ranks.get(name, 0) + f.n + 1
    assert {e.module: e.factors.rank for e in edits} == ranks
    with torch.no_grad():
        after = edited(**probe).logits
    assert not torch.equal(before, after)
    edited.save_pretrained(tmp_path / "edit")
    reloaded = EditedModel.from_pretrained(tmp_path / "edit", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, after, rtol=0, atol=1e-6)
    reloaded.remove_edit(0)
    with torch.no_grad():
        assert torch.equal(reloaded(**probe).logits, before)
