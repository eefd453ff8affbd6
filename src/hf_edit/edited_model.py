"""``EditedModel``: a causal LM plus the knowledge edits applied to it, kept as one PEFT LoRA adapter.

The base weights are never modified until :meth:`EditedModel.merge_and_unload`.  The list of applied edits is the
source of truth: after every change the adapter is rebuilt from it, so disabling or removing edits restores the
original model bitwise, and a saved folder holds exactly the edits listed in its manifest.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .adapters import ADAPTER_NAME, LoraFactors, attach_adapters, quiet_peft, read_adapter_factors
from .architecture import base_layer, resolve_target, unwrap_model
from .errors import ConfigError, EditFolderError, HfEditError, UnknownMethodError
from .methods.ft import FTConfig, FTEditor, ft_preset_for
from .methods.rome import ROMEConfig, ROMEEditor, rome_preset_for
from .requests import EditRequest, as_request, as_requests
from .stats import SecondMomentStats
from .version import __version__

__all__ = ["EditedModel", "Edit", "MANIFEST_NAME"]

logger = logging.getLogger(__name__)

#: File written next to the adapter, listing the edits it holds.
MANIFEST_NAME = "hf_edit.json"
MANIFEST_FORMAT = "hf_edit.edits.v1"

MethodSpec = str | ROMEConfig | FTConfig | Mapping[str, Any]
MethodConfig = ROMEConfig | FTConfig
Editor = ROMEEditor | FTEditor
RequestLike = EditRequest | Mapping[str, Any]


@dataclass
class Edit:
    """One applied edit of one module: its request(s), its factors and its diagnostics.

    Attributes:
        requests: what was edited: one request for ROME; every request trained jointly for FT/FT+L.
        method: ``"rome"``, ``"ft"`` or ``"ft+l"``.
        module: full name of the edited module.
        layer: its decoder layer.
        factors: ΔW = B @ A (and Δb) of this edit, float32 on the CPU.
        config: the method's hyperparameters (JSON).
        info: diagnostics (ROME: norms, k·u, steps, losses, templates, statistics fingerprint, timings; FT:
            epochs, steps, losses, ε, max |Δ|).
        group: edits of one group share a PEFT adapter: consecutive ROME edits, or one FT/FT+L training run.
        adapter: the name of that adapter (``"default"`` for the first group, then ``"edit_1"``, ...).
        key, value: ROME edits made in this session: the key k and value v* with W′k + b = v* (not saved).
    """

    requests: tuple[EditRequest, ...]
    method: str
    module: str
    layer: int | None
    factors: LoraFactors
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    group: int = 0
    adapter: str = ADAPTER_NAME
    key: torch.Tensor | None = field(default=None, repr=False)
    value: torch.Tensor | None = field(default=None, repr=False)

    @property
    def request(self) -> EditRequest:
        """The (first) request of this edit."""
        return self.requests[0]

    @property
    def is_dense(self) -> bool:
        """A full-rank delta trained by FT/FT+L (as opposed to a ROME rank-one update)."""
        return self.method != "rome"

    def manifest_entry(self) -> dict[str, Any]:
        return {"method": self.method, "module": self.module, "layer": self.layer, "rank": self.factors.rank,
                "adapter": self.adapter, "group": self.group, "requests": [r.to_dict() for r in self.requests],
                "config": self.config, "info": self.info}


def _is_edit_folder(path: str | os.PathLike) -> bool:
    return Path(path, MANIFEST_NAME).is_file()


class EditedModel:
    """A causal LM with knowledge edits, stored as PEFT LoRA adapters that are all active together.

    ROME edits are rank-one factors; consecutive ROME edits stack into one adapter of rank k.  Each FT/FT+L
    training run is a dense delta in an adapter of its own.  The first adapter is PEFT's ``"default"`` (saved
    at the folder's root, so plain ``PeftModel.from_pretrained`` loads it); later ones are ``"edit_1"``, ...

    Build it with :meth:`from_pretrained` (a base model, an edit folder or an edit repo on the Hub); then
    :meth:`edit`, :meth:`remove_edit`, :meth:`disable_edits`, :meth:`save_pretrained`, :meth:`push_to_hub`,
    :meth:`merge_and_unload`, :meth:`push_merged_to_hub`.  Calling the object, ``generate``, ``config`` and
    ``device`` pass through to the model.

    Args:
        model: a transformers causal LM (or a ``PeftModel`` loaded from an hf_edit folder, with ``edits``).
        tokenizer: its fast tokenizer.
        method: the default editing method (``"rome"``, a :class:`ROMEConfig` or a dict of its fields); ``None``
            means the configuration of the latest edit in ``edits``, else ``"rome"``.
        stats: explicit second-moment statistics (one object, or a mapping from layer/module name).
        progress: show progress bars.
        fold_rank: when the ROME edits of one module in one adapter stack to a rank above this, the adapter holds
            their sum as one dense delta instead (cheaper once the rank exceeds min(d_in, d_out)).  ``"auto"``
            (default): min(d_in, d_out) of the module; ``None``: never fold.  :meth:`representation` says which
            modules are folded; saved folders always hold the exact rank-k factors.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, method: MethodSpec | None = None,
                 stats: SecondMomentStats | Mapping[int | str, SecondMomentStats] | None = None,
                 progress: bool = True, edits: list[Edit] | None = None, revision: str | None = None,
                 fold_rank: int | str | None = "auto") -> None:
        self._peft: PeftModel | None = model if isinstance(model, PeftModel) else None
        self._model: nn.Module | None = unwrap_model(model).eval()
        self.tokenizer = tokenizer
        self._default_method = method
        self._stats = stats
        self._progress = progress
        self._edits: list[Edit] = list(edits or [])
        self._revision = revision
        self._editors: dict[str, Editor] = {}
        if not (fold_rank in (None, "auto") or (isinstance(fold_rank, int) and fold_rank >= 1)):
            raise ConfigError(f"fold_rank must be 'auto', None or a positive integer, got {fold_rank!r}.")
        self.fold_rank = fold_rank
        self._folded: dict[tuple[str, str], int] = {}
        self._saved_templates: list[str] | None = next(
            (e.info["context_templates"] for e in reversed(self._edits) if "context_templates" in e.info), None)

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike | nn.Module, edits: Iterable[RequestLike] | None = None,
                        *, method: MethodSpec | None = None,
                        stats: SecondMomentStats | Mapping[int | str, SecondMomentStats] | None = None,
                        tokenizer: PreTrainedTokenizerBase | None = None, revision: str | None = None,
                        token: str | bool | None = None, base_model: str | os.PathLike | None = None,
                        progress: bool = True, **model_kwargs: Any) -> EditedModel:
        """Load a base model (Hub id, local path or model object) or a saved edit folder, and apply ``edits``.

        A Hub repo id is first looked up as an edit repo (one request for its ``hf_edit.json``; pushed by
        :meth:`push_to_hub`): if it is one, its snapshot is downloaded and loaded like a local edit folder, else the
        id is loaded as a base model.  With ``HF_HUB_OFFLINE=1`` an edit repo loads from the local cache.

        Args:
            pretrained: a model id or path, a loaded causal LM, a folder written by :meth:`save_pretrained`, or the
                id of a Hub repo written by :meth:`push_to_hub`.
            edits: requests to apply now (``EditRequest``, reference dicts or CounterFact records).
            method: ``"rome"`` (the preset for the model id, else documented defaults) or a :class:`ROMEConfig`.
                Default: the configuration recorded with the latest loaded edit, else ``"rome"``.
            stats: second-moment statistics to use instead of computing them.
            tokenizer: defaults to the tokenizer stored with the model.
            revision: for a Hub edit repo, the revision (branch, tag or commit) of that repo (the base model's
                revision is the one recorded in its manifest); for a local edit folder, the base model's revision;
                otherwise passed to ``from_pretrained`` of the model and tokenizer.
            token: Hub token, used for the edit repo, the base model and the tokenizer.
            base_model: for an edit folder, load this base instead of the one recorded in it.
            progress: show progress bars.
            **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (default ``dtype=torch.float32``).
        """
        hub_folder = None
        if isinstance(pretrained, str) and not os.path.exists(pretrained):
            from .hub import find_edit_repo

            hub_folder = find_edit_repo(pretrained, revision=revision, token=token)
        if hub_folder is not None:  # the revision was the edit repo's; the base revision comes from its manifest
            model = cls._load_edit_folder(hub_folder, tokenizer=tokenizer, base_model=base_model, revision=None,
                                          token=token, method=method, stats=stats, progress=progress,
                                          **model_kwargs)
        elif isinstance(pretrained, (str, os.PathLike)) and _is_edit_folder(pretrained):
            model = cls._load_edit_folder(Path(pretrained), tokenizer=tokenizer, base_model=base_model,
                                          revision=revision, token=token, method=method, stats=stats,
                                          progress=progress, **model_kwargs)
        else:
            if isinstance(pretrained, nn.Module):
                base = pretrained
                source = getattr(base, "name_or_path", None)
            else:
                base = _load_base(pretrained, revision=revision, token=token, **model_kwargs)
                source = str(pretrained)
            if tokenizer is None:
                if not source:
                    raise HfEditError("Pass tokenizer= when giving a model object built without a name or path.")
                tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, token=token)
            model = cls(base, tokenizer, method=method, stats=stats, progress=progress, revision=revision)
        if edits is not None:
            model.edit(edits)
        return model

    @classmethod
    def _load_edit_folder(cls, folder: Path, *, tokenizer, base_model, revision, token, method, stats, progress,
                          **model_kwargs) -> EditedModel:
        manifest = _read_manifest(folder)
        base_id = str(base_model or manifest.get("base_model") or "")
        if not base_id:
            raise EditFolderError(f"{folder} does not say which base model it edits; pass base_model=...")
        base_revision = revision or manifest.get("base_model_revision")
        base = _load_base(base_id, revision=base_revision, token=token, **model_kwargs)
        names = list(dict.fromkeys(e.get("adapter", ADAPTER_NAME) for e in manifest.get("edits", [])))
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(base, str(folder), adapter_name=ADAPTER_NAME)
            for name in names[1:]:
                peft_model.load_adapter(str(folder / name), adapter_name=name)
        peft_model.base_model.set_adapter(names or [ADAPTER_NAME])
        edits = _edits_from_manifest(manifest, {n: read_adapter_factors(peft_model, n) for n in names}, folder)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(base_id, revision=base_revision, token=token)
        return cls(peft_model, tokenizer, method=method, stats=stats, progress=progress, edits=edits,
                   revision=base_revision)

    # -- passthrough -----------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The model to run: the ``PeftModel`` when edits exist, else the base transformers model."""
        self._require_live()
        return self._peft if self._peft is not None else self._model

    @property
    def base_model(self) -> nn.Module:
        """The transformers model (with LoRA layers injected when edits exist)."""
        self._require_live()
        return self._model

    @property
    def peft_model(self) -> PeftModel | None:
        """The ``PeftModel`` holding the edits, or ``None`` while there are none."""
        return self._peft

    @property
    def revision(self) -> str | None:
        """The revision the base model was loaded at (``None`` for the default or a local model)."""
        return self._revision

    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the edited model (see ``transformers.GenerationMixin.generate``)."""
        return self.model.generate(*args, **kwargs)

    def __repr__(self) -> str:
        name = getattr(self._model, "name_or_path", "") if self._model is not None else "<merged>"
        return f"EditedModel(base={name!r}, edits={len(self._edits)})"

    # -- edits -----------------------------------------------------------------------------------------------
    @property
    def edits(self) -> tuple[Edit, ...]:
        """The applied edits, in the order they were applied."""
        return tuple(self._edits)

    def edit(self, requests: RequestLike | Iterable[RequestLike], method: MethodSpec | None = None) -> list[Edit]:
        """Apply requests with ROME (one after another, each on the model as edited so far) or FT/FT+L (all
        requests trained jointly, as the reference does).

        The call is atomic: if anything fails, every edit of this call is undone and the exception re-raised.

        Args:
            requests: ``EditRequest`` objects, reference dicts or CounterFact records.
            method: ``"rome"``, ``"ft"``, ``"ft+l"``, a :class:`ROMEConfig` or :class:`FTConfig`; default: the
                model's default method.

        Returns:
            The new :class:`Edit` objects (ROME: one per request and layer; FT: one per trained module).
        """
        self._require_live()
        requests = as_requests(requests)
        editor = self._editor(method if method is not None else self._default_method)
        for request in requests:
            editor.validate(request)
        before = len(self._edits)
        try:
            if isinstance(editor, ROMEEditor):
                self._apply_rome(editor, requests)
            else:
                self._apply_dense(editor, requests)
        except BaseException:
            if len(self._edits) != before:
                del self._edits[before:]
                self._rebuild()
            raise
        return self._edits[before:]

    def _apply_rome(self, editor: ROMEEditor, requests: list[EditRequest]) -> None:
        last = self._edits[-1] if self._edits else None
        group = last.group if last is not None and not last.is_dense else self._next_group()
        for request in requests:
            for target in editor.targets():
                update = editor.compute(request, target)
                factors = LoraFactors(A=update.u[None].cpu(), B=update.v[:, None].cpu())
                self._edits.append(Edit(requests=(request,), method="rome", module=target.name,
                                        layer=target.layer, factors=factors, config=editor.config.to_dict(),
                                        info=update.info, group=group, key=update.key.cpu(),
                                        value=update.value.cpu()))
                self._rebuild()

    def _apply_dense(self, editor: FTEditor, requests: list[EditRequest]) -> None:
        group, method = self._next_group(), "ft+l" if editor.config.constrained else "ft"
        for update in editor.compute(requests):
            self._edits.append(Edit(requests=tuple(requests), method=method, module=update.target.name,
                                    layer=update.target.layer, factors=update.factors(),
                                    config=editor.config.to_dict(), info=update.info, group=group))
        self._rebuild()

    def _next_group(self) -> int:
        return max((e.group for e in self._edits), default=-1) + 1

    def remove_edit(self, index: int) -> list[Edit]:
        """Remove the edit at ``index`` and return what was removed.

        A ROME edit is removed alone (later edits, computed with it present, stay as they are); an FT/FT+L edit
        is removed together with every module and request of its joint training run.
        """
        self._require_live()
        edit = self._edits[index]
        removed = [e for e in self._edits if e.group == edit.group] if edit.is_dense else [edit]
        self._edits = [e for e in self._edits if not any(e is r for r in removed)]
        self._rebuild()
        return removed

    @contextmanager
    def disable_edits(self) -> Iterator[None]:
        """Within the block the model computes exactly (bitwise) as the unedited base model."""
        self._require_live()
        if self._peft is None:
            yield
            return
        with self._peft.disable_adapter():
            yield

    def merge_and_unload(self) -> nn.Module:
        """Add every edit into the base weights and return the plain transformers model.

        The merged weight equals W + B @ A bitwise.  This consumes the ``EditedModel`` (as in peft).

        When there are edits, the returned model's ``save_pretrained`` and ``push_to_hub`` write a model card that
        says the model is edited and lists the edits (see :func:`hf_edit.hub.attach_merged_card`); the manifest is
        kept as ``model.hf_edit_manifest``.  Nothing is added to its config.
        """
        self._require_live()
        model = self._model
        if self._peft is not None:
            manifest = self.manifest()
            self._warn_if_merge_quantises()
            with quiet_peft():
                model = self._peft.merge_and_unload()
            from .hub import attach_merged_card

            attach_merged_card(model, manifest)
        self._peft, self._model = None, None
        return model

    def _adapter_factors(self, adapter: str, module: str, parts: list[LoraFactors], fold: bool) -> LoraFactors:
        """The factors the adapter holds for ``module``: the stacked parts, or their dense sum when folded."""
        stacked = LoraFactors.concat(parts)
        # only stacks of several (ROME) parts fold; an FT/FT+L run is one dense part already
        if not fold or self.fold_rank is None or len(parts) < 2 or any(p.bias is not None for p in parts):
            return stacked
        out_features, in_features = stacked.B.shape[0], stacked.A.shape[1]
        threshold = min(out_features, in_features) if self.fold_rank == "auto" else self.fold_rank
        if stacked.rank <= threshold:
            return stacked
        dense = _dense_factors(stacked)
        if (adapter, module) not in self._folded:
            logger.info("Folded %d edits of %s (adapter %s) into one dense delta of rank %d.", len(parts), module,
                        adapter, dense.rank)
        self._folded[(adapter, module)] = len(parts)
        return dense

    def representation(self) -> dict[str, dict[str, str]]:
        """How each adapter holds each edited module: ``"rank k"`` (k stacked edits) or ``"dense (k edits
        folded)"`` when their sum is stored as one full-rank delta (see ``fold_rank``)."""
        ranks: dict[tuple[str, str], int] = {}
        for e in self._edits:
            ranks[(e.adapter, e.module)] = ranks.get((e.adapter, e.module), 0) + e.factors.rank
        out: dict[str, dict[str, str]] = {}
        for (adapter, module), rank in ranks.items():
            folded = self._folded.get((adapter, module))
            out.setdefault(adapter, {})[module] = f"dense ({folded} edits folded)" if folded else f"rank {rank}"
        return out

    def _warn_if_merge_quantises(self) -> None:
        """Warn when merging into half-precision weights loses part of the (float32) edits."""
        lost = {}
        for module_name, delta in self._dense_deltas().items():
            weight = resolve_target(self._model, None, module_name)
            base = base_layer(unwrap_model(self._model).get_submodule(weight.name)).weight
            if base.dtype not in (torch.float16, torch.bfloat16):
                continue
            delta = delta.T if weight.is_conv1d else delta
            merged = (base.float() + delta.to(base.device)).to(base.dtype).float() - base.float()
            lost[module_name] = ((merged - delta.to(base.device)).norm() / delta.norm().clamp_min(1e-30)).item()
        if lost:
            worst = max(lost, key=lost.get)
            warnings.warn(
                f"Merging float32 edits into {next(self._model.parameters()).dtype} weights quantises them: the "
                f"merged change differs from the edit by {100 * lost[worst]:.1f}% (relative norm) in {worst}. Keep "
                "the edits as an adapter, or load the model in float32 before merging.", UserWarning, stacklevel=3)

    def _dense_deltas(self) -> dict[str, torch.Tensor]:
        """ΔW (Linear orientation, float32, CPU) of every edited module, all edits summed."""
        parts: dict[str, list[LoraFactors]] = {}
        for e in self._edits:
            parts.setdefault(e.module, []).append(e.factors)
        return {module: LoraFactors.concat(factors).delta_weight() for module, factors in parts.items()}

    # -- saving ----------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The edit manifest written to ``hf_edit.json``: base model, adapters and every edit."""
        self._require_live()
        if self._peft is None:
            raise HfEditError("There are no edits to save.")
        return {"format": MANIFEST_FORMAT, "hf_edit_version": __version__,
                "base_model": self._peft.peft_config[ADAPTER_NAME].base_model_name_or_path,
                "base_model_revision": self._revision,
                "adapters": list(dict.fromkeys(e.adapter for e in self._edits)),
                "edits": [e.manifest_entry() for e in self._edits]}

    def save_pretrained(self, save_directory: str | os.PathLike, *,
                        eval_results: Mapping[str, float] | None = None, eval_dataset: str | None = None,
                        base_model_id: str | None = None, **kwargs: Any) -> None:
        """Write the adapters, the edit manifest ``hf_edit.json`` and the model card ``README.md``.

        The first adapter goes to the folder's root (``adapter_config.json``, ``adapter_model.safetensors``); later
        ones (e.g. an FT delta after ROME edits) go to subfolders named after them, as PEFT lays them out.  The
        card (:func:`hf_edit.hub.render_card`) replaces PEFT's generic README.

        Args:
            eval_results: metric name → value, shown in the card.
            eval_dataset: the data set they were measured on (adds a ``model-index`` to the card).
            base_model_id: the base model's Hub id for the card's metadata, when the edit records a local path.
            **kwargs: passed to ``PeftModel.save_pretrained``.
        """
        self._save(save_directory, kwargs, eval_results=eval_results, eval_dataset=eval_dataset,
                   base_model_id=base_model_id)

    def _save(self, save_directory: str | os.PathLike, peft_kwargs: Mapping[str, Any],
              **card: Any) -> dict[str, Any]:
        manifest = self.manifest()
        save_directory = Path(save_directory)
        folded = bool(self._folded)
        if folded:  # the folder holds the exact rank-k factors of every edit
            self._rebuild(fold=False)
        try:
            with quiet_peft():
                self._peft.save_pretrained(str(save_directory), **peft_kwargs)
        finally:
            if folded:
                self._rebuild()
        (save_directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        from .hub import render_card

        render_card(manifest, **card).save(save_directory / "README.md")
        return manifest

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None, revision: str | None = None,
                    eval_results: Mapping[str, float] | None = None, eval_dataset: str | None = None,
                    base_model_id: str | None = None) -> str:
        """Upload the edits (adapters, ``hf_edit.json`` and the model card) to a Hub model repo in one commit.

        The repo is created if needed; ``revision`` names a branch (created if needed).  Adapter subfolders of an
        earlier push that are no longer used are deleted in the same commit.
        ``EditedModel.from_pretrained(repo_id)`` loads the result, and so does
        ``PeftModel.from_pretrained(base, repo_id)`` (see the card).

        Args:
            eval_results, eval_dataset, base_model_id: as in :meth:`save_pretrained`.

        Returns:
            The URL of the commit.
        """
        from .hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            manifest = self._save(tmp, {}, eval_results=eval_results, eval_dataset=eval_dataset,
                                  base_model_id=base_model_id, repo_id=repo_id)
            n = len(manifest["edits"])
            message = commit_message or f"Upload {n} knowledge edit{'s' * (n != 1)} with hf_edit"
            info = push_folder(tmp, repo_id, token=token, private=private, revision=revision,
                               commit_message=message, delete_patterns=["edit_*/*"])
        return info.commit_url

    def push_merged_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                           commit_message: str | None = None) -> str:
        """Merge the edits into the weights and upload the full model, the tokenizer and a model card that says
        the model is edited and lists the edits, in one commit.

        Like :meth:`merge_and_unload`, this consumes the ``EditedModel``.  Prefer :meth:`push_to_hub` (a few
        kilobytes, loads with peft, the edits stay removable); merging into half-precision weights quantises them.

        Returns:
            The URL of the commit.
        """
        from .hub import push_merged_folder

        self._require_live()
        if self._peft is None:
            raise HfEditError("There are no edits to merge; push the base model itself instead.")
        tokenizer = self.tokenizer
        merged = self.merge_and_unload()
        return push_merged_folder(merged, tokenizer, repo_id, private=private, token=token,
                                  commit_message=commit_message)

    # -- internals -------------------------------------------------------------------------------------------
    def _require_live(self) -> None:
        if self._model is None:
            raise HfEditError("This EditedModel was merged with merge_and_unload(); use the returned model.")

    def _method_config(self, method: MethodSpec | None) -> MethodConfig:
        if method is None:
            if not self._edits:
                method = "rome"
            else:
                last = self._edits[-1]
                method = (ROMEConfig if last.method == "rome" else FTConfig).from_dict(last.config)
        if isinstance(method, (ROMEConfig, FTConfig)):
            return method
        if isinstance(method, Mapping):
            return ROMEConfig.from_dict(method)
        model_id = getattr(self._model, "name_or_path", None)
        name = method.lower() if isinstance(method, str) else None
        if name == "rome":
            return rome_preset_for(model_id)
        if name in ("ft", "ft+l"):
            return ft_preset_for(model_id, constrained=name == "ft+l")
        raise UnknownMethodError(f"Unknown editing method {method!r}; available: 'rome', 'ft', 'ft+l', or a "
                                 "ROMEConfig / FTConfig.")

    def _editor(self, method: MethodSpec | None) -> Editor:
        config = self._method_config(method).resolved_for(self._model)
        key = type(config).__name__ + json.dumps(config.to_dict(), sort_keys=True)
        if key not in self._editors:
            if isinstance(config, FTConfig):
                self._editors[key] = FTEditor(self._model, self.tokenizer, config, progress=self._progress)
            else:
                templates = self._saved_templates if config.context_templates is None else None
                self._editors[key] = ROMEEditor(self._model, self.tokenizer, config, stats=self._stats,
                                                base_context=self.disable_edits, progress=self._progress,
                                                templates=templates, revision=self._revision)
        return self._editors[key]

    def _rebuild(self, fold: bool = True) -> None:
        """Make the adapters hold exactly ``self._edits`` (the base weights are never touched); with ``fold``,
        modules whose stacked ROME rank exceeds the fold rank hold one dense delta instead."""
        if self._peft is not None:
            with quiet_peft():
                self._model = self._peft.unload()
            self._peft = None
        self._folded = {}
        if not self._edits:
            return
        groups: dict[int, dict[str, list[LoraFactors]]] = {}
        for e in self._edits:
            groups.setdefault(e.group, {}).setdefault(e.module, []).append(e.factors)
        names = {group: ADAPTER_NAME if i == 0 else f"edit_{i}" for i, group in enumerate(groups)}
        for e in self._edits:
            e.adapter = names[e.group]
        adapters = [(names[g], {m: self._adapter_factors(names[g], m, parts, fold) for m, parts in modules.items()})
                    for g, modules in groups.items()]
        is_conv1d = {m: resolve_target(self._model, None, m).is_conv1d for _, factors in adapters for m in factors}
        self._peft = attach_adapters(self._model, adapters, is_conv1d,
                                     base_model_name_or_path=getattr(self._model, "name_or_path", None) or None,
                                     revision=self._revision)


def _dense_factors(stacked: LoraFactors) -> LoraFactors:
    """Stacked factors as one full-rank factorisation of their ΔW: I @ ΔW or ΔW @ I, whichever is thinner."""
    delta = stacked.delta_weight()
    out_features, in_features = delta.shape
    if out_features <= in_features:
        return LoraFactors(A=delta, B=torch.eye(out_features))
    return LoraFactors(A=torch.eye(in_features), B=delta)


def _load_base(pretrained: str | os.PathLike, *, revision: str | None, token: str | bool | None,
               **model_kwargs: Any) -> nn.Module:
    model_kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(pretrained, revision=revision, token=token, **model_kwargs).eval()


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EditFolderError(f"Cannot read {folder / MANIFEST_NAME}: {err}") from err
    if manifest.get("format") != MANIFEST_FORMAT:
        raise EditFolderError(f"{folder / MANIFEST_NAME} has format {manifest.get('format')!r}, expected "
                              f"{MANIFEST_FORMAT!r}.")
    return manifest


def _edits_from_manifest(manifest: dict[str, Any], factors: dict[str, dict[str, LoraFactors]],
                         folder: Path) -> list[Edit]:
    """Pair the manifest's entries with the adapters' factor columns, checking that they agree."""
    entries = manifest.get("edits", [])
    ranks: dict[tuple[str, str], list[int]] = {}
    for entry in entries:
        ranks.setdefault((entry.get("adapter", ADAPTER_NAME), entry["module"]), []).append(int(entry["rank"]))
    found = {(a, m): f.rank for a, modules in factors.items() for m, f in modules.items()}
    expected = {key: sum(r) for key, r in ranks.items()}
    if found != expected:
        raise EditFolderError(f"The adapters in {folder} do not match their manifest: (adapter, module) ranks "
                              f"{found} in the adapters, {expected} in {MANIFEST_NAME}.")
    parts = {key: iter(factors[key[0]][key[1]].split(r)) for key, r in ranks.items()}
    return [Edit(requests=tuple(as_request(r) for r in e["requests"]), method=e["method"], module=e["module"],
                 layer=e.get("layer"), factors=next(parts[(e.get("adapter", ADAPTER_NAME), e["module"])]),
                 config=e.get("config", {}), info=e.get("info", {}), group=int(e.get("group", 0)),
                 adapter=e.get("adapter", ADAPTER_NAME))
            for e in entries]
