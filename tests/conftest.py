"""Shared fixtures: paths to ../shared/data, the real GPT-2 tokenizer, tiny models, an isolated HF cache."""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt2"
STORIES = SHARED_DATA / "models" / "stories260K"
CF_FACTS = SHARED_DATA / "models" / "cf-facts-gpt2"
WIKITEXT = SHARED_DATA / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"
COUNTERFACT = SHARED_DATA / "counterfact" / "counterfact-subset.json"
ZSRE = SHARED_DATA / "zsre" / "zsre-eval-subset.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# datasets and evaluate read these when imported: keep their caches out of the user's home during tests.
_CACHE_ROOT = tempfile.mkdtemp(prefix="hf_edit_tests_")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE_ROOT, "datasets"))
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(_CACHE_ROOT, "modules"))
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own hf_edit cache, so no test reads another's statistics."""
    cache = tmp_path_factory.mktemp("hf_edit_cache")
    monkeypatch.setenv("HF_EDIT_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_require(GPT2_TOKENIZER))
    return tok


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def wikitext_path() -> Path:
    return _require(WIKITEXT)


@pytest.fixture(scope="session")
def counterfact_path() -> Path:
    return _require(COUNTERFACT)


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return _require(STORIES)


@pytest.fixture(scope="session")
def cf_facts_path() -> Path:
    return _require(CF_FACTS)
