"""Tests of hf_edit.stats: second-moment statistics C, their content-addressed cache and the reference's .npz files.

Every expected value is computed independently in the test (plain forward hooks, one text at a time, the
reference's ``random.Random(1)`` permutation), never hard-coded.
"""

from __future__ import annotations

import hashlib
import random
import re
import warnings

import datasets
import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from hf_edit.architecture import EditTarget, resolve_target
from hf_edit.errors import (
    ConfigError,
    InsufficientStatisticsError,
    StatisticsCacheError,
    StatisticsMismatchError,
)
from hf_edit.stats import (
    SecondMomentStats,
    compute_second_moment,
    load_or_compute_stats,
    model_fingerprint,
    stats_cache_dir,
    text_dataset,
    tokenizer_fingerprint,
)

N_SAMPLES, MAX_LEN, SEED = 40, 64, 1


# ----------------------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ----------------------------------------------------------------------------------------------------------------
def sampled(texts: list[str], n: int, seed: int = SEED) -> list[str]:
    """The reference's sampling, written out independently: Random(seed) permutation, first n."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[:n]]


def independent_mom2(model, tokenizer, module_name: str, texts: list[str], max_len: int):
    """Σ k kᵀ (float64) and n from each text run alone, unpadded, through a plain forward hook."""
    keys = []
    module = model.get_submodule(module_name)
    handle = module.register_forward_hook(lambda _m, args, _o: keys.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
                if ids:
                    model(input_ids=torch.tensor([ids]), logits_to_keep=1)  # full pass, cheap head
    finally:
        handle.remove()
    k = torch.cat(keys).double()
    return k.T @ k, k.shape[0]


def forward_counter(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def stats_files(folder) -> list:
    return sorted(folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def wiki_texts(wikitext_path) -> list[str]:
    """120 WikiText-2 lines, with one sampled line emptied (it must be dropped, as in the reference)."""
    lines = wikitext_path.read_text(encoding="utf-8").splitlines()[:120]
    order = list(range(len(lines)))
    random.Random(SEED).shuffle(order)
    lines[order[0]] = ""
    return lines


@pytest.fixture(scope="module")
def corpus(wiki_texts) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": wiki_texts})


@pytest.fixture
def gpt2():
    return tiny_model("gpt2", vocab_size=50257)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """A temporary datasets cache (the env var alone is read only when datasets is imported)."""
    cache = tmp_path / "hf_datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def spd_stats(n: int, dim: int = 16, dtype=torch.float64, seed: int = 0) -> SecondMomentStats:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, dim, dtype=torch.float64)
    return SecondMomentStats((keys.T @ keys).to(dtype), n, {"module": "m"})


def compute(model, tokenizer, layer: int = 1, **kwargs) -> SecondMomentStats:
    kwargs = {"n_samples": N_SAMPLES, "max_length": MAX_LEN, "progress": False, **kwargs}
    return compute_second_moment(model, tokenizer, resolve_target(model, layer), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# 1-2. C equals an independent computation, for GPT-2 (Conv1D), OPT (flattened input) and Llama
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["gpt2", "opt", "llama"])
def test_matches_independent_single_text_computation(model_type, gpt2_tokenizer, corpus, wiki_texts):
    model = tiny_model(model_type, vocab_size=50257)
    target = resolve_target(model, 1)
    stats = compute(model, gpt2_tokenizer, dataset=corpus)
    expected, n = independent_mom2(model, gpt2_tokenizer, target.name, sampled(wiki_texts, N_SAMPLES), MAX_LEN)
    assert stats.count == n
    assert stats.dtype == torch.float64 and stats.mom2_sum.shape == (target.in_features,) * 2
    torch.testing.assert_close(stats.mom2_sum, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    torch.testing.assert_close(stats.second_moment(), expected / n, rtol=1e-6,
                               atol=1e-6 * expected.abs().max().item() / n)


def test_batching_only_changes_summation_order(gpt2, gpt2_tokenizer, corpus):
    alone = compute(gpt2, gpt2_tokenizer, dataset=corpus, batch_tokens=1)  # every text in its own batch
    packed = compute(gpt2, gpt2_tokenizer, dataset=corpus, batch_tokens=10 * MAX_LEN)
    assert alone.count == packed.count
    torch.testing.assert_close(alone.mom2_sum, packed.mom2_sum, rtol=1e-6,
                               atol=1e-6 * alone.mom2_sum.abs().max().item())


def test_metadata_and_float32_accumulation(gpt2, gpt2_tokenizer, corpus):
    stats = compute(gpt2, gpt2_tokenizer, dataset=corpus, dtype="float32", max_length=None)
    assert stats.dtype == torch.float32
    assert stats.metadata["max_length"] == gpt2.config.n_positions  # capped by the model
    expected = {"module": "transformer.h.1.mlp.c_proj", "dtype": "float32", "n_samples": N_SAMPLES, "seed": SEED,
                "source": "computed", "dataset": corpus._fingerprint, "model_fingerprint": model_fingerprint(gpt2),
                "tokenizer_fingerprint": tokenizer_fingerprint(gpt2_tokenizer)}
    assert {key: stats.metadata[key] for key in expected} == expected
    with pytest.raises(ConfigError, match="float16"):
        compute(gpt2, gpt2_tokenizer, dataset=corpus, dtype="float16")


def test_too_few_vectors_raises_and_caches_nothing(gpt2, gpt2_tokenizer, corpus, isolated_cache):
    target = resolve_target(gpt2, 1)
    with pytest.raises(InsufficientStatisticsError, match="mom2_n_samples"):
        load_or_compute_stats(gpt2, gpt2_tokenizer, target, dataset=corpus, n_samples=3, max_length=8,
                              progress=False)
    assert not list(isolated_cache.rglob("*.safetensors"))


def test_lora_model_uses_base_context_and_keeps_fingerprint(gpt2, gpt2_tokenizer, corpus):
    from peft import LoraConfig, get_peft_model

    base_stats = compute(gpt2, gpt2_tokenizer, dataset=corpus)
    base_fingerprint = model_fingerprint(gpt2)
    config = LoraConfig(target_modules=["transformer.h.0.mlp.c_proj"], r=1, lora_alpha=1, init_lora_weights=False,
                        fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(gpt2, config)
    peft_model.train()
    assert model_fingerprint(peft_model) == base_fingerprint
    target = resolve_target(peft_model, 1)
    disabled = compute_second_moment(peft_model, gpt2_tokenizer, target, dataset=corpus, n_samples=N_SAMPLES,
                                     max_length=MAX_LEN, base_context=peft_model.disable_adapter, progress=False)
    assert torch.equal(disabled.mom2_sum, base_stats.mom2_sum)
    assert peft_model.training and all(m.training for m in peft_model.modules())  # mode restored
    active = compute(peft_model, gpt2_tokenizer, dataset=corpus)
    assert not torch.allclose(active.mom2_sum, base_stats.mom2_sum)


# ----------------------------------------------------------------------------------------------------------------
# 3. Cache
# ----------------------------------------------------------------------------------------------------------------
def test_cache_miss_then_hit(gpt2, gpt2_tokenizer, corpus, isolated_cache):
    calls = forward_counter(gpt2)
    target = resolve_target(gpt2, 1)
    kwargs = dict(dataset=corpus, n_samples=N_SAMPLES, max_length=MAX_LEN, progress=False)
    first = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    assert stats_cache_dir() == isolated_cache / "stats"
    files = stats_files(isolated_cache / "stats")
    assert len(files) == 1 and files[0].name.startswith(f"{target.name}__")
    ran = calls[0]
    assert ran > 0
    second = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    assert calls[0] == ran  # no forward pass on a hit
    assert torch.equal(first.mom2_sum, second.mom2_sum) and first.mom2_sum.dtype == second.mom2_sum.dtype
    assert first.count == second.count and first.metadata == second.metadata

    load_or_compute_stats(gpt2, gpt2_tokenizer, target, **{**kwargs, "n_samples": 30})
    load_or_compute_stats(gpt2, gpt2_tokenizer, resolve_target(gpt2, 0), **kwargs)
    load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs, dtype="float32")
    assert len(stats_files(isolated_cache / "stats")) == 4


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_several_modules_in_one_pass_equal_each_alone(model_type, gpt2_tokenizer, corpus, tmp_path):
    """load_or_compute_all_stats: the missing modules' statistics come from one pass over the texts (one forward
    pass per batch, not one per module), each bitwise equal to the module computed alone, with the same cache
    file; cached ones are read, and the provider's prefetch fills what get() then returns."""
    from hf_edit.methods.base import StatisticsProvider
    from hf_edit.stats import load_or_compute_all_stats

    model = tiny_model(model_type, vocab_size=len(gpt2_tokenizer))
    targets = [resolve_target(model, layer) for layer in (2, 0, 1)]
    kwargs = dict(dataset=corpus, n_samples=N_SAMPLES, max_length=MAX_LEN, progress=False)
    alone = [load_or_compute_stats(model, gpt2_tokenizer, t, cache_dir=tmp_path / "alone", **kwargs)
             for t in targets]
    calls = forward_counter(model)
    load_or_compute_stats(model, gpt2_tokenizer, targets[1], cache_dir=tmp_path / "together", **kwargs)
    one_module = calls[0]
    calls[0] = 0
    together = load_or_compute_all_stats(model, gpt2_tokenizer, targets, cache_dir=tmp_path / "together", **kwargs)
    assert calls[0] == one_module  # layers 2 and 1 computed in one pass; layer 0 was cached
    assert [s.from_cache for s in together] == [False, True, False]
    for a, b in zip(alone, together):
        assert torch.equal(a.mom2_sum, b.mom2_sum) and a.count == b.count and a.metadata == b.metadata
    assert [f.name for f in stats_files(tmp_path / "alone")] == [f.name for f in stats_files(tmp_path / "together")]

    provider = StatisticsProvider(model, gpt2_tokenizer, progress=False)
    calls[0] = 0
    settings = dict(dataset=corpus, n_samples=N_SAMPLES, max_length=MAX_LEN)
    provider.prefetch(targets, **settings)  # the test's own empty cache
    assert calls[0] == one_module
    for a, t in zip(alone, targets):
        assert torch.equal(provider.get(t, **settings).mom2_sum, a.mom2_sum)
    assert calls[0] == one_module  # get() found them loaded


def test_weight_change_changes_fingerprint_and_misses(gpt2, gpt2_tokenizer, corpus, tmp_path):
    target = resolve_target(gpt2, 1)
    kwargs = dict(dataset=corpus, n_samples=N_SAMPLES, max_length=MAX_LEN, progress=False, cache_dir=tmp_path)
    before = model_fingerprint(gpt2)
    first = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    with torch.no_grad():
        gpt2.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    assert model_fingerprint(gpt2) != before
    calls = forward_counter(gpt2)
    second = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    assert calls[0] > 0 and len(stats_files(tmp_path)) == 2
    assert not torch.equal(first.mom2_sum, second.mom2_sum)


@pytest.mark.parametrize("damage", ["flip_middle", "flip_header", "truncate"])
def test_corrupted_cache_file_raises_and_is_left_untouched(damage, gpt2, gpt2_tokenizer, corpus, tmp_path):
    target = resolve_target(gpt2, 1)
    kwargs = dict(dataset=corpus, n_samples=N_SAMPLES, max_length=MAX_LEN, progress=False, cache_dir=tmp_path)
    load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    (path,) = stats_files(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        position = len(data) // 2 if damage == "flip_middle" else 40
        data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StatisticsCacheError, match="Delete it to recompute") as error:
        load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    assert str(path) in str(error.value)
    assert path.read_bytes() == bytes(data)
    assert stats_files(tmp_path) == [path]


def test_save_load_key_check(tmp_path):
    stats = spd_stats(100)
    path = tmp_path / "s.safetensors"
    stats.save(path, key="abc")
    loaded = SecondMomentStats.load(path, expected_key="abc")
    assert torch.equal(loaded.mom2_sum, stats.mom2_sum)
    assert loaded.count == 100 and loaded.metadata == stats.metadata
    with pytest.raises(StatisticsCacheError, match="cache key"):
        SecondMomentStats.load(path, expected_key="other")
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left behind


def test_stats_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_EDIT_CACHE", str(tmp_path / "edit"))
    assert stats_cache_dir() == tmp_path / "edit" / "stats"
    monkeypatch.delenv("HF_EDIT_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert stats_cache_dir() == tmp_path / "hf" / "hf_edit" / "stats"


# ----------------------------------------------------------------------------------------------------------------
# 4. Reference .npz files
# ----------------------------------------------------------------------------------------------------------------
def test_npz_round_trip(tmp_path):
    stats = spd_stats(100, dtype=torch.float32)
    stats.metadata.update(n_samples=7, dataset="d")
    path = tmp_path / "stats.npz"
    stats.to_npz(path)
    with np.load(path, allow_pickle=False) as raw:  # readable as the reference reads it
        assert {"mom2.mom2", "mom2.count", "mom2.constructor", "sample_size"} <= set(raw.files)
        assert int(raw["sample_size"]) == 7 and raw["mom2.mom2"].dtype == np.float32
    loaded = SecondMomentStats.from_npz(path)
    assert torch.equal(loaded.mom2_sum, stats.mom2_sum) and loaded.count == stats.count
    assert loaded.metadata == {**stats.metadata, "source": "npz"}


def write_reference_npz(path, **overrides):
    arrays = {"mom2.mom2": np.eye(4, dtype=np.float32) * 10, "mom2.count": np.array(10),
              "mom2.constructor": np.array("util.runningstats.SecondMoment()"), "sample_size": np.array(100000)}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_reference_npz_loads(tmp_path):
    path = write_reference_npz(tmp_path / "ref.npz")
    stats = SecondMomentStats.from_npz(path, module_name="transformer.h.1.mlp.c_proj")
    assert stats.dim == 4 and stats.count == 10 and stats.dtype == torch.float32
    assert stats.metadata == {"module": "transformer.h.1.mlp.c_proj", "n_samples": 100000, "source": "npz"}
    null_size = SecondMomentStats.from_npz(write_reference_npz(tmp_path / "null.npz", sample_size=np.array(np.nan)))
    assert null_size.metadata["n_samples"] is None


@pytest.mark.parametrize(("overrides", "message"), [
    ({"mom2.count": None}, "mom2.count"),
    ({"mom2.mom2": None}, "mom2.mom2"),
    ({"mom2.mom2": np.ones((4, 3), dtype=np.float32)}, "square"),
    ({"mom2.mom2": np.full((4, 4), np.nan, dtype=np.float32)}, "NaN"),
    ({"mom2.count": np.array(0)}, "positive"),
])
def test_invalid_npz_raises(overrides, message, tmp_path):
    path = write_reference_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(StatisticsCacheError, match=message):
        SecondMomentStats.from_npz(path)


def test_unreadable_npz_raises(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(StatisticsCacheError, match=re.escape(str(path))):
        SecondMomentStats.from_npz(path)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{"mom2.mom2": np.array([object()], dtype=object), "mom2.count": np.array(1)})
    with pytest.raises(StatisticsCacheError):
        SecondMomentStats.from_npz(pickled)


def test_check_compatible(tmp_path):
    stats = SecondMomentStats(torch.eye(4, dtype=torch.float64) * 10, 10, {"module": "layers.1.fc2"})
    stats.check_compatible(EditTarget("layers.1.fc2", 1, False, 4, 8))
    with pytest.raises(StatisticsMismatchError, match="input width is 5"):
        stats.check_compatible(EditTarget("layers.1.fc2", 1, False, 5, 8))
    with pytest.raises(StatisticsMismatchError, match="another layer"):
        stats.check_compatible(EditTarget("layers.2.fc2", 2, False, 4, 8))
    path = tmp_path / "s.npz"
    stats.to_npz(path)
    with pytest.raises(StatisticsMismatchError, match=re.escape("'layers.1.fc2'")):
        SecondMomentStats.from_npz(path, module_name="layers.2.fc2")


# ----------------------------------------------------------------------------------------------------------------
# 5. solve
# ----------------------------------------------------------------------------------------------------------------
def test_float64_solve_is_cholesky_and_cached(monkeypatch):
    stats = spd_stats(500)
    k = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    expected = torch.linalg.solve(stats.second_moment(), k.double().T).T
    factorisations = []
    original = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda c: factorisations.append(c) or original(c))
    result = stats.solve(k)
    assert result.dtype == torch.float32 and result.shape == k.shape
    torch.testing.assert_close(result, expected.float())
    torch.testing.assert_close(stats.solve(k[0]), expected[0].float())
    assert len(factorisations) == 1  # factor computed once


def test_float32_solve_is_the_reference_inverse():
    stats = spd_stats(500, dtype=torch.float32)
    k = torch.randn(16, generator=torch.Generator().manual_seed(2))
    expected = torch.inverse(stats.second_moment().float()) @ k
    torch.testing.assert_close(stats.solve(k), expected)


def test_damping_and_insufficient_statistics():
    stats = spd_stats(500)
    k = torch.randn(16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = stats.second_moment()
    damped = c + 0.1 * torch.trace(c) / 16 * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(stats.solve(k, damping=0.1), torch.linalg.solve(damped, k).float())

    few = spd_stats(10)  # n <= I
    with pytest.raises(InsufficientStatisticsError, match="mom2_n_samples"):
        few.solve(k)
    assert torch.isfinite(few.solve(k, damping=0.1)).all()
    singular = SecondMomentStats(torch.zeros(16, 16, dtype=torch.float64), 100)
    with pytest.raises(InsufficientStatisticsError, match="positive definite"):
        singular.solve(k)
    with pytest.raises(StatisticsMismatchError):
        stats.solve(torch.zeros(15))


def test_fingerprint_is_content_based():
    a, b = spd_stats(100), spd_stats(100)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != SecondMomentStats(a.mom2_sum, 101).fingerprint()
    assert a.fingerprint() != spd_stats(100, seed=1).fingerprint()


# ----------------------------------------------------------------------------------------------------------------
# 6. text_dataset
# ----------------------------------------------------------------------------------------------------------------
def test_text_dataset_from_file(tmp_path, datasets_cache):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsecond line\n\nfourth\n", encoding="utf-8")
    ds, fingerprint = text_dataset(path)
    assert ds["text"][:] == ["first line", "second line", "", "fourth"]
    assert fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert text_dataset(str(path))[1] == fingerprint


def test_text_dataset_from_folder(tmp_path, datasets_cache):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("from b\n", encoding="utf-8")
    (folder / "a.raw").write_text("from a\n", encoding="utf-8")
    (folder / "ignored.json").write_text("{}", encoding="utf-8")
    ds, fingerprint = text_dataset(folder)
    assert ds["text"][:] == ["from a", "from b"]
    (folder / "b.txt").write_text("changed\n", encoding="utf-8")
    assert text_dataset(folder)[1] != fingerprint


def test_text_dataset_errors_and_alias(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="'text' column"):
        text_dataset(datasets.Dataset.from_dict({"content": ["a"]}))
    for missing in (str(tmp_path / "missing.txt"), "./nope", "relative/dir/file"):
        with pytest.raises(ConfigError, match="does not exist"):
            text_dataset(missing)
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": ["x"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds, fingerprint = text_dataset("wikipedia")
    assert calls == [(("wikimedia/wikipedia", "20231101.en"), {"split": "train"})]
    assert fingerprint.startswith("wikimedia/wikipedia:20231101.en:train:") and ds["text"][:] == ["x"]


def _fake_hub_snapshot(cache, repo: str, commit: str, ref: str = "main") -> None:
    """Lay out ``repo`` in a Hugging Face hub cache as a download would, with ``ref`` pointing at ``commit``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / commit / "config.json").write_text("{}")
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)


def test_hub_models_are_keyed_by_commit_and_a_weight_sample(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = tiny_model("gpt2")
    model.config._name_or_path = "org/tiny-model"
    _fake_hub_snapshot(tmp_path, "org/tiny-model", "a" * 40)
    _fake_hub_snapshot(tmp_path, "org/tiny-model", "b" * 40, ref="v2")
    at_main = model_fingerprint(model)
    assert model_fingerprint(model, revision="v2") != at_main  # same weights, another commit
    _fake_hub_snapshot(tmp_path, "org/tiny-model", "c" * 40)  # main moved on
    assert model_fingerprint(model) != at_main
    moved = model_fingerprint(model)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight.mul_(1.5)  # changed in memory after loading
    assert model_fingerprint(model) != moved
    model.config._name_or_path = "org/not-in-cache"
    assert model_fingerprint(model) != moved  # not in the cache: the full weight hash


# ----------------------------------------------------------------------------------------------------------------
# 7. The fast path: where the forward pass stops, block-triangular products, float32 products
# ----------------------------------------------------------------------------------------------------------------
def test_forward_pass_stops_before_the_module_runs(gpt2, gpt2_tokenizer, corpus):
    target = resolve_target(gpt2, 1)
    ran = []
    gpt2.get_submodule(target.name).register_forward_hook(lambda *_: ran.append(1))
    later = []
    gpt2.transformer.h[2].register_forward_pre_hook(lambda *_: later.append(1))
    stats = compute(gpt2, gpt2_tokenizer, dataset=corpus)
    assert stats.count > 0 and ran == [] and later == []


@pytest.mark.parametrize(("dim", "block"), [(300, 128), (64, 256), (256, 64)])
def test_gram_sum_is_symmetric_and_float64_products_are_exact(dim, block):
    from hf_edit.stats import GramSum

    g = torch.Generator().manual_seed(dim)
    keys = torch.nn.functional.gelu(torch.randn(3000, dim, generator=g) * torch.linspace(0.2, 3, dim))
    exact = keys.double().T @ keys.double()
    results = {}
    for product_dtype in (torch.float32, torch.float64):
        gram = GramSum(dim, "cpu", product_dtype, block=block)
        for part in keys.split(977):
            gram.add(part)
        results[product_dtype] = gram.result()
        assert gram.count == 3000 and results[product_dtype].dtype == torch.float64
        assert torch.equal(results[product_dtype], results[product_dtype].T)  # exactly symmetric
    relative = {dt: ((s - exact).norm() / exact.norm()).item() for dt, s in results.items()}
    assert relative[torch.float64] <= 1e-13
    assert relative[torch.float32] <= 1e-6  # float32 rounding of each batch's products (stated tolerance)


def test_float32_products_against_exact_float64_statistics(gpt2, gpt2_tokenizer, corpus):
    """Stated tolerance: float32 products summed in float64 put S within 1e-6 of the float64-product S (relative,
    Frobenius; measured 2e-7), and u = C⁻¹k within the perturbation bound κ(C)·‖ΔC‖/‖C‖ and 1e-3 (measured 3e-5 at
    κ ≈ 1e3 on this model)."""
    exact = compute(gpt2, gpt2_tokenizer, dataset=corpus)
    fast = compute(gpt2, gpt2_tokenizer, dataset=corpus, product_dtype="float32")
    assert exact.metadata["products"] == "float64" and fast.metadata["products"] == "float32"
    assert fast.dtype == exact.dtype == torch.float64 and fast.count == exact.count
    difference = fast.mom2_sum - exact.mom2_sum
    assert (difference.norm() / exact.mom2_sum.norm()).item() <= 1e-6
    k = torch.randn(20, exact.dim, generator=torch.Generator().manual_seed(0))
    u_exact, u_fast = exact.solve(k).double(), fast.solve(k).double()
    error = ((u_fast - u_exact).norm(dim=1) / u_exact.norm(dim=1)).max().item()
    c = exact.second_moment()
    bound = torch.linalg.cond(c).item() * (torch.linalg.matrix_norm(difference / exact.count, 2)
                                           / torch.linalg.matrix_norm(c, 2)).item()
    assert error <= 2 * bound + 1e-7 and error <= 1e-3


def test_products_and_sampling_are_recorded_and_keyed(gpt2, gpt2_tokenizer, corpus, tmp_path):
    target = resolve_target(gpt2, 1)
    kwargs = {"dataset": corpus, "n_samples": N_SAMPLES, "max_length": MAX_LEN, "progress": False,
              "cache_dir": tmp_path}
    default = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    assert default.metadata["sampling"] == {"scheme": "permutation"}
    assert default.metadata["texts_read"] == N_SAMPLES and default.metadata["products"] == "float64"
    parity = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs, dtype="float32")
    assert parity.metadata["products"] == "float32" and parity.dtype == torch.float32
    load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs, product_dtype="float32")
    assert len(stats_files(tmp_path)) == 3
    with pytest.raises(ConfigError, match="product_dtype"):
        load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs, product_dtype="bfloat16")
    with pytest.raises(ConfigError, match="batch_tokens"):
        compute(gpt2, gpt2_tokenizer, dataset=corpus, batch_tokens=0)


def test_reduced_float32_matmul_precision_is_reported(gpt2, gpt2_tokenizer, corpus, caplog):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with caplog.at_level("WARNING", logger="hf_edit.stats.compute"):
            compute(gpt2, gpt2_tokenizer, dataset=corpus, n_samples=10)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert "set_float32_matmul_precision('high')" in caplog.text and "'highest'" in caplog.text
