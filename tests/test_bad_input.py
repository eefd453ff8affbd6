"""Every bad input raises its specific hf_edit error and leaves the model and the statistics cache as they were.

Each test starts from an :class:`EditedModel` that already holds one edit (so there is an adapter to damage) and
whose statistics cache holds the layer's file, then checks, after the failure: logits on a fixed input bitwise
equal, the same edit objects, no hook left behind, and every cache file with the same bytes and mtime.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, ROMEConfig, SecondMomentStats
from hf_edit.architecture import resolve_target
from hf_edit.errors import (
    ConfigError,
    InsufficientStatisticsError,
    InvalidRequestError,
    LayerOutOfRangeError,
    OptimizationError,
    StatisticsCacheError,
    StatisticsMismatchError,
    SubjectNotFoundError,
    UnknownMethodError,
)

FIRST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
SECOND = EditRequest(prompt="{} plays the sport of", subject="Lionel Messi", target_new="tennis")
PROBE = "The Eiffel Tower is located in the city of"


def small_config(wikitext_path: Path, **overrides) -> ROMEConfig:
    settings = dict(layers=1, context_templates=("{}", "Hello. {}"), mom2_dataset=str(wikitext_path),
                    mom2_n_samples=200, mom2_max_length=64, v_num_grad_steps=3)
    return ROMEConfig(**{**settings, **overrides})


def base_model():
    return tiny_model("gpt2", vocab_size=50257)  # seeded: every call builds the same weights


# ----------------------------------------------------------------------------------------------------------------
# State snapshots
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class State:
    logits: torch.Tensor
    edits: tuple
    hooks: int
    cache: dict[str, tuple[str, int]]


def cache_files(folder: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256 of the bytes, mtime in ns) of every file under ``folder``."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def state(edited: EditedModel, tokenizer, cache_dir: Path) -> State:
    with torch.no_grad():
        logits = edited(**tokenizer(PROBE, return_tensors="pt")).logits.clone()
    model = edited.model
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return State(logits, edited.edits, hooks, cache_files(cache_dir))


def assert_unchanged(before: State, after: State) -> None:
    assert torch.equal(after.logits, before.logits)
    assert len(after.edits) == len(before.edits)
    assert all(a is b for a, b in zip(after.edits, before.edits))
    assert after.hooks == before.hooks
    assert after.cache == before.cache


def fails_atomically(edited, tokenizer, cache_dir, error, action, match=None):
    """Run ``action``; it must raise ``error`` and change nothing."""
    before = state(edited, tokenizer, cache_dir)
    with pytest.raises(error, match=match) as info:
        action()
    assert type(info.value) is error  # the specific class, not just a parent
    assert_unchanged(before, state(edited, tokenizer, cache_dir))


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------
def assert_edit_is_live(edited: EditedModel, tokenizer, cache_dir: Path) -> None:
    with edited.disable_edits():
        unedited = state(edited, tokenizer, cache_dir).logits
    assert not torch.equal(state(edited, tokenizer, cache_dir).logits, unedited)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, gpt2_tokenizer, wikitext_path) -> tuple[EditedModel, Path]:
    """One EditedModel with FIRST applied, and the cache folder its layer-1 statistics were computed into.

    Shared by the tests whose bad input is rejected before any computation (each compares against its own
    snapshot, so a test that changed the model would still be the one to fail).
    """
    folder = tmp_path_factory.mktemp("shared_hf_edit_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_EDIT_CACHE", str(folder))
        edited = EditedModel(base_model(), gpt2_tokenizer, method=small_config(wikitext_path), progress=False)
        edited.edit(FIRST)
    assert len(cache_files(folder)) == 1
    assert_edit_is_live(edited, gpt2_tokenizer, folder)
    return edited, folder


@pytest.fixture
def cache_dir(isolated_cache, shared) -> Path:
    """This test's own HF_EDIT_CACHE, holding a copy of the layer-1 statistics file."""
    shutil.copytree(shared[1] / "stats", isolated_cache / "stats")
    return isolated_cache


@pytest.fixture
def make_edited(gpt2_tokenizer, wikitext_path, cache_dir):
    """A new EditedModel with FIRST applied; ``first_edit`` overrides the settings of that edit."""

    def make(stats=None, **first_edit) -> EditedModel:
        config = small_config(wikitext_path)
        edited = EditedModel(base_model(), gpt2_tokenizer, method=config, stats=stats, progress=False)
        edited.edit(FIRST, method=replace(config, **first_edit))
        assert len(cache_files(cache_dir)) == 1  # the copied file was used (or not needed), nothing new cached
        assert_edit_is_live(edited, gpt2_tokenizer, cache_dir)
        return edited

    return make


@pytest.fixture
def edited(make_edited) -> EditedModel:
    return make_edited()


# ----------------------------------------------------------------------------------------------------------------
# Bad requests and methods
# ----------------------------------------------------------------------------------------------------------------
def _dict(**changes) -> dict:
    return {"prompt": SECOND.prompt, "subject": SECOND.subject, "target_new": {"str": SECOND.target_new},
            **changes}


BAD_CALLS = {
    "no placeholder": (InvalidRequestError, lambda e, c: e.edit(
        EditRequest(prompt="Lionel Messi plays the sport of", subject="Messi", target_new="tennis"))),
    "two placeholders": (InvalidRequestError, lambda e, c: e.edit(_dict(prompt="{} and {} play"))),
    "stray brace": (InvalidRequestError, lambda e, c: e.edit(_dict(prompt="{} plays {sport}"))),
    "empty subject": (InvalidRequestError, lambda e, c: e.edit(_dict(subject=""))),
    "padded subject": (InvalidRequestError, lambda e, c: e.edit(_dict(subject="Lionel Messi "))),
    "empty target": (InvalidRequestError, lambda e, c: e.edit(_dict(target_new={"str": ""}))),
    "subject not in prompt": (SubjectNotFoundError, lambda e, c: e.edit(
        {"prompt": "Messi plays the sport of", "subject": "Lionel Messi", "target_new": "tennis"})),
    "good then malformed in one call": (InvalidRequestError, lambda e, c: e.edit(
        [SECOND, _dict(prompt="{} and {} play")])),
    "unknown method": (UnknownMethodError, lambda e, c: e.edit(SECOND, method="no-such-method")),
    "unknown hyperparameter": (ConfigError, lambda e, c: e.edit(
        SECOND, method={**c.to_dict(), "learning_rate": 0.1})),
    "NaN learning rate": (ConfigError, lambda e, c: e.edit(SECOND, method={**c.to_dict(), "v_lr": float("nan")})),
    "layer out of range": (LayerOutOfRangeError, lambda e, c: e.edit(SECOND, method=replace(c, layers=(7,)))),
    "one of two layers out of range": (LayerOutOfRangeError, lambda e, c: e.edit(
        SECOND, method=replace(c, layers=(1, -4)))),
    "module that is not a projection": (ConfigError, lambda e, c: e.edit(
        SECOND, method=replace(c, rewrite_module_tmp="transformer.h.{}.mlp"))),
    "missing module": (ConfigError, lambda e, c: e.edit(
        SECOND, method=replace(c, rewrite_module_tmp="model.layers.{}.mlp.down_proj"))),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_request_or_method(case, shared, gpt2_tokenizer, wikitext_path, monkeypatch):
    error, call = BAD_CALLS[case]
    edited, cache_dir = shared
    monkeypatch.setenv("HF_EDIT_CACHE", str(cache_dir))  # the cache the shared model's statistics live in
    config = small_config(wikitext_path)
    fails_atomically(edited, gpt2_tokenizer, cache_dir, error, lambda: call(edited, config))


# ----------------------------------------------------------------------------------------------------------------
# Bad statistics
# ----------------------------------------------------------------------------------------------------------------
def spd_stats(dim: int, **metadata) -> SecondMomentStats:
    """Statistics of 4·dim random keys: symmetric positive definite, usable if only the shape fitted."""
    keys = torch.randn(4 * dim, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return SecondMomentStats(keys.T @ keys, 4 * dim, metadata)


def test_explicit_statistics_of_the_wrong_shape(make_edited, gpt2_tokenizer, cache_dir):
    width = resolve_target(base_model(), 1).in_features
    edited = make_edited(stats=spd_stats(width + 8), mom2_adjustment=False)  # the first edit needs no C
    fails_atomically(edited, gpt2_tokenizer, cache_dir, StatisticsMismatchError, lambda: edited.edit(SECOND),
                     match="input width")


def test_explicit_statistics_of_another_layer(make_edited, gpt2_tokenizer, cache_dir):
    width = resolve_target(base_model(), 1).in_features
    edited = make_edited(stats=spd_stats(width, module="transformer.h.0.mlp.c_proj"), mom2_adjustment=False)
    fails_atomically(edited, gpt2_tokenizer, cache_dir, StatisticsMismatchError, lambda: edited.edit(SECOND),
                     match="another layer")


def test_explicit_statistics_missing_for_the_layer(make_edited, gpt2_tokenizer, cache_dir, wikitext_path):
    width = resolve_target(base_model(), 1).in_features
    edited = make_edited(stats={1: spd_stats(width)})
    fails_atomically(edited, gpt2_tokenizer, cache_dir, StatisticsMismatchError,
                     lambda: edited.edit(SECOND, method=small_config(wikitext_path, layers=2)))


def test_too_little_text_for_statistics(edited, gpt2_tokenizer, cache_dir, wikitext_path):
    """A new sample size misses the cache; C from one short text cannot be inverted, and nothing is cached."""
    config = small_config(wikitext_path, mom2_n_samples=1, mom2_max_length=16)
    fails_atomically(edited, gpt2_tokenizer, cache_dir, InsufficientStatisticsError,
                     lambda: edited.edit(SECOND, method=config))


def test_corrupted_statistics_cache_file(edited, gpt2_tokenizer, cache_dir, wikitext_path):
    (path,) = (cache_dir / "stats").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the second-moment sum
    path.write_bytes(bytes(data))

    # A new EditedModel of the same base model reads the file again and refuses it ...
    fresh = EditedModel(base_model(), gpt2_tokenizer, method=small_config(wikitext_path), progress=False)
    fails_atomically(fresh, gpt2_tokenizer, cache_dir, StatisticsCacheError, lambda: fresh.edit(FIRST),
                     match="Delete it")
    # ... while the model that verified the statistics when it first read them shares them with every method and
    # config (the statistics provider), so it neither re-reads nor touches the file.
    edited.edit(SECOND, method=small_config(wikitext_path, v_num_grad_steps=2))
    assert len(edited.edits) == 2
    assert fresh.edits == () and fresh.peft_model is None
    assert path.read_bytes() == bytes(data)


# ----------------------------------------------------------------------------------------------------------------
# Failures during the computation
# ----------------------------------------------------------------------------------------------------------------
def test_nan_in_the_optimisation(edited, gpt2_tokenizer, cache_dir):
    """NaN logits (as from an fp16 overflow) make the v* loss non-finite: OptimizationError, nothing applied."""
    before = state(edited, gpt2_tokenizer, cache_dir)
    head = edited.base_model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, logits: torch.full_like(logits, float("nan")))
    try:
        with pytest.raises(OptimizationError, match="non-finite loss at step 0"):
            edited.edit(SECOND)
    finally:
        handle.remove()
    assert_unchanged(before, state(edited, gpt2_tokenizer, cache_dir))


def test_failure_in_the_second_request_rolls_back_the_first(edited, gpt2_tokenizer, cache_dir):
    """[SECOND, POISONED]: SECOND is applied, then POISONED fails in its optimisation; SECOND must be undone."""
    poisoned = EditRequest(prompt="{} is located in", subject="Atlantis", target_new="Greece")
    poison = set(gpt2_tokenizer("Atlantis")["input_ids"])
    assert not poison & set(gpt2_tokenizer("Hello. " + SECOND.filled_prompt + " tennis")["input_ids"])
    assert not poison & set(gpt2_tokenizer(PROBE)["input_ids"])
    edits_when_poisoned = []

    def nan_on_poison(_module, args, output):
        if poison & set(args[0].flatten().tolist()):
            edits_when_poisoned.append(len(edited.edits))
            return torch.full_like(output, float("nan"))
        return output

    before = state(edited, gpt2_tokenizer, cache_dir)
    handle = edited.base_model.get_input_embeddings().register_forward_hook(nan_on_poison)
    try:
        with pytest.raises(OptimizationError, match="Atlantis"):
            edited.edit([SECOND, poisoned])
    finally:
        handle.remove()
    assert edits_when_poisoned and edits_when_poisoned[0] == len(before.edits) + 1  # SECOND was in place
    assert_unchanged(before, state(edited, gpt2_tokenizer, cache_dir))
