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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .adapters import ADAPTER_NAME, LoraFactors, attach_adapters, quiet_peft, read_adapter_factors
from .architecture import base_layer, num_layers, resolve_target, unwrap_model
from .cards import render_card
from .checks import Verification, VerificationRow, check_requests
from .edit import Edit
from .errors import (
    ConfigError,
    EditDidNotTakeWarning,
    EditFolderError,
    HfEditError,
    ModelNotFoundError,
    UnknownMethodError,
)
from .files import looks_like_local_path
from .hub import attach_merged_card, find_edit_repo, push_folder, push_merged_folder
from .manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    edits_from_manifest,
    is_edit_folder,
    load_state,
    read_manifest,
    save_state,
)
from .methods import EditConfig, EditContext, Editor, StatisticsProvider, Update, config_from_dict, get_method
from .methods.base import AUTO
from .methods.registry import MethodSpec, resolve_config
from .requests import EditRequest, as_requests
from .stats import SecondMomentStats
from .version import __version__

__all__ = ["EditedModel", "Edit", "EditResult", "SkippedRequest", "MANIFEST_NAME"]

logger = logging.getLogger(__name__)

RequestLike = EditRequest | Mapping[str, Any]
OnError = str  # "raise" | "skip"


@dataclass(frozen=True)
class SkippedRequest:
    """A request that ``edit(..., on_error="skip")`` did not apply, and why."""

    index: int
    request: EditRequest
    error: HfEditError

    def __str__(self) -> str:
        return str(self.error)  # names the request (index, subject, target)


class EditResult(list):
    """The edits one :meth:`EditedModel.edit` call applied (a list of :class:`Edit`), plus :attr:`skipped`: the
    requests refused with ``on_error="skip"`` and their reasons."""

    def __init__(self, edits: Iterable[Edit] = (), skipped: Iterable[SkippedRequest] = ()) -> None:
        super().__init__(edits)
        self.skipped: list[SkippedRequest] = list(skipped)


class EditedModel:
    """A causal LM with knowledge edits, stored as PEFT LoRA adapters that are all active together.

    Every method returns updates ΔW = B A of modules (see :mod:`hf_edit.methods`).  Consecutive stackable updates
    of one method (ROME, MEMIT) share an adapter whose rank grows with each edit; a non-stackable update (an FT/FT+L
    training run's dense delta) gets an adapter of its own.  The first adapter is PEFT's ``"default"`` (saved
    at the folder's root, so plain ``PeftModel.from_pretrained`` loads it); later ones are ``"edit_1"``, ...

    Build it with :meth:`from_pretrained` (a base model, an edit folder or an edit repo on the Hub); then
    :meth:`edit`, :meth:`remove_edit`, :meth:`disable_edits`, :meth:`save_pretrained`, :meth:`push_to_hub`,
    :meth:`merge_and_unload`, :meth:`push_merged_to_hub`.  Calling the object, ``generate``, ``config`` and
    ``device`` pass through to the model.

    Args:
        model: a transformers causal LM (or a ``PeftModel`` loaded from an hf_edit folder, with ``edits``).
        tokenizer: its fast tokenizer.
        method: the default editing method (a registered name such as ``"rome"``, a config object such as
            :class:`ROMEConfig`, or a dict with a ``"method"`` key); ``None`` means the configuration of the latest
            edit in ``edits``, else ``"rome"``.
        stats: explicit second-moment statistics (one object, or a mapping from layer/module name).
        progress: show progress bars (over requests while editing, statistics, training); ``False`` prints nothing.
        stats_data: the texts for second-moment statistics of whichever method needs them (a Hub dataset id, a
            local text file or folder, or a ``datasets.Dataset``): used as ``mom2_dataset`` of every config that
            leaves it at its default, so the data is named once even when the default method changes.
        fold_rank: when the ROME edits of one module in one adapter stack to a rank above this, the adapter holds
            their sum as one dense delta instead (cheaper once the rank exceeds min(d_in, d_out)).  ``"auto"``
            (default): min(d_in, d_out) of the module; ``None``: never fold.  :meth:`representation` says which
            modules are folded; saved folders always hold the exact rank-k factors.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, method: MethodSpec | None = None,
                 stats: SecondMomentStats | Mapping[int | str, SecondMomentStats] | None = None,
                 progress: bool = True, edits: list[Edit] | None = None, revision: str | None = None,
                 fold_rank: int | str | None = "auto", state: Mapping[str, Mapping[str, Any]] | None = None,
                 stats_data: Any = None) -> None:
        self._peft: PeftModel | None = model if isinstance(model, PeftModel) else None
        self._model: nn.Module | None = unwrap_model(model).eval()
        self.tokenizer = tokenizer
        self._default_method = method
        self._progress = progress
        self.stats_data = stats_data
        self._edits: list[Edit] = list(edits or [])
        self._revision = revision
        self._statistics = StatisticsProvider(self._model, tokenizer, explicit=stats, base_context=self.disable_edits,
                                              revision=revision, progress=progress)
        self._state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in (state or {}).items()}
        self._editors: dict[str, Editor] = {}
        self._auto: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {}  # layers="auto" choices by config
        self._auto_info: dict[str, dict[str, Any]] = {}
        if not (fold_rank in (None, "auto") or (isinstance(fold_rank, int) and fold_rank >= 1)):
            raise ConfigError(f"fold_rank must be 'auto', None or a positive integer, got {fold_rank!r}.")
        self.fold_rank = fold_rank
        self._folded: dict[tuple[str, str], int] = {}

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike | nn.Module, edits: Iterable[RequestLike] | None = None,
                        *, method: MethodSpec | None = None,
                        stats: SecondMomentStats | Mapping[int | str, SecondMomentStats] | None = None,
                        tokenizer: PreTrainedTokenizerBase | None = None, revision: str | None = None,
                        token: str | bool | None = None, base_model: str | os.PathLike | None = None,
                        progress: bool = True, stats_data: Any = None, **model_kwargs: Any) -> EditedModel:
        """Load a base model (Hub id, local path or model object) or a saved edit folder, and apply ``edits``.

        A Hub repo id is first looked up as an edit repo (one request for its ``hf_edit.json``; pushed by
        :meth:`push_to_hub`): if it is one, its snapshot is downloaded and loaded like a local edit folder, else the
        id is loaded as a base model.  With ``HF_HUB_OFFLINE=1`` an edit repo loads from the local cache.

        Args:
            pretrained: a model id or path, a loaded causal LM, a folder written by :meth:`save_pretrained`, or the
                id of a Hub repo written by :meth:`push_to_hub`.
            edits: requests to apply now (``EditRequest``, reference dicts or CounterFact records).
            method: a method name (e.g. ``"rome"``: the preset for the model id, else documented defaults), a
                config object or a dict with a ``"method"`` key.  Default: the configuration recorded with the
                latest loaded edit, else ``"rome"``.
            stats: second-moment statistics to use instead of computing them.
            tokenizer: defaults to the tokenizer stored with the model.
            revision: for a Hub edit repo, the revision (branch, tag or commit) of that repo (the base model's
                revision is the one recorded in its manifest); for a local edit folder, the base model's revision;
                otherwise passed to ``from_pretrained`` of the model and tokenizer.
            token: Hub token, used for the edit repo, the base model and the tokenizer.
            base_model: for an edit folder, load this base instead of the one recorded in it.
            progress: show progress bars.
            stats_data: texts for the second-moment statistics of any method that needs them (see the class).
            **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (default ``dtype=torch.float32``).
        """
        hub_folder = None
        if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, nn.Module):
            _existing_or_hub_id(pretrained)  # a missing local path fails here, before any Hub request
        if isinstance(pretrained, str) and not os.path.exists(pretrained):
            hub_folder = find_edit_repo(pretrained, revision=revision, token=token)
        if hub_folder is not None:  # the revision was the edit repo's; the base revision comes from its manifest
            model = cls._load_edit_folder(hub_folder, tokenizer=tokenizer, base_model=base_model, revision=None,
                                          token=token, method=method, stats=stats, progress=progress,
                                          **model_kwargs)
            model.stats_data = stats_data
        elif isinstance(pretrained, (str, os.PathLike)) and is_edit_folder(pretrained):
            model = cls._load_edit_folder(Path(pretrained), tokenizer=tokenizer, base_model=base_model,
                                          revision=revision, token=token, method=method, stats=stats,
                                          progress=progress, **model_kwargs)
            model.stats_data = stats_data
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
            model = cls(base, tokenizer, method=method, stats=stats, progress=progress, revision=revision,
                        stats_data=stats_data)
        if edits is not None:
            model.edit(edits)
        return model

    @classmethod
    def _load_edit_folder(cls, folder: Path, *, tokenizer, base_model, revision, token, method, stats, progress,
                          **model_kwargs) -> EditedModel:
        manifest = read_manifest(folder)
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
        edits = edits_from_manifest(manifest, {n: read_adapter_factors(peft_model, n) for n in names}, folder)
        for name in dict.fromkeys(e.method for e in edits):
            try:
                get_method(name)  # loads the plugin that provides it, if installed
            except UnknownMethodError:
                logger.warning("%s holds edits made with the method %r, which is not installed: they load and run, "
                               "but further edits with it need its plugin package.", folder, name)
        state = load_state(manifest, folder)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(base_id, revision=base_revision, token=token)
        return cls(peft_model, tokenizer, method=method, stats=stats, progress=progress, edits=edits,
                   revision=base_revision, state=state)

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

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped model's (``get_output_embeddings``, ``name_or_path``, ``dtype``, ...), so
        any function that takes a causal LM takes an ``EditedModel``."""
        if name.startswith("_") or name in ("model", "base_model", "tokenizer"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def eval(self) -> EditedModel:
        """Evaluation mode (as it always is); returns ``self``."""
        self.model.eval()
        return self

    def to(self, *args: Any, **kwargs: Any) -> EditedModel:
        """Move the model and its adapters (see ``nn.Module.to``); returns ``self``."""
        self.model.to(*args, **kwargs)
        return self

    def modules(self) -> Iterator[nn.Module]:
        return self.model.modules()

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.model.parameters(recurse)

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

    def edit(self, requests: RequestLike | Iterable[RequestLike], method: MethodSpec | None = None, *,
             on_error: OnError = "raise", check: bool = True, stats_data: Any = None) -> EditResult:
        """Apply requests with an editing method: one after another, each on the model as edited so far (ROME), or
        all together in one computation (FT/FT+L, MEMIT), as the method's editor says (``Editor.joint``).

        Every request is validated before anything is computed.  After each edit its requests are checked on their
        own prompts (:class:`~hf_edit.checks.EditCheck` in ``edit.info["checks"]``): P(new), the new target's rank
        and P(old); an :class:`~hf_edit.errors.EditDidNotTakeWarning` (and a log line) says when the new target is
        not the top prediction.

        Args:
            requests: ``EditRequest`` objects, reference dicts or CounterFact records.
            method: a registered method name (``hf_edit.methods.available_methods()``), a config object or a dict
                with a ``"method"`` key; default: the model's default method.
            on_error: ``"raise"`` (default): the call is atomic: if anything fails, every edit of this call is
                undone, the method's state restored, and the exception re-raised, naming the request (index and
                subject).  ``"skip"``: a request that fails validation or whose computation fails (e.g.
                :class:`~hf_edit.errors.DisablingEditError`) is skipped and reported in the result's ``skipped``,
                and every other request is applied (for a joint method a failed computation skips its batch).
            check: measure whether each edit took (two small forward passes per batch).
            stats_data: texts for second-moment statistics (see the class), for this call.

        Returns:
            An :class:`EditResult`: the new :class:`Edit` objects (one per updated module and request, or per module
            for joint methods), with ``.skipped``.
        """
        self._require_live()
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        requests = as_requests(requests)
        editor = self._editor(method if method is not None else self._default_method, stats_data, requests)
        skipped: list[SkippedRequest] = []
        valid: list[tuple[int, EditRequest]] = []
        for index, request in enumerate(requests):
            try:
                editor.validate(request)
            except ConfigError:
                raise  # the method's configuration, not this request, is wrong
            except HfEditError as err:
                _name_request(err, index, request)
                if on_error == "raise":
                    raise
                skipped.append(SkippedRequest(index, request, err))
                continue
            valid.append((index, request))
        before = len(self._edits)
        name = editor.config.name
        state_before = dict(self._state.get(name, {}))
        batches = [valid] if editor.joint else [[item] for item in valid]
        bar = self._progress_bar(len(valid), f"{editor.config.name} edits")
        try:
            with bar:
                for batch in batches:
                    batch_requests = [r for _, r in batch]
                    state_batch = dict(self._state.get(name, {}))
                    try:
                        updates = editor.compute(batch_requests)
                    except HfEditError as err:
                        if len(batch) == 1:
                            _name_request(err, *batch[0])
                        if on_error == "raise":
                            raise
                        self._state[name].clear()
                        self._state[name].update(state_batch)
                        skipped += [SkippedRequest(i, r, err) for i, r in batch]
                        bar.update(len(batch))
                        continue
                    applied = self._apply(editor, updates, batch_requests)
                    if check and applied:
                        self._check(applied, batch_requests)
                    bar.update(len(batch))
                    if applied and "checks" in applied[-1].info:
                        bar.set_postfix(p_new=f"{applied[-1].info['checks'][-1]['p_new']:.3f}")
        except BaseException:
            self._state[name].clear()
            self._state[name].update(state_before)
            if len(self._edits) != before:
                del self._edits[before:]
                self._rebuild()
            raise
        for item in skipped:
            logger.warning("Skipped %s", item)
        return EditResult(self._edits[before:], skipped)

    def preview_edits(self, requests: RequestLike | Iterable[RequestLike], method: MethodSpec | None = None
                      ) -> list[list[Edit] | HfEditError]:
        """The edits each request would get **alone** on the model as it is now, without applying any.

        What ``edit(request)`` followed by ``remove_edit`` would give for each request in turn, computed together
        where the method can (ROME optimises the v* of all requests in one batch, with the same result per request).
        The evaluation's single protocol scores these edits case by case.

        Returns:
            Per request, its :class:`Edit` objects (not part of :attr:`edits`), or the error that refused it.
        """
        self._require_live()
        requests = as_requests(requests)
        editor = self._editor(method if method is not None else self._default_method, None, requests)
        name, config = editor.config.name, editor.config.to_dict()
        state = dict(self._state.get(name, {}))
        try:
            results = editor.compute_each(requests)
        finally:  # a preview leaves the method's state as it was
            self._state[name].clear()
            self._state[name].update(state)
        out: list[list[Edit] | HfEditError] = []
        for index, (request, result) in enumerate(zip(requests, results, strict=True)):
            if isinstance(result, HfEditError):
                _name_request(result, index, request)
                out.append(result)
                continue
            out.append([Edit(requests=update.requests or (request,), method=name, module=update.module,
                             layer=update.layer, factors=update.factors, config=config, info=dict(update.info),
                             group=-1, batch=-1, stackable=update.stackable, tensors=update.tensors)
                        for update in result])
        return out

    def _progress_bar(self, total: int, description: str) -> Any:
        if not self._progress or total < 2:
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, leave=False)

    def _check(self, edits: Sequence[Edit], requests: Sequence[EditRequest]) -> None:
        """Record whether the batch took on its requests' own prompts; warn for each that did not."""
        checks = check_requests(self.model, self.tokenizer, requests)
        by_request = {id(r): c for r, c in zip(requests, checks, strict=True)}
        for edit in edits:
            edit.info["checks"] = [by_request[id(r)].to_dict() for r in edit.requests if id(r) in by_request]
        for request, result in zip(requests, checks, strict=True):
            if not result.took:
                message = (f"The edit {request.subject!r} -> {request.target_new!r} did not take: the new target's "
                           f"first token ranks {result.rank_new} (P(new) = {result.p_new:.3g}; the top prediction "
                           f"is {result.top!r}). Check the request, or tune the method ('hf-edit methods "
                           f"{edits[0].method}' lists its hyperparameters; layers='auto' traces the layer).")
                logger.warning(message)
                warnings.warn(message, EditDidNotTakeWarning, stacklevel=3)

    def prepare(self, method: MethodSpec | None = None) -> None:
        """Load or compute what ``method``'s editor needs before its first edit (e.g. second-moment statistics);
        under a multi-process group every process must call this together (it is collective)."""
        self._require_live()
        self._editor(method if method is not None else self._default_method).prepare()

    def verify_edits(self) -> Verification:
        """Check every applied request on the model as it is now: does its new target (still) win?

        Returns:
            A :class:`~hf_edit.checks.Verification` (print it for a table): per request of every edit batch, its
            subject, target, P(new) when it was made and now, the new target's rank, P(old), and whether it holds.
        """
        self._require_live()
        seen, requests, rows = set(), [], []
        for edit in self._edits:
            for position, request in enumerate(edit.requests):
                if (edit.batch, position) in seen:
                    continue
                seen.add((edit.batch, position))
                recorded = edit.info.get("checks") or []
                p_then = recorded[position]["p_new"] if position < len(recorded) else None
                requests.append(request)
                rows.append((edit.batch, edit.method, request, p_then))
        checks = check_requests(self.model, self.tokenizer, requests)
        return Verification(VerificationRow(edit=batch, method=method, subject=r.subject, prompt=r.filled_prompt,
                                            target=r.target_new, p_new_at_edit=p_then, check=c)
                            for (batch, method, r, p_then), c in zip(rows, checks, strict=True))

    def _apply(self, editor: Editor, updates: Sequence[Update], requests: Sequence[EditRequest]) -> list[Edit]:
        """Append the updates of one ``compute`` call as one batch of edits and rebuild the adapters."""
        if not updates:
            return []
        name, config = editor.config.name, editor.config.to_dict()
        auto = self._auto_info.get(json.dumps(config, sort_keys=True))
        last = self._edits[-1] if self._edits else None
        batch = max((e.batch for e in self._edits), default=-1) + 1
        group = None
        if all(u.stackable for u in updates) and last is not None and last.stackable and last.method == name:
            group = last.group
        start = len(self._edits)
        for update in updates:
            if group is None or not update.stackable:
                group = self._next_group()
            self._edits.append(Edit(requests=update.requests or tuple(requests), method=name, module=update.module,
                                    layer=update.layer, factors=update.factors, config=config,
                                    info=dict(update.info, **({"auto_layers": auto} if auto else {})),
                                    group=group, batch=batch, stackable=update.stackable,
                                    tensors=update.tensors))
            if not update.stackable:
                group = None
        self._rebuild()
        return self._edits[start:]

    def _next_group(self) -> int:
        return max((e.group for e in self._edits), default=-1) + 1

    def remove_edit(self, index: int) -> list[Edit]:
        """Remove the edit at ``index`` together with every edit computed with it, and return what was removed.

        A ROME edit (one request, one module) is removed alone; the edits of a joint computation (every module and
        request of one FT/FT+L training run, one MEMIT batch) cannot be separated exactly and are removed together.
        Later edits, computed with the removed ones present, stay as they are.
        """
        self._require_live()
        edit = self._edits[index]
        removed = [e for e in self._edits if e.batch == edit.batch]
        self._edits[:] = [e for e in self._edits if e.batch != edit.batch]
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
                "edits": [e.manifest_entry() for e in self._edits],
                "state": {name: {k: _describe_state(v) for k, v in values.items()}
                          for name, values in self._state.items() if values}}

    def save_pretrained(self, save_directory: str | os.PathLike, *,
                        eval_results: Mapping[str, float] | None = None, eval_dataset: str | None = None,
                        base_model_id: str | None = None, **kwargs: Any) -> None:
        """Write the adapters, the edit manifest ``hf_edit.json`` and the model card ``README.md``.

        The first adapter goes to the folder's root (``adapter_config.json``, ``adapter_model.safetensors``); later
        ones (e.g. an FT delta after ROME edits) go to subfolders named after them, as PEFT lays them out.  The
        card (:func:`hf_edit.cards.render_card`) replaces PEFT's generic README.

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
        manifest["state"] = save_state(self._state, save_directory)
        (save_directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
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

    def _method_config(self, method: MethodSpec | None) -> EditConfig:
        if method is None and self._edits:
            last = self._edits[-1]
            return config_from_dict(last.config, last.method)
        return resolve_config(method, getattr(self._model, "name_or_path", None))

    def _editor(self, method: MethodSpec | None, stats_data: Any = None,
                requests: Sequence[EditRequest] = ()) -> Editor:
        config = _with_stats_data(self._method_config(method), stats_data or self.stats_data)
        if config.layers == AUTO:
            config = self._auto_layers(config, requests)
        config = config.resolved_for(self._model)
        key = type(config).__name__ + json.dumps(config.to_dict(), sort_keys=True)
        if key not in self._editors:
            context = EditContext(model=self._model, tokenizer=self.tokenizer, base_context=self.disable_edits,
                                  revision=self._revision, progress=self._progress, stats=self._statistics,
                                  edits=self._edits, state=self._state.setdefault(config.name, {}))
            self._editors[key] = get_method(config.name).editor_class(config, context)
        return self._editors[key]

    def _auto_layers(self, config: EditConfig, requests: Sequence[EditRequest]) -> EditConfig:
        """``config`` with ``layers="auto"`` replaced by the layers causal tracing of ``requests`` picks on the base
        model (once per config; the trace itself is cached per model fingerprint and facts)."""
        from .methods.base import model_id_of
        from .tracing import choose_layers, scaled_window, traced_profile

        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in self._auto:
            n_layers = num_layers(self._model)
            rule = (f"peak of the averaged MLP indirect effect at the subject's last token (window "
                    f"{scaled_window(n_layers)})" if config.auto_layer_count == 1 else
                    f"the {config.auto_layer_count} contiguous layers with the largest summed MLP indirect effect")
            try:
                with self.disable_edits():
                    profile = traced_profile(self._model, self.tokenizer, requests, kind="mlp",
                                             window=scaled_window(n_layers), progress=self._progress)
                layers = choose_layers(profile, config.auto_layer_count)
                info = {"layers": list(layers), "rule": rule, "n_facts": profile.n, "n_skipped": profile.n_skipped,
                        "mean_effect": [round(float(x), 6) for x in profile.mean]}
            except ConfigError as err:  # no fact the model knows among the requests
                layers = replace(config, layers=None).resolved_for(self._model).layers
                info = {"layers": list(layers), "rule": f"default (tracing failed: {err})"}
                warnings.warn(f"layers='auto': {err} Using the default layers {list(layers)} instead.", UserWarning,
                              stacklevel=4)
            logger.info("layers='auto' for %s on %s: %s (%s)", config.name, model_id_of(self._model) or "the model",
                        list(layers), info["rule"])
            self._auto[key] = (tuple(layers), info)
        layers, info = self._auto[key]
        resolved = replace(config, layers=layers)
        self._auto_info[json.dumps(resolved.to_dict(), sort_keys=True)] = info
        return resolved

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
    """The base model; a local folder is recorded by its absolute path (so a saved edit loads from anywhere)."""
    model_kwargs.setdefault("dtype", torch.float32)
    pretrained = _existing_or_hub_id(pretrained)
    return AutoModelForCausalLM.from_pretrained(pretrained, revision=revision, token=token, **model_kwargs).eval()


def _existing_or_hub_id(pretrained: str | os.PathLike) -> str:
    """An existing local folder as its absolute path, else a Hub id; a path that does not exist is an error here
    (no Hub round trip for a name that can only be a path)."""
    text = os.fspath(pretrained)
    if os.path.isdir(text):
        return str(Path(text).expanduser().resolve())
    if isinstance(pretrained, os.PathLike) or looks_like_local_path(text, ()) or os.path.exists(text):
        raise ModelNotFoundError(f"No such model folder: {text!r} (resolved to {Path(text).expanduser().resolve()}). "
                                 "Pass an existing folder written by save_pretrained, or a Hub model id such as "
                                 "'gpt2' or 'org/name'.")
    return text


def _describe_state(value: Any) -> Any:
    """A method-state value as the manifest shows it in memory (tensors by shape; saved folders reference them)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    return value


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, **kwargs: Any) -> None:
        return None


def _name_request(err: HfEditError, index: int, request: EditRequest) -> None:
    """Prefix the error's message with the request it is about (index and subject), once."""
    prefix = f"Request {index} ({request.subject!r} -> {request.target_new!r}): "
    if err.args and isinstance(err.args[0], str) and not err.args[0].startswith("Request "):
        err.args = (prefix + err.args[0], *err.args[1:])
    err.request_index, err.request = index, request


def _with_stats_data(config: EditConfig, stats_data: Any) -> EditConfig:
    """``config`` with ``mom2_dataset = stats_data`` when it has that field and leaves it at its default."""
    if stats_data is None:
        return config
    defaults = {f.name: f.default for f in fields(config)}
    if "mom2_dataset" not in defaults or config.mom2_dataset != defaults["mom2_dataset"]:
        return config
    return replace(config, mom2_dataset=stats_data if not isinstance(stats_data, os.PathLike) else str(stats_data))
