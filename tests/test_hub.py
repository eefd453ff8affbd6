"""Sharing edits on the Hub, offline: model cards, push / load (also in a fresh process), revisions and tokens,
merged checkpoints, and second-moment statistics on a dataset repo.  Every request goes to the in-process fake
Hub of ``fake_hub.py``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fake_hub import fake_hub, subprocess_env  # noqa: F401
from helpers import one_thread
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, ROMEConfig, SecondMomentStats
from hf_edit.architecture import resolve_target
from hf_edit.errors import HfEditError, StatisticsCacheError, StatisticsMismatchError
from hf_edit.hub import (
    StatisticsNotFoundError,
    import_npz_to_hub,
    pull_stats,
    push_edit_folder,
    push_stats,
    stats_path_in_repo,
)
from hf_edit.cards import render_card
from hf_edit.methods.ft import FTConfig
from hf_edit.stats import compute_second_moment

REQUESTS = [
    EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome",
                target_true="Paris"),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"),
    EditRequest(prompt="{} plays the sport of", subject="Michael | Jordan", target_new="chess",
                target_true="basketball"),
]
PROBE = "The Eiffel Tower is located in the city of Paris, said Danielle Darrieux"
FTL = FTConfig(layers=2, lr=1e-2, num_steps=5, norm_constraint=1e-3)
TOKEN = "hf_test_token"
HUB_BASE = "user/tiny-gpt2"
TESTS = Path(__file__).parent


def _rome(wikitext_path) -> ROMEConfig:
    return ROMEConfig(layers=1, mom2_dataset=str(wikitext_path), mom2_n_samples=300, mom2_max_length=64,
                      context_templates=("{}", "Hello world. {}"), v_num_grad_steps=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, gpt2_tokenizer, wikitext_path):
    """A tiny GPT-2 in a local folder; its edit folders: two ROME edits, and the same plus an FT+L run."""
    root = tmp_path_factory.mktemp("hub_edits")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_EDIT_CACHE", str(root / "cache"))
        base = root / "base"
        tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)).save_pretrained(base)
        gpt2_tokenizer.save_pretrained(base)
        edited = EditedModel.from_pretrained(base, edits=REQUESTS[:2], method=_rome(wikitext_path), progress=False)
        edited.save_pretrained(root / "rome")
        edited.edit(REQUESTS[2], method=FTL)
        edited.save_pretrained(root / "mixed")
    return SimpleNamespace(base=base, rome=root / "rome", mixed=root / "mixed")


@pytest.fixture
def hub_base(fake_hub, saved):  # noqa: F811
    """The tiny base model and its tokenizer as the Hub model repo ``user/tiny-gpt2``."""
    from huggingface_hub import HfApi

    api = HfApi(token=TOKEN)
    api.create_repo(HUB_BASE)
    api.upload_folder(repo_id=HUB_BASE, folder_path=str(saved.base))
    return HUB_BASE


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROBE, return_tensors="pt")).logits


def _subjects(requests) -> list[str]:
    return [r.subject for r in requests]


# --------------------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------------------
def test_card_metadata_facts_methods_eval_and_limitations(tmp_path, saved):
    from huggingface_hub import ModelCard

    card = render_card(saved.mixed, {"efficacy": 0.975, "neighborhood | score": 0.5}, eval_dataset="azhx/counterfact",
                       repo_id="user/edits", base_model_id=HUB_BASE)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.base_model == HUB_BASE and data.library_name == "peft"
    assert data.base_model_relation == "adapter" and data.pipeline_tag == "text-generation"
    assert {"knowledge-editing", "hf_edit", "rome", "ft+l"} <= set(data.tags)
    assert {(r.metric_name, r.metric_value, r.dataset_type) for r in data.eval_results} == {
        ("efficacy", 0.975, "azhx/counterfact"), ("neighborhood | score", 0.5, "azhx/counterfact")}
    text = loaded.text
    assert "| 1 | The Eiffel Tower | The Eiffel Tower is located in the city of | Paris → **Rome** | ROME | 1 |" in text
    assert "| Danielle Darrieux | The mother tongue of Danielle Darrieux is | ? → **English** |" in text
    assert "Michael \\| Jordan plays the sport of | basketball → **chess** | FT+L | 2 |" in text
    assert "### ROME" in text and "### FT+L" in text and "| `norm_constraint` | `0.001` |" in text
    assert 'EditedModel.from_pretrained("user/edits")' in text
    assert 'PeftModel.from_pretrained(base, "user/edits")' in text
    assert 'model.load_adapter("user/edits", adapter_name="edit_1", subfolder="edit_1")' in text
    assert "| neighborhood \\| score | 0.5 |" in text and "| efficacy | 0.975 |" in text
    assert "## Limitations" in text and "paraphrases" in text and "multi-hop" in text and "collapse" in text
    assert "half-precision" in text


def test_save_pretrained_writes_the_card_and_local_bases_stay_out_of_metadata(saved):
    from huggingface_hub import ModelCard

    card = ModelCard.load(saved.rome / "README.md")
    assert card.data.library_name == "peft" and "knowledge-editing" in card.data.tags
    assert card.data.base_model is None  # a local path is not a Hub id: only in the text
    assert str(saved.base) in card.text and "rome" in card.data.tags and "ft+l" not in card.data.tags
    assert all(subject in card.text for subject in _subjects(REQUESTS[:2]))
    assert "subfolder" not in card.text  # one adapter
    assert "## Evaluation" not in card.text
    assert str(render_card(EditedModel.from_pretrained(saved.rome, progress=False))) == str(card)


# --------------------------------------------------------------------------------------------------------------
# Pushing and loading edits
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_push_then_load_in_a_fresh_process(tmp_path, fake_hub, saved, hub_base, gpt2_tokenizer):  # noqa: F811
    from huggingface_hub import ModelCard

    edited = EditedModel.from_pretrained(saved.rome, progress=False)
    n_commits = len(fake_hub.repos.get(("model", "user/rome-edit"), SimpleNamespace(commits={})).commits)
    url = edited.push_to_hub("user/rome-edit", token=TOKEN, base_model_id=hub_base)
    files = fake_hub.files("user/rome-edit")
    assert {"adapter_config.json", "adapter_model.safetensors", "hf_edit.json", "README.md"} <= set(files)
    commits = fake_hub.commits("user/rome-edit")
    assert len(commits) == n_commits + 2  # the repo's initial commit and ONE upload commit
    assert url == f"https://huggingface.co/user/rome-edit/commit/{commits[-1].oid}"
    (tmp_path / "README.md").write_bytes(files["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert (card.data.base_model, card.data.library_name, card.data.base_model_relation) == (
        hub_base, "peft", "adapter")
    assert {"knowledge-editing", "rome"} <= set(card.data.tags)
    assert all(subject in card.text for subject in _subjects(REQUESTS[:2]))
    assert f"Bearer {TOKEN}" in fake_hub.authorizations()

    ids = gpt2_tokenizer(PROBE, return_tensors="pt")["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)  # bitwise comparisons: the same summation order on both sides
        sys.path.insert(0, {str(TESTS)!r})
        from fake_hub import install_from_env
        hub = install_from_env()
        from hf_edit import EditedModel
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        model = EditedModel.from_pretrained("user/rome-edit", progress=False)
        assert [e.request.subject for e in model.edits] == {_subjects(REQUESTS[:2])!r}
        base = AutoModelForCausalLM.from_pretrained({str(saved.base)!r}, dtype=torch.float32)
        plain = PeftModel.from_pretrained(base, "user/rome-edit").eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / 'hf_edit.pt')!r})
            torch.save(plain(input_ids=ids).logits, {str(tmp_path / 'peft.pt')!r})
        assert not hub.unhandled, hub.unhandled
    """)
    env = subprocess_env(fake_hub, tmp_path / "hub.json", tmp_path / "fresh_hf_home")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    with one_thread():
        expected = _logits(edited, gpt2_tokenizer)
    assert torch.equal(torch.load(tmp_path / "hf_edit.pt"), expected)
    assert torch.equal(torch.load(tmp_path / "peft.pt"), expected)
    assert not fake_hub.unhandled


def test_rome_and_ft_repo_loads_with_hf_edit_and_with_the_cards_peft_snippet(fake_hub, saved,  # noqa: F811
                                                                               gpt2_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    edited = EditedModel.from_pretrained(saved.mixed, progress=False)
    edited.push_to_hub("user/mixed")
    files = fake_hub.files("user/mixed")
    assert {"edit_1/adapter_config.json", "edit_1/adapter_model.safetensors"} <= set(files)
    text = files["README.md"].decode()
    assert "### ROME" in text and "### FT+L" in text
    expected = _logits(edited, gpt2_tokenizer)
    assert torch.equal(_logits(EditedModel.from_pretrained("user/mixed", progress=False), gpt2_tokenizer), expected)

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved.base, dtype=torch.float32),
                                      "user/mixed")  # the card's snippet, line by line
    plain.load_adapter("user/mixed", adapter_name="edit_1", subfolder="edit_1")
    plain.base_model.set_adapter(["default", "edit_1"])
    assert torch.equal(_logits(plain.eval(), gpt2_tokenizer), expected)

    # Pushing only ROME edits now removes the stale FT adapter folder in the same commit.
    EditedModel.from_pretrained(saved.rome, progress=False).push_to_hub("user/mixed")
    assert not [p for p in fake_hub.files("user/mixed") if p.startswith("edit_1/")]
    assert len(fake_hub.commits("user/mixed")) == 3
    assert len(EditedModel.from_pretrained("user/mixed", progress=False).edits) == 2


def test_revision_pinning_and_token_passthrough(fake_hub, saved, gpt2_tokenizer):  # noqa: F811
    first = EditedModel.from_pretrained(saved.rome, progress=False)
    first.push_to_hub("user/pinned", private=True, token=TOKEN)
    first_commit = fake_hub.commits("user/pinned")[-1].oid
    second = EditedModel.from_pretrained(saved.mixed, progress=False)
    second.push_to_hub("user/pinned", token=TOKEN, commit_message="add an FT+L edit")
    assert fake_hub.commits("user/pinned")[-1].message == "add an FT+L edit"
    # The repo is private: without the token it is not found, so the id is tried as a base model and fails.
    # (Once downloaded, huggingface_hub serves it from the cache after an authorisation error.)
    with pytest.raises(OSError):
        EditedModel.from_pretrained("user/pinned", progress=False)

    fake_hub.log.clear()
    pinned = EditedModel.from_pretrained("user/pinned", revision=first_commit, token=TOKEN, progress=False)
    assert [e.request for e in pinned.edits] == REQUESTS[:2]
    assert torch.equal(_logits(pinned, gpt2_tokenizer), _logits(first, gpt2_tokenizer))
    assert {r.authorization for r in fake_hub.log} == {f"Bearer {TOKEN}"}
    assert any(first_commit in r.path for r in fake_hub.log)
    latest = EditedModel.from_pretrained("user/pinned", token=TOKEN, progress=False)
    assert [e.method for e in latest.edits] == ["rome", "rome", "ft+l"]


def test_push_edit_folder_and_branch_revision(fake_hub, saved):  # noqa: F811
    url = push_edit_folder(saved.rome, "user/folder", revision="experiments", eval_results={"efficacy": 1.0})
    commit = fake_hub.repo("user/folder").refs["experiments"]
    assert url.endswith(commit) and "hf_edit.json" not in fake_hub.files("user/folder", "main")
    readme = fake_hub.files("user/folder", "experiments")["README.md"].decode()
    assert 'EditedModel.from_pretrained("user/folder")' in readme and "| efficacy | 1 |" in readme
    loaded = EditedModel.from_pretrained("user/folder", revision="experiments", progress=False)
    assert len(loaded.edits) == 2


def test_offline_mode_loads_cached_edit_repos_and_falls_back_fast(monkeypatch, fake_hub, saved,  # noqa: F811
                                                                 gpt2_tokenizer):
    from huggingface_hub import constants

    edited = EditedModel.from_pretrained(saved.rome, progress=False)
    edited.push_to_hub("user/cached")
    EditedModel.from_pretrained("user/cached", progress=False)  # online: fills the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.log.clear()
    cached = EditedModel.from_pretrained("user/cached", progress=False)
    assert torch.equal(_logits(cached, gpt2_tokenizer), _logits(edited, gpt2_tokenizer))
    start = time.monotonic()
    with pytest.raises(OSError):
        EditedModel.from_pretrained("user/never-downloaded", progress=False)
    assert time.monotonic() - start < 5
    assert fake_hub.log == []  # offline: no request at all


# --------------------------------------------------------------------------------------------------------------
# Merged checkpoints
# --------------------------------------------------------------------------------------------------------------
def _assert_merged_card(readme: bytes, tmp_path: Path, tokenizer_repo: str) -> None:
    from huggingface_hub import ModelCard

    (tmp_path / "MERGED.md").write_bytes(readme)
    card = ModelCard.load(tmp_path / "MERGED.md")
    assert (card.data.base_model, card.data.base_model_relation, card.data.library_name) == (
        HUB_BASE, "finetune", "transformers")
    assert {"knowledge-editing", "rome", "merged-edits"} <= set(card.data.tags)
    assert "This is an edited model." in card.text
    assert all(subject in card.text for subject in _subjects(REQUESTS[:2]))
    assert f'AutoTokenizer.from_pretrained("{tokenizer_repo}")' in card.text


@pytest.mark.slow
def test_merged_checkpoints_carry_the_edited_card(tmp_path, fake_hub, hub_base, gpt2_tokenizer,  # noqa: F811
                                                  wikitext_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    edited = EditedModel.from_pretrained(hub_base, edits=REQUESTS[:2], method=_rome(wikitext_path), progress=False)
    edited.save_pretrained(tmp_path / "edit")
    assert edited.manifest()["base_model"] == hub_base

    url = edited.push_merged_to_hub("user/merged", token=TOKEN)
    with pytest.raises(HfEditError, match="merge"):
        edited.edit(REQUESTS[2])  # consumed, as merge_and_unload
    files = fake_hub.files("user/merged")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert url.endswith(fake_hub.commits("user/merged")[-1].oid) and len(fake_hub.commits("user/merged")) == 2
    assert b"hf_edit" not in files["config.json"]
    _assert_merged_card(files["README.md"], tmp_path, "user/merged")

    merged = EditedModel.from_pretrained(tmp_path / "edit", progress=False).merge_and_unload()
    assert merged.hf_edit_manifest["edits"][0]["requests"][0]["subject"] == REQUESTS[0].subject
    info = merged.push_to_hub("user/merged-by-transformers-api", token=TOKEN)
    assert info.oid == fake_hub.commits("user/merged-by-transformers-api")[-1].oid
    _assert_merged_card(fake_hub.files("user/merged-by-transformers-api")["README.md"], tmp_path, hub_base)

    merged.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="user/merged-by-save", token=TOKEN)
    _assert_merged_card((tmp_path / "local" / "README.md").read_bytes(), tmp_path, hub_base)
    assert fake_hub.files("user/merged-by-save")["README.md"] == (tmp_path / "local" / "README.md").read_bytes()

    expected = _logits(merged, gpt2_tokenizer)
    for repo in ("user/merged", "user/merged-by-transformers-api", "user/merged-by-save"):
        reloaded = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32).eval()
        assert torch.equal(_logits(reloaded, gpt2_tokenizer), expected), repo
    assert AutoTokenizer.from_pretrained("user/merged")(PROBE)["input_ids"] == gpt2_tokenizer(PROBE)["input_ids"]
    assert not fake_hub.unhandled


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stats(gpt2_tokenizer, wikitext_path) -> SecondMomentStats:
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    return compute_second_moment(model, gpt2_tokenizer, resolve_target(model, 1), dataset=wikitext_path,
                                 n_samples=300, max_length=64, progress=False)


STATS_ARGS = {"model_id": HUB_BASE, "model_revision": "main", "dataset": "wikitext-2-raw/valid", "n_samples": 300}
STATS_PATH = ("stats/user--tiny-gpt2/main/transformer.h.1.mlp.c_proj/wikitext-2-raw--valid__n300__float64"
              ".safetensors")


def test_stats_naming_scheme():
    assert stats_path_in_repo(**STATS_ARGS, module="transformer.h.1.mlp.c_proj", dtype="float64") == STATS_PATH
    assert stats_path_in_repo(model_id="gpt2-xl", model_revision=None, module="transformer.h.17.mlp.c_proj",
                              dataset="wikimedia/wikipedia:20231101.en", n_samples=100000, dtype="float32") == (
        "stats/gpt2-xl/local/transformer.h.17.mlp.c_proj/wikimedia--wikipedia--20231101.en__n100000__float32"
        ".safetensors")


def test_stats_push_pull_round_trip_and_verification(fake_hub, stats, gpt2_tokenizer):  # noqa: F811
    url = push_stats(stats, "user/stats", **STATS_ARGS, token=TOKEN)
    files = fake_hub.files("user/stats", repo_type="dataset")
    assert {STATS_PATH, STATS_PATH + ".json"} <= set(files) and len(fake_hub.commits("user/stats", "dataset")) == 2
    assert url.startswith("https://huggingface.co/datasets/user/stats/resolve/") and url.endswith(STATS_PATH)
    sidecar = json.loads(files[STATS_PATH + ".json"])
    assert sidecar["fingerprint"] == stats.fingerprint() and sidecar["dim"] == 128 and sidecar["count"] == stats.count

    pulled = pull_stats("user/stats", **STATS_ARGS, dtype="float64", module="transformer.h.1.mlp.c_proj")
    assert torch.equal(pulled.mom2_sum, stats.mom2_sum) and pulled.count == stats.count
    assert pulled.mom2_sum.dtype == torch.float64 and pulled.fingerprint() == stats.fingerprint()
    assert pulled.metadata["model_fingerprint"] == stats.metadata["model_fingerprint"]
    assert (pulled.metadata["model_id"], pulled.metadata["dataset_name"]) == (HUB_BASE, "wikitext-2-raw/valid")
    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    by_layer = pull_stats("user/stats", **STATS_ARGS, dtype="float64", layer=1, model=model)
    assert torch.equal(by_layer.mom2_sum, stats.mom2_sum)

    with pytest.raises(StatisticsNotFoundError):
        pull_stats("user/stats", **STATS_ARGS, dtype="float64", layer=2, model=model)
    with pytest.raises(StatisticsNotFoundError):
        pull_stats("user/stats", **STATS_ARGS, dtype="float32", module="transformer.h.1.mlp.c_proj")
    wider = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), n_inner=96)
    with pytest.raises(StatisticsMismatchError, match="input width"):
        pull_stats("user/stats", **STATS_ARGS, dtype="float64", layer=1, model=wider)
    with pytest.raises(StatisticsMismatchError, match="module"):
        push_stats(stats, "user/stats", **STATS_ARGS, module="transformer.h.2.mlp.c_proj")


def test_stats_tampering_is_detected(fake_hub, stats):  # noqa: F811
    push_stats(stats, "user/stats", **STATS_ARGS)
    args = dict(STATS_ARGS, dtype="float64")
    other = STATS_PATH.replace("h.1", "h.2")
    files = fake_hub.files("user/stats", repo_type="dataset")
    # A file copied to another module's path: its recorded cache key is the original path.
    fake_hub.put_file("user/stats", other, files[STATS_PATH], repo_type="dataset")
    fake_hub.put_file("user/stats", other + ".json", files[STATS_PATH + ".json"], repo_type="dataset")
    with pytest.raises(StatisticsCacheError, match="cache key"):
        pull_stats("user/stats", **args, module="transformer.h.2.mlp.c_proj")
    # Corrupted bytes: the checksum in the header no longer matches.
    data = bytearray(files[STATS_PATH])
    data[-8] ^= 0xFF
    fake_hub.put_file("user/stats", STATS_PATH, bytes(data), repo_type="dataset")
    with pytest.raises(StatisticsCacheError, match="checksum"):
        pull_stats("user/stats", **args, module="transformer.h.1.mlp.c_proj")
    # A consistent file whose content differs from the fingerprint recorded next to it.
    fake_hub.put_file("user/stats", STATS_PATH, files[STATS_PATH], repo_type="dataset")
    sidecar = json.loads(files[STATS_PATH + ".json"]) | {"fingerprint": "0" * 64}
    fake_hub.put_file("user/stats", STATS_PATH + ".json", json.dumps(sidecar).encode(), repo_type="dataset")
    with pytest.raises(StatisticsCacheError, match="fingerprint"):
        pull_stats("user/stats", **args, module="transformer.h.1.mlp.c_proj")


def test_reference_npz_import_and_pull(tmp_path, fake_hub, stats):  # noqa: F811
    reference = SecondMomentStats(stats.mom2_sum.float(), stats.count, {"n_samples": 300})
    reference.to_npz(tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_300.npz")
    npz = tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_300.npz"
    with pytest.raises(StatisticsMismatchError, match="float32"):
        import_npz_to_hub(npz, "user/stats", **STATS_ARGS, module="transformer.h.1.mlp.c_proj", dtype="float64")
    url = import_npz_to_hub(npz, "user/stats", **STATS_ARGS, module="transformer.h.1.mlp.c_proj")
    assert url.endswith(STATS_PATH.replace("float64", "float32"))
    pulled = pull_stats("user/stats", **STATS_ARGS, dtype="float32", module="transformer.h.1.mlp.c_proj")
    assert torch.equal(pulled.mom2_sum, reference.mom2_sum) and pulled.count == reference.count
    assert pulled.metadata["source"] == "npz"
    with pytest.raises(StatisticsMismatchError, match="n_samples"):
        import_npz_to_hub(npz, "user/stats", **{**STATS_ARGS, "n_samples": 1000},
                          module="transformer.h.1.mlp.c_proj")
