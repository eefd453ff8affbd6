"""Statistics over a Hub data set that is streamed, not downloaded, and what happens offline.

The Hub is replaced by local stand-ins: ``HfApi.dataset_info`` answers with a commit, and ``datasets.load_dataset``
returns a local ``datasets.IterableDataset`` (which also records how many rows were read).  Expected samples are
written out independently: the reference's ``random.Random(seed)`` permutation applied to the first
``oversample × n_samples`` rows of the stream.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from tiny_models import tiny_model

from hf_edit.architecture import resolve_target
from hf_edit.errors import ConfigError, StatisticsError
from hf_edit.stats import (
    STREAM_OVERSAMPLE,
    HubUnreachableError,
    compute_second_moment,
    load_or_compute_stats,
    sample_texts,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MAX_LEN = 48


# ----------------------------------------------------------------------------------------------------------------
# A fake Hub
# ----------------------------------------------------------------------------------------------------------------
class FakeHub:
    """Stands in for the Hub: a commit per dataset id, and each dataset's rows served as a stream."""

    def __init__(self, rows: list[str]) -> None:
        self.rows = rows
        self.commit = COMMIT
        self.loads: list[tuple[tuple, dict]] = []
        self.rows_read = 0
        self.info_calls = 0

    def dataset_info(self, _api, repo_id: str, **kwargs):
        self.info_calls += 1
        return SimpleNamespace(id=repo_id, sha=self.commit)

    def load_dataset(self, *args, **kwargs):
        self.loads.append((args, kwargs))
        assert kwargs.get("streaming") is True, "the Hub data set must be streamed, not downloaded"
        rows = self.rows

        def generate():
            for index, text in enumerate(rows):
                self.rows_read = index + 1
                yield {"id": str(index), "text": text}

        return datasets.IterableDataset.from_generator(generate)


@pytest.fixture
def online(monkeypatch):
    """Offline mode off (the test session runs with HF_HUB_OFFLINE=1)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


@pytest.fixture
def wiki_rows(wikitext_path) -> list[str]:
    return wikitext_path.read_text(encoding="utf-8").splitlines()[:3000]


@pytest.fixture
def hub(online, monkeypatch, wiki_rows) -> FakeHub:
    from huggingface_hub import HfApi

    fake = FakeHub(wiki_rows)
    monkeypatch.setattr(HfApi, "dataset_info", lambda api, repo_id, **kw: fake.dataset_info(api, repo_id, **kw))
    monkeypatch.setattr(datasets, "load_dataset", fake.load_dataset)
    return fake


@pytest.fixture
def gpt2():
    return tiny_model("gpt2", vocab_size=50257)


def prefix_sample(rows: list[str], n: int, seed: int, window: int) -> list[str]:
    """The reference's rule on the first ``window`` rows, in stream order."""
    order = list(range(min(window, len(rows))))
    random.Random(seed).shuffle(order)
    chosen = set(order[:n])
    return [rows[i] for i in sorted(chosen)]


def all_texts(sample) -> list[str]:
    return [text for chunk in sample.chunks(7) for text in chunk]


# ----------------------------------------------------------------------------------------------------------------
# Sampling a stream
# ----------------------------------------------------------------------------------------------------------------
def test_hub_id_is_streamed_at_its_commit_and_only_a_prefix_is_read(hub, wiki_rows):
    sample = sample_texts("wikipedia", 40, seed=3, oversample=5)
    assert hub.loads == []  # resolving the sample reads nothing
    assert sample.dataset == f"wikimedia/wikipedia:20231101.en:train@{COMMIT}"
    assert sample.sampling == {"scheme": "stream-prefix", "oversample": 5}
    texts = all_texts(sample)
    assert hub.loads == [(("wikimedia/wikipedia", "20231101.en"),
                          {"split": "train", "streaming": True, "revision": COMMIT})]
    assert texts == [t or "" for t in prefix_sample(wiki_rows, 40, 3, 200)]
    assert hub.rows_read < len(wiki_rows) // 2  # the rest of the stream was never read
    assert sample.details() == {"stream_rows_read": 200, "stream_window": 200}


def test_default_oversampling_and_other_seeds(hub, wiki_rows):
    assert STREAM_OVERSAMPLE == 10
    texts = all_texts(sample_texts("owner/corpus", 30, seed=1))
    assert hub.loads[-1][0] == ("owner/corpus", None)
    assert texts == prefix_sample(wiki_rows, 30, 1, 300)
    assert all_texts(sample_texts("owner/corpus", 30, seed=2)) == prefix_sample(wiki_rows, 30, 2, 300)


def test_short_stream_gives_the_reference_sample_of_all_rows(hub, caplog):
    hub.rows = [f"text number {i}" for i in range(150)]  # fewer rows than 10 × 20
    sample = sample_texts("owner/small", 20, seed=1)
    chunks = sample.chunks(1000)
    with pytest.raises(Exception) as ended:  # the internal signal that the stream ended early
        list(chunks)
    assert type(ended.value).__name__ == "StreamEndedEarly" and ended.value.rows == 150
    with caplog.at_level(logging.WARNING, logger="hf_edit.stats.texts"):
        sample.redraw(150)
    assert "only 150 rows" in caplog.text
    order = list(range(150))
    random.Random(1).shuffle(order)
    assert all_texts(sample) == [hub.rows[i] for i in sorted(order[:20])]  # = the "permutation" sample


def test_all_rows_and_bad_arguments(hub, wiki_rows):
    hub.rows = wiki_rows[:50]
    assert all_texts(sample_texts("owner/small", None)) == wiki_rows[:50]
    with pytest.raises(ConfigError, match="n_samples"):
        sample_texts("owner/small", 0)
    with pytest.raises(ConfigError, match="oversample"):
        sample_texts("owner/small", 5, oversample=0)
    with pytest.raises(ConfigError, match="IterableDataset"):
        sample_texts(datasets.Dataset.from_dict({"text": ["a"]}).to_iterable_dataset(), 5)


def test_stream_without_text_column(hub, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_dict({"body": ["x"] * 5}).to_iterable_dataset())
    with pytest.raises(ConfigError, match="'text' column"):
        all_texts(sample_texts("owner/no-text", 2))


# ----------------------------------------------------------------------------------------------------------------
# Statistics over a stream: values, cache key and metadata
# ----------------------------------------------------------------------------------------------------------------
def test_streamed_statistics_equal_those_of_the_same_texts_given_locally(hub, gpt2, gpt2_tokenizer, wiki_rows):
    target = resolve_target(gpt2, 1)
    kwargs = {"n_samples": 25, "max_length": MAX_LEN, "progress": False, "seed": 4}
    streamed = compute_second_moment(gpt2, gpt2_tokenizer, target, dataset="owner/corpus", **kwargs)
    chosen = prefix_sample(wiki_rows, 25, 4, 250)
    local = compute_second_moment(gpt2, gpt2_tokenizer, target, dataset=datasets.Dataset.from_dict({"text": chosen}),
                                  **{**kwargs, "n_samples": None})
    assert streamed.count == local.count
    torch.testing.assert_close(streamed.mom2_sum, local.mom2_sum, rtol=1e-6,
                               atol=1e-6 * local.mom2_sum.abs().max().item())
    meta = streamed.metadata
    assert meta["dataset"] == f"owner/corpus::train@{COMMIT}" and meta["n_samples"] == 25 and meta["seed"] == 4
    assert meta["sampling"] == {"scheme": "stream-prefix", "oversample": 10}
    assert meta["stream_window"] == 250 and meta["texts_read"] == 25


def test_short_stream_statistics_equal_the_permutation_statistics(hub, gpt2, gpt2_tokenizer, wiki_rows):
    hub.rows = wiki_rows[:120]
    target = resolve_target(gpt2, 1)
    kwargs = {"n_samples": 40, "max_length": MAX_LEN, "progress": False}
    streamed = compute_second_moment(gpt2, gpt2_tokenizer, target, dataset="owner/small", **kwargs)
    local = compute_second_moment(gpt2, gpt2_tokenizer, target, dataset=datasets.Dataset.from_dict(
        {"text": wiki_rows[:120]}), **kwargs)
    assert streamed.count == local.count and streamed.metadata["stream_window"] == 120
    torch.testing.assert_close(streamed.mom2_sum, local.mom2_sum, rtol=1e-6,
                               atol=1e-6 * local.mom2_sum.abs().max().item())


def test_every_sampling_parameter_is_part_of_the_cache_key(hub, gpt2, gpt2_tokenizer, tmp_path):
    target = resolve_target(gpt2, 1)
    kwargs = {"dataset": "owner/corpus", "n_samples": 20, "max_length": MAX_LEN, "progress": False,
              "cache_dir": tmp_path}
    first = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    loads = len(hub.loads)
    again = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    assert again.from_cache and again.path == first.path and len(hub.loads) == loads  # nothing streamed
    load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs, seed=2)
    load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs, stream_oversample=4)
    hub.commit = "f" * 40  # the data set changed on the Hub
    moved = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    assert not moved.from_cache and moved.metadata["dataset"].endswith("@" + "f" * 40)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


# ----------------------------------------------------------------------------------------------------------------
# Offline
# ----------------------------------------------------------------------------------------------------------------
def assert_tells_how_to_pass_local_text(message: str) -> None:
    for fragment in ("--stats-data", "stats_data=", "ROMEConfig(mom2_dataset=", "--data"):
        assert fragment in message, (fragment, message)
    assert "datasets.Dataset" not in message and "\n" not in message


def test_offline_mode_fails_at_once_with_what_to_pass(monkeypatch, gpt2, gpt2_tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be loaded offline")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    started = time.perf_counter()
    with pytest.raises(HubUnreachableError) as error:
        compute_second_moment(gpt2, gpt2_tokenizer, resolve_target(gpt2, 1), dataset="wikipedia", n_samples=10,
                              progress=False)
    assert time.perf_counter() - started < 5
    assert isinstance(error.value, StatisticsError)
    assert "HF_HUB_OFFLINE=1" in str(error.value) and "wikimedia/wikipedia:20231101.en" in str(error.value)
    assert_tells_how_to_pass_local_text(str(error.value))


def test_no_network_fails_after_one_request(online, monkeypatch):
    from huggingface_hub import HfApi

    calls = []

    def unreachable(api, repo_id, **kwargs):
        calls.append(kwargs.get("timeout"))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    with pytest.raises(HubUnreachableError, match="Name or service not known") as error:
        sample_texts("wikipedia", 10)
    assert len(calls) == 1 and calls[0] is not None and calls[0] <= 30  # one request, bounded, no retries
    assert_tells_how_to_pass_local_text(str(error.value))


def test_unknown_hub_dataset_is_a_config_error(online, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(api, repo_id, **kwargs):
        response = SimpleNamespace(headers={}, request=None, status_code=404)  # what the error reads of it
        raise RepositoryNotFoundError(f"404 Client Error: repository {repo_id} not found", response=response)

    monkeypatch.setattr(HfApi, "dataset_info", not_found)
    with pytest.raises(ConfigError, match="owner/missing"):
        sample_texts("owner/missing", 10)


def test_offline_uses_statistics_cached_while_online(hub, monkeypatch, gpt2, gpt2_tokenizer, tmp_path, caplog):
    target = resolve_target(gpt2, 1)
    kwargs = {"dataset": "wikipedia", "n_samples": 20, "max_length": MAX_LEN, "progress": False,
              "cache_dir": tmp_path}
    online_stats = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loads = len(hub.loads)
    with caplog.at_level(logging.WARNING, logger="hf_edit.stats.compute"):
        offline_stats = load_or_compute_stats(gpt2, gpt2_tokenizer, target, **kwargs)
    assert offline_stats.from_cache and offline_stats.path == online_stats.path and len(hub.loads) == loads
    assert torch.equal(offline_stats.mom2_sum, online_stats.mom2_sum)
    assert COMMIT in caplog.text
    with pytest.raises(HubUnreachableError):  # other settings: nothing cached for them
        load_or_compute_stats(gpt2, gpt2_tokenizer, target, **{**kwargs, "n_samples": 21})


def test_rome_edit_with_the_default_statistics_data_offline(monkeypatch, gpt2, gpt2_tokenizer):
    from hf_edit import EditedModel, EditRequest, ROMEConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    edited = EditedModel.from_pretrained(gpt2, tokenizer=gpt2_tokenizer, progress=False)
    request = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome")
    with pytest.raises(StatisticsError) as error:
        edited.edit([request], method=ROMEConfig(layers=(1,), v_num_grad_steps=2))
    assert_tells_how_to_pass_local_text(str(error.value))


@pytest.mark.slow
def test_command_line_offline_error_is_one_line(tmp_path, gpt2_tokenizer):
    base = tmp_path / "base"
    tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)).save_pretrained(base)
    gpt2_tokenizer.save_pretrained(base)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EDIT_CACHE=str(tmp_path / "cache"))
    for args in (["stats", "compute", "--model", str(base), "--layer", "1", "--n-samples", "10"],
                 ["edit", "--model", str(base), "--prompt", "{} is located in", "--subject", "The Eiffel Tower",
                  "--target", "Rome", "--method", "rome", "--out", str(tmp_path / "out")]):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "hf_edit", *args], capture_output=True, text=True, env=env,
                                timeout=300, cwd=tmp_path, check=False)
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("hf-edit: error: ") and "Traceback" not in result.stderr
        assert_tells_how_to_pass_local_text(last)
        assert time.perf_counter() - started < 120  # import and model load only: no retries
    assert not Path(tmp_path / "out").exists()


def test_a_stream_that_breaks_names_the_data_set_and_caches_nothing(hub, monkeypatch, gpt2, gpt2_tokenizer,
                                                                    tmp_path):
    def broken():
        for index in range(30):
            yield {"text": f"row {index}"}
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.IterableDataset.from_generator(broken))
    with pytest.raises(StatisticsError, match="owner/flaky::train@.*connection reset by peer"):
        load_or_compute_stats(gpt2, gpt2_tokenizer, resolve_target(gpt2, 1), dataset="owner/flaky", n_samples=5,
                              max_length=MAX_LEN, progress=False, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())
