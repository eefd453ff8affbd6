"""Sharing edits on the Hugging Face Hub: pushes, downloads, merged checkpoints and second-moment statistics.

**Model cards** are rendered by :mod:`hf_edit.cards`: ``EditedModel.save_pretrained`` and ``EditedModel.push_to_hub``
write the edit card; ``EditedModel.push_merged_to_hub`` and the model returned by ``EditedModel.merge_and_unload``
(see :func:`attach_merged_card`) write the merged-model card.

**Pushing and loading.**  An edit is uploaded in **one commit** (``HfApi.upload_folder``) from a folder written by
``save_pretrained``; PEFT's ``push_to_hub`` is not used because transformers' push replaces the card.
:func:`download_edit` downloads an edit repo; ``EditedModel.from_pretrained("user/repo")`` uses
:func:`find_edit_repo` to tell an edit repo (it has ``hf_edit.json``) from a base model id.

**Second-moment statistics on the Hub** live in a *dataset* repo, one safetensors file per (model, model revision,
module, data set, number of texts, dtype), at::

    stats/{model_id, "/" -> "--"}/{model_revision or "local"}/{module}/{dataset slug}__n{n_samples}__{dtype}.safetensors

for example ``stats/openai-community--gpt2-xl/main/transformer.h.17.mlp.c_proj/wikipedia__n100000__float32
.safetensors``.  The dataset slug is the data set's name with ``/`` and ``:`` replaced by ``--`` and any other
character outside ``[A-Za-z0-9._-]`` by ``-``; a revision's ``/`` becomes ``--``.  The file is
:meth:`SecondMomentStats.save`'s format, with the path above as its cache key and the content checksum in its
header; its metadata gains ``model_id``, ``model_revision``, ``module``, ``dataset_name``, ``n_samples`` and
``dtype``.  Next to it, ``<same path>.json`` records the same fields plus the content fingerprint, the key width and
the number of key vectors (readable without downloading the matrix).  :func:`pull_stats` verifies the checksum, the
key, the recorded fingerprint and every field, and the shape and module name against the model when one is given.
:func:`import_npz_to_hub` converts the reference implementation's ``.npz`` files into this scheme.

huggingface_hub is imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cards import render_card, render_merged_card
from .errors import (
    ConfigError,
    EditFolderError,
    StatisticsCacheError,
    StatisticsMismatchError,
    StatisticsNotFoundError,
)
from .manifest import MANIFEST_NAME, read_manifest
from .stats import SecondMomentStats
from .version import __version__

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from torch import nn

__all__ = [
    "StatisticsNotFoundError",
    "push_folder",
    "push_edit_folder",
    "push_merged_folder",
    "download_edit",
    "find_edit_repo",
    "attach_merged_card",
    "stats_path_in_repo",
    "push_stats",
    "pull_stats",
    "import_npz_to_hub",
]

logger = logging.getLogger(__name__)

STATS_FORMAT = "hf_edit.hub-stats.v1"


# --------------------------------------------------------------------------------------------------------------
# Pushing and downloading edits
# --------------------------------------------------------------------------------------------------------------
def push_folder(folder: str | os.PathLike, repo_id: str, *, token: str | bool | None = None,
                  private: bool | None = None, commit_message: str | None = None,
                  commit_description: str | None = None, revision: str | None = None, create_pr: bool = False,
                  repo_type: str = "model", delete_patterns: list[str] | None = None) -> CommitInfo:
    """Create the repo if needed (and the branch ``revision``), then upload ``folder`` with one
    ``HfApi.upload_folder`` call (one commit for any folder of fewer than 256 files)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="hf_edit", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True).repo_id
    if revision is not None and revision != "main" and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, revision=revision,
                             commit_message=commit_message or "Upload with hf_edit",
                             commit_description=commit_description, create_pr=create_pr,
                             delete_patterns=delete_patterns)


def push_edit_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                     token: str | bool | None = None, commit_message: str | None = None,
                     revision: str | None = None, eval_results: Mapping[str, float] | None = None,
                     eval_dataset: str | None = None, base_model_id: str | None = None) -> str:
    """Upload an edit folder written by ``EditedModel.save_pretrained`` in one commit, with its card re-rendered
    for ``repo_id``.  Adapter subfolders left in the repo by an earlier push and absent now are deleted.

    Returns:
        The URL of the commit.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "edit"
        shutil.copytree(folder, staged)
        render_card(manifest, eval_results, eval_dataset=eval_dataset, repo_id=repo_id,
                    base_model_id=base_model_id).save(staged / "README.md")
        message = commit_message or f"Upload {len(manifest.get('edits', []))} knowledge edit(s) with hf_edit"
        info = push_folder(staged, repo_id, token=token, private=private, revision=revision,
                           commit_message=message, delete_patterns=["edit_*/*"])
    return info.commit_url


def download_edit(repo_id: str, revision: str | None = None, token: str | bool | None = None) -> Path:
    """Download an edit repo (a snapshot of every file) and return the local folder.

    Raises:
        EditFolderError: the repo has no ``hf_edit.json``.
        huggingface_hub errors (``RepositoryNotFoundError``, ``RevisionNotFoundError``, ...) as they come.
    """
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, revision=revision, token=token))
    if not (folder / MANIFEST_NAME).is_file():
        raise EditFolderError(f"{repo_id} (revision {revision or 'main'}) has no {MANIFEST_NAME}: it is not an "
                              "hf_edit edit repo.")
    return folder


def find_edit_repo(repo_id: str, revision: str | None = None, token: str | bool | None = None) -> Path | None:
    """The downloaded folder of ``repo_id`` if it is an hf_edit edit repo, else ``None`` (a base model id).

    One request decides: ``hf_hub_download`` of ``hf_edit.json``.  A missing file, repo or revision, an invalid
    id, or no network (``HF_HUB_OFFLINE=1`` and nothing cached) all mean "not an edit repo", immediately and
    without retries; the caller then loads ``repo_id`` as a base model and reports that error if any.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        hf_hub_download(repo_id, MANIFEST_NAME, revision=revision, token=token)
    except (EntryNotFoundError, HFValidationError, OSError) as err:  # OSError: HfHubHTTPError, connection errors
        logger.debug("%s is not an hf_edit repo (%s: %s)", repo_id, type(err).__name__, err)
        return None
    return download_edit(repo_id, revision=revision, token=token)


# --------------------------------------------------------------------------------------------------------------
# Merged checkpoints
# --------------------------------------------------------------------------------------------------------------
def attach_merged_card(model: nn.Module, manifest: Mapping[str, Any]) -> nn.Module:
    """Make a merged transformers model write and push the merged-model card that lists ``manifest``'s edits.

    transformers' ``PushToHubMixin.push_to_hub`` (and ``save_pretrained(push_to_hub=True)``) first calls
    ``create_and_tag_model_card`` (the repo's existing README, else a generic card with ``library_name:
    transformers``), then ``self.save_pretrained(tmp)``, then **writes that card over** ``tmp/README.md`` before
    uploading: a README written by ``save_pretrained`` is always replaced.  So this function overrides the two
    entry points *on this instance only* (no subclass, no change to the config or the weights):

    * ``model.save_pretrained(dir, ...)`` runs the class's ``save_pretrained`` and then writes ``dir/README.md``
      with the merged card; with ``push_to_hub=True`` it then uploads ``dir`` itself (one commit);
    * ``model.push_to_hub(repo_id, ...)`` (same signature as transformers') creates the repo, saves into a
      temporary folder as above and uploads it in one ``HfApi.upload_folder`` commit, returning the
      ``CommitInfo`` as transformers does.

    The manifest is kept as ``model.hf_edit_manifest``.  ``copy.deepcopy`` keeps the overrides (bound to the
    copy).
    """
    model.hf_edit_manifest = dict(manifest)
    model.save_pretrained = types.MethodType(_merged_save_pretrained, model)
    model.push_to_hub = types.MethodType(_merged_push_to_hub, model)
    return model


_PUSH_KEYS = ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision")


def _merged_save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any,
                            push_to_hub: bool = False, **kwargs: Any) -> None:
    push = {key: kwargs.pop(key) for key in _PUSH_KEYS if key in kwargs}
    tags = kwargs.pop("_hf_edit_tags", None)
    repo_id = kwargs.pop("_hf_edit_repo_id", None) or push.get("repo_id")
    tokenizer_in_repo = kwargs.pop("_hf_edit_tokenizer_in_repo", False)
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if not kwargs.get("is_main_process", True):
        return
    dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
    card = render_merged_card(self.hf_edit_manifest, repo_id=repo_id, tokenizer_in_repo=tokenizer_in_repo,
                              dtype=dtype, tags=tags)
    card.save(Path(save_directory) / "README.md")
    if push_to_hub:
        push_folder(save_directory, push.get("repo_id") or Path(save_directory).name, token=kwargs.get("token"),
                    private=push.get("private"), commit_message=push.get("commit_message") or "Upload model",
                    commit_description=push.get("commit_description"), revision=push.get("revision"),
                    create_pr=bool(push.get("create_pr")))


def _merged_push_to_hub(self: nn.Module, repo_id: str, *, commit_message: str | None = None,
                        commit_description: str | None = None, private: bool | None = None,
                        token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                        max_shard_size: int | str | None = "50GB", tags: list[str] | None = None) -> CommitInfo:
    with tempfile.TemporaryDirectory() as tmp:
        self.save_pretrained(tmp, max_shard_size=max_shard_size, _hf_edit_tags=tags, _hf_edit_repo_id=repo_id)
        return push_folder(tmp, repo_id, token=token, private=private,
                           commit_message=commit_message or "Upload model with knowledge edits",
                           commit_description=commit_description, revision=revision, create_pr=create_pr)


def push_merged_folder(model: nn.Module, tokenizer: Any, repo_id: str, *, private: bool | None = None,
                       token: str | bool | None = None, commit_message: str | None = None) -> str:
    """Upload a merged model (prepared by :func:`attach_merged_card`), its tokenizer and the merged card in one
    commit; returns the commit URL."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, _hf_edit_repo_id=repo_id, _hf_edit_tokenizer_in_repo=tokenizer is not None)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = push_folder(tmp, repo_id, token=token, private=private,
                           commit_message=commit_message or "Upload model with knowledge edits merged (hf_edit)")
    return info.commit_url


# --------------------------------------------------------------------------------------------------------------
# Second-moment statistics on the Hub
# --------------------------------------------------------------------------------------------------------------
def _slug(text: str, what: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text).replace("/", "--").replace(":", "--")).strip("-.")
    if not slug:
        raise ConfigError(f"{what} {text!r} gives an empty name.")
    return slug


def stats_path_in_repo(*, model_id: str, model_revision: str | None, module: str, dataset: str,
                       n_samples: int, dtype: str) -> str:
    """Where statistics live in a statistics dataset repo (see the module docstring)."""
    if not module or "/" in module:
        raise ConfigError(f"Statistics need the full module name (e.g. 'transformer.h.17.mlp.c_proj'), got "
                          f"{module!r}.")
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"Statistics dtype must be 'float32' or 'float64', got {dtype!r}.")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"n_samples must be a positive number of texts, got {n_samples!r}.")
    return (f"stats/{_slug(model_id, 'model id')}/{_slug(model_revision or 'local', 'model revision')}/{module}/"
            f"{_slug(dataset, 'data set')}__n{n_samples}__{dtype}.safetensors")


def _dtype_name(stats: SecondMomentStats) -> str:
    return str(stats.dtype).removeprefix("torch.")


def _agree(what: str, given: Any, recorded: Any) -> Any:
    """``given`` (or ``recorded`` if not given), after checking that the two agree."""
    if given is not None and recorded is not None and given != recorded:
        raise StatisticsMismatchError(f"The statistics were computed with {what}={recorded!r}, not {given!r}.")
    return given if given is not None else recorded


def push_stats(stats: SecondMomentStats, repo_id: str, *, model_id: str, model_revision: str | None,
               dataset: str, module: str | None = None, n_samples: int | None = None, dtype: str | None = None,
               token: str | bool | None = None, private: bool | None = None, revision: str | None = None,
               commit_message: str | None = None) -> str:
    """Upload statistics to the dataset repo ``repo_id`` (created if needed) under :func:`stats_path_in_repo`.

    ``module``, ``n_samples`` and ``dtype`` default to the statistics' metadata and tensor; when given they must
    agree with it.  The file and its ``.json`` sidecar are uploaded in one commit.

    Args:
        model_id: Hub id of the base model (e.g. ``"openai-community/gpt2-xl"``).
        model_revision: its revision (preferably the commit hash); ``None`` files them under ``local``.
        dataset: the data set's name, e.g. ``"wikipedia"`` or ``"wikimedia/wikipedia:20231101.en"``.

    Returns:
        The download URL of the uploaded file at the new commit.

    Raises:
        StatisticsMismatchError: an argument disagrees with the statistics' metadata.
        ConfigError: a field is missing or invalid.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_url

    meta = stats.metadata
    module = _agree("module", module, meta.get("module"))
    n_samples = _agree("n_samples", n_samples, meta.get("n_samples"))
    dtype = _agree("dtype", dtype, _dtype_name(stats))
    _agree("dtype", dtype, meta.get("dtype"))
    _agree("model_id", model_id, meta.get("model_id"))
    if "model_revision" in meta:
        _agree("model_revision", model_revision or "local", meta["model_revision"] or "local")
    if module is None or n_samples is None:
        raise ConfigError("The statistics' metadata does not say which module / how many texts they cover: pass "
                          "module= and n_samples=.")
    path = stats_path_in_repo(model_id=model_id, model_revision=model_revision, module=module, dataset=dataset,
                              n_samples=n_samples, dtype=dtype)
    fields = {"model_id": model_id, "model_revision": model_revision, "module": module, "dataset_name": dataset,
              "n_samples": n_samples, "dtype": dtype}
    shared = SecondMomentStats(stats.mom2_sum, stats.count, {**meta, **fields})
    sidecar = {"format": STATS_FORMAT, "path": path, **fields, "fingerprint": shared.fingerprint(),
               "dim": shared.dim, "count": shared.count, "hf_edit_version": __version__,
               "metadata": shared.metadata}
    api = HfApi(token=token, library_name="hf_edit", library_version=__version__)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "stats.safetensors"
        shared.save(file, key=path)
        info = api.create_commit(repo_id, repo_type="dataset", revision=revision, operations=[
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(file)),
            CommitOperationAdd(path_in_repo=path + ".json",
                               path_or_fileobj=json.dumps(sidecar, indent=2, sort_keys=True).encode())],
            commit_message=commit_message or f"Add second-moment statistics {path}")
    return hf_hub_url(repo_id, path, repo_type="dataset", revision=info.oid)


def pull_stats(repo_id: str, *, model_id: str, model_revision: str | None, dataset: str, n_samples: int,
               dtype: str, module: str | None = None, layer: int | None = None, model: nn.Module | None = None,
               token: str | bool | None = None, revision: str | None = None) -> SecondMomentStats:
    """Download statistics pushed by :func:`push_stats` and verify them.

    Give the module by name, or ``layer`` and ``model`` (the module is then found as for editing).  With
    ``model``, the statistics are also checked against its module (name and input width).

    Raises:
        StatisticsNotFoundError: nothing at that path in the repo (or no such repo).
        StatisticsCacheError: the file is corrupted, sits at another path than it was pushed to, or its content
            does not match the fingerprint recorded next to it.
        StatisticsMismatchError: the statistics are for another model, revision, module, data set, sample count
            or dtype, or do not fit ``model``'s module.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    target = None
    if model is not None:
        from .architecture import resolve_target

        target = resolve_target(model, layer, module) if (module or layer is not None) else None
        module = module or (target.name if target is not None else None)
    if module is None:
        raise ConfigError("Say which statistics to pull: module='<full module name>', or layer= with model=.")
    path = stats_path_in_repo(model_id=model_id, model_revision=model_revision, module=module, dataset=dataset,
                              n_samples=n_samples, dtype=dtype)
    try:
        sidecar_file = hf_hub_download(repo_id, path + ".json", repo_type="dataset", revision=revision,
                                       token=token)
        file = hf_hub_download(repo_id, path, repo_type="dataset", revision=revision, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise StatisticsNotFoundError(f"No statistics at {path} in dataset repo {repo_id} (revision "
                                      f"{revision or 'main'}): {type(err).__name__}.") from err
    stats = SecondMomentStats.load(file, expected_key=path)
    try:
        sidecar = json.loads(Path(sidecar_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise StatisticsCacheError(f"Unreadable statistics index {path}.json in {repo_id}: {err}") from err
    if sidecar.get("fingerprint") != stats.fingerprint():
        raise StatisticsCacheError(f"{path} in {repo_id} does not match the fingerprint recorded in {path}.json: "
                                   "the file was replaced or corrupted.")
    expected = {"model_id": model_id, "model_revision": model_revision, "module": module, "dataset_name": dataset,
                "n_samples": n_samples, "dtype": dtype}
    for name, value in expected.items():
        for recorded in (sidecar.get(name), stats.metadata.get(name)):
            if recorded != value:
                raise StatisticsMismatchError(f"{path} in {repo_id} holds statistics with {name}={recorded!r}, "
                                              f"not {value!r}.")
    if _dtype_name(stats) != dtype:
        raise StatisticsMismatchError(f"{path} in {repo_id} holds {_dtype_name(stats)} statistics, not {dtype}.")
    if target is not None:
        stats.check_compatible(target)
    return stats


def import_npz_to_hub(npz_path: str | os.PathLike, repo_id: str, *, model_id: str, model_revision: str | None,
                      module: str, dataset: str, n_samples: int, dtype: str = "float32",
                      token: str | bool | None = None, private: bool | None = None,
                      revision: str | None = None) -> str:
    """Convert a reference implementation ``.npz`` file (``mom2.mom2``, ``mom2.count``, ``sample_size``) and push
    it under the naming scheme (see :func:`push_stats`, which gives the return value)."""
    stats = SecondMomentStats.from_npz(npz_path, module_name=module)
    if _dtype_name(stats) != dtype:
        raise StatisticsMismatchError(f"{npz_path} holds {_dtype_name(stats)} statistics, not {dtype}.")
    _agree("n_samples", n_samples, stats.metadata.get("n_samples"))
    stats.metadata.update(n_samples=n_samples, dtype=dtype, source="npz", npz_file=Path(npz_path).name)
    return push_stats(stats, repo_id, model_id=model_id, model_revision=model_revision, dataset=dataset,
                      module=module, n_samples=n_samples, dtype=dtype, token=token, private=private,
                      revision=revision, commit_message=f"Import {Path(npz_path).name} (reference .npz)")
