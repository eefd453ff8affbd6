"""Score a model and an editing method on CounterFact or zsRE under a named protocol.

Protocols:

* ``"single"`` (the reference's ``experiments/evaluate.py``): every case is edited into the model *alone*; its
  prompts are scored with that edit ("post"), then the edit is removed, which restores the model bitwise.  "pre"
  scores are those of the model before any edit (batched across all cases in one pass, which equals the
  reference's score-after-restore).  Post-edit scoring is batched across ``cases_per_batch`` cases at a time: each
  case's edit factors are applied only to that case's rows through forward hooks (the same arithmetic as its
  adapter), so every case gets the numbers it would get alone.
* ``"sequential"``: all edits are applied cumulatively, each computed on the model edited so far; then every case
  is scored on the model holding all edits.  With ``every=N`` the cases edited so far are also scored after every
  N edits (retention curves).  The model is restored at the end.

``method="none"`` scores the unedited model only.  An edit that fails (e.g. :class:`~hf_edit.errors.
OptimizationError`) or is refused (an invalid request) is recorded in its case and the run continues; such cases are
left out of the post summary, and :meth:`EvaluationResult.table` lists them under the table.

Data-parallel (``accelerate launch`` / ``torchrun``): under an initialised ``torch.distributed`` group of several
processes (``accelerate.PartialState()`` or :func:`hf_edit.stats.init_distributed` has run), the single protocol is
shared out: its units of work -- the pre-edit scoring chunks and the post-edit batches of ``cases_per_batch`` cases,
the same chunks a single process runs -- go round-robin to the processes, each edits and scores its own, and the
records are gathered (``all_gather_object``) in case order.  Every process returns the same result, equal to the
single-process one except for the timings (``timing["processes"]`` says how many shared the work); only the main
process should print or save it.  Second-moment statistics that the method's editor reads are loaded or computed
(collectively) before the work is shared out.  The sequential protocol cannot be shared out (each edit is computed
on the model holding every edit before it): it raises :class:`~hf_edit.errors.ConfigError` on every process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..adapters import LoraFactors
from ..architecture import max_positions, unwrap_model
from ..edit import Edit
from ..edited_model import EditedModel
from ..errors import ConfigError, HfEditError, InvalidRequestError, TokenizerError
from ..hooks import as_batch_seq, forward_hook
from ..methods.registry import MethodSpec, resolve_config
from ..stats import model_fingerprint
from ..stats.distributed import ProcessGroup, attempt
from ..version import __version__
from . import counterfact as cf
from . import zsre
from .capability import CapabilityCheck, CapabilityProbe
from .data import CounterFactCase, EvalData, EvalSource, load_eval_data, warn_if_fewer
from .generation import AttributeSnippets, TfidfModel, generate_texts, generation_entropy, reference_score

__all__ = ["evaluate_model", "EvaluationResult", "GenerationSettings", "PROTOCOLS", "main_process_first",
           "check_protocol_processes"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

PROTOCOLS = ("single", "batch", "sequential")
Protocol = Literal["single", "batch", "sequential"]
RESULT_FORMAT = "hf_edit.evaluation.v1"
#: Order of the summary table's rows (others follow).
_DISPLAY_ORDER = ("ES", "PS", "NS", "S", "EM", "PM", "NM", "GE", "RS", "rewrite_acc", "paraphrase_acc",
                  "neighborhood_acc", "score")
#: Cases per pre-edit scoring chunk (one unit of work when the cases are shared out).
_PRE_CHUNK = 256
#: Error types of an edit that was refused (the request cannot be applied) rather than failed (its computation).
_REFUSED = (InvalidRequestError, TokenizerError)
#: Failed or refused edits listed under the table (the others are counted).
_LISTED_FAILURES = 20


@dataclass(frozen=True)
class GenerationSettings:
    """The generation tests (CounterFact records in the ROME format only).

    Attributes:
        max_length: tokens per text including the prompt (the reference's ``max_out_len=100``); capped at the
            model's positions (the length used is recorded in the result).
        top_k: top-k sampling (5 in the reference).
        seed: seed of the local sampling generator (the reference does not seed).
        word_tokenizer: ``"regex"`` (no data download; GE approximate) or ``"nltk"`` (exact; needs ``punkt_tab``).
        snippets: attribute snippets for RS (``attribute_snippets.json``); RS is computed when given with ``tfidf``.
        tfidf: the TF-IDF model for RS (the reference's ``idf.npy`` + ``tfidf_vocab.json``, or one fitted).
    """

    max_length: int = 100
    top_k: int = 5
    seed: int = 0
    word_tokenizer: Literal["regex", "nltk"] = "regex"
    snippets: AttributeSnippets | None = None
    tfidf: TfidfModel | None = None

    def describe(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "top_k": self.top_k, "seed": self.seed,
                "word_tokenizer": self.word_tokenizer, "ge_exact": self.word_tokenizer == "nltk",
                "rs": self.snippets is not None and self.tfidf is not None,
                "idf_refitted": bool(getattr(self.tfidf, "refitted", False)) if self.tfidf is not None else None}


@dataclass
class EvaluationResult:
    """Everything a run produced: settings, provenance, per-case records and summaries.

    Attributes:
        protocol: ``"single"``, ``"batch"`` or ``"sequential"``.
        method: the registry name of the method (e.g. ``"rome"``), or ``"none"``.
        method_config: the resolved hyperparameters of the edits (``None`` for ``"none"``).
        model: name, revision and weight fingerprint of the evaluated model.
        data: source, format, fingerprint and size of the data set.
        summary: ``{"pre": {metric: {mean, std, stderr, n}}, "post": {...}}``, ×100.
        cases: one record per case: the request, the edit's outcome (``ok``; if not: ``status`` ``"failed"`` or
            ``"refused"``, ``error_type``, ``message``), pre and post scores.
        checkpoints: sequential protocol with ``every``: summaries after every N edits (with the capability
            check's figures when one was asked for).
        counts: how many cases are behind each phase: ``cases`` (evaluated), ``pre`` and ``post`` (scored in that
            phase; post leaves out the cases whose edit failed), ``failed`` and ``refused`` (edits).
        timing: seconds spent editing, scoring and generating; cases per second; ``processes`` that shared the
            work.
        settings: batch sizes, zsRE path, generation settings.
        environment: versions of hf_edit, torch, transformers, peft; device.
        capability: with a :class:`~hf_edit.evaluation.CapabilityCheck`: ``{"pre": {perplexity, ...}, "post":
            {perplexity, perplexity_ratio, kl}}`` (batch and sequential protocols), else ``None``.
    """

    protocol: str
    method: str
    method_config: dict[str, Any] | None
    model: dict[str, Any]
    data: dict[str, Any]
    summary: dict[str, dict[str, dict[str, float]]]
    cases: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    capability: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": RESULT_FORMAT, **asdict(self)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON (NaN written as ``null``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(self.to_dict()), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvaluationResult:
        values = json.loads(Path(path).read_text())
        if values.pop("format", None) != RESULT_FORMAT:
            raise ConfigError(f"{path} is not an hf_edit evaluation result ({RESULT_FORMAT}).")
        return cls(**values)

    def table(self) -> str:
        """The summary as a text table: one row per metric, pre and post columns (mean ± standard error), each
        headed by the number of cases behind it; the general-capability check; the sequential protocol's checkpoints
        (one row each); then the cases whose edit failed or was refused (case id, error type, first line of the
        message), which the post column leaves out."""
        phases = [p for p in ("pre", "post") if self.summary.get(p)]
        names = list(dict.fromkeys(n for p in phases for n in self.summary[p]))
        names.sort(key=lambda n: _DISPLAY_ORDER.index(n) if n in _DISPLAY_ORDER else len(_DISPLAY_ORDER))
        counts = self.counts or _counts(self.cases)
        header = ["metric", *(f"{p} (n={counts[p]})" if p in counts else p for p in phases)]
        rows = [[name, *(_cell(self.summary[p].get(name)) for p in phases)] for name in names]
        lines = _aligned(header, rows)
        title = (f"{self.data.get('format')} · {self.method} · protocol={self.protocol} · "
                 f"n={self.data.get('n')} · {self.timing.get('cases_per_second', float('nan')):.3f} cases/s")
        return "\n".join([title, *lines, *_capability_lines(self.capability), *_checkpoint_lines(self.checkpoints),
                          *_failure_lines(self.cases)])

    def __str__(self) -> str:
        return self.table()


def _counts(cases: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Cases evaluated, scored before and after editing, and edits that failed or were refused."""
    counts = {"cases": len(cases)}
    for phase in ("pre", "post"):
        scored = sum(1 for c in cases if phase in c and "metrics" in c[phase])
        if scored or phase == "pre":
            counts[phase] = scored
    edits = [c["edit"] for c in cases if "edit" in c]
    if edits:
        counts["failed"] = sum(1 for e in edits if not e.get("ok") and e.get("status") != "refused")
        counts["refused"] = sum(1 for e in edits if not e.get("ok") and e.get("status") == "refused")
    return counts


def _failure_lines(cases: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines naming each case whose edit did not apply: case id, failed/refused, error type, the message's first
    line."""
    bad = [c for c in cases if "edit" in c and not c["edit"].get("ok")]
    if not bad:
        return []
    refused = sum(1 for c in bad if c["edit"].get("status") == "refused")
    what = {0: "failed", len(bad): "were refused"}.get(refused, f"failed or were refused ({refused} refused)")
    lines = [f"{len(bad)} of {len(cases)} edits {what}; the post column leaves these cases out:"]
    for case in bad[:_LISTED_FAILURES]:
        edit = case["edit"]
        error_type, message = edit.get("error_type"), edit.get("message")
        if error_type is None:  # results written before error_type/message were recorded
            error_type, _, message = str(edit.get("error", "")).partition(": ")
        first = (str(message).strip().splitlines() or [""])[0]
        lines.append(f"  case {case.get('case_id')}: {edit.get('status', 'failed')}: {error_type}: {first}")
    if len(bad) > _LISTED_FAILURES:
        lines.append(f"  ... and {len(bad) - _LISTED_FAILURES} more (every case's edit outcome is in the result's "
                     "cases)")
    return lines


def _capability_lines(capability: Mapping[str, Any] | None) -> list[str]:
    """The general-capability check in one line: perplexity before and after, its ratio, the KL."""
    if not capability or not capability.get("post"):
        return []
    pre, post = capability["pre"], capability["post"]
    return [f"capability: perplexity {pre['perplexity']:.3f} -> {post['perplexity']:.3f} "
            f"(x{post['perplexity_ratio']:.3f}, {pre.get('windows')} windows); next-token KL on "
            f"{pre.get('kl_prompts')} unrelated prompts {post.get('kl', float('nan')):.4f}"]


def _checkpoint_lines(checkpoints: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sequential protocol's curve: per checkpoint, the edits made, the cases edited so far that were scored
    (n), each metric's mean over them and, with a capability check, the perplexity ratio and KL then."""
    if not checkpoints:
        return []
    names = [n for n in _DISPLAY_ORDER if any(n in c.get("summary", {}) for c in checkpoints)]
    capability = any(c.get("capability") for c in checkpoints)
    header = ["edits", "n", *names, *(["ppl ratio", "KL"] if capability else [])]
    rows = []
    for point in checkpoints:
        summary, cap = point.get("summary", {}), point.get("capability") or {}
        row = [str(point["edits"]), str(point.get("successful_edits", "-")),
               *(f"{summary[n]['mean']:.2f}" if n in summary else "-" for n in names)]
        if capability:
            row += [f"{cap['perplexity_ratio']:.3f}" if "perplexity_ratio" in cap else "-",
                    f"{cap['kl']:.4f}" if "kl" in cap else "-"]
        rows.append(row)
    return ["checkpoints (n: the cases edited so far, scored after that many edits):",
            *("  " + line for line in _aligned(header, rows))]


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """The header and rows as lines of left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]


def _cell(value: Mapping[str, float] | None) -> str:
    if not value:
        return "-"
    text = f"{value['mean']:.2f}"
    if "stderr" in value:
        text += f" ± {value['stderr']:.2f}"
    return text


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- the runner ---------------------------------------------------------------------------------------------------
def evaluate_model(model: EditedModel | nn.Module | str | os.PathLike, data: EvalData | EvalSource, *,
                   method: MethodSpec | Literal["none"] = "rome", protocol: Protocol = "single",
                   tokenizer: PreTrainedTokenizerBase | None = None, n: int | None = None,
                   every: int | None = None, edit_batch_size: int = 1, batch_size: int = 64,
                   cases_per_batch: int = 16, generation: GenerationSettings | bool = False,
                   zsre_path: str = "auto", capability: CapabilityCheck | None = None, stats: Any = None,
                   progress: bool = True) -> EvaluationResult:
    """Edit and score ``data`` with ``method`` under ``protocol``; the model is left as it was given.

    Under an initialised ``torch.distributed`` group of several processes (``accelerate launch``, ``torchrun``) the
    single protocol's cases are shared out and every process must call this function with the same arguments; see
    the module documentation.

    Args:
        model: an :class:`~hf_edit.EditedModel` (existing edits stay and are part of "pre"), a transformers
            causal LM (with ``tokenizer``), or a model id / path.
        data: loaded :class:`EvalData`, anything :func:`~hf_edit.evaluation.load_eval_data` accepts (a file, a
            Hub id), or plain record dicts (one or a list) with only the fields the metrics read (see
            :func:`~hf_edit.evaluation.case_from_record`).
        method: a registered method name (``hf_edit.methods.available_methods()``), a config object, or
            ``"none"`` (score the model as it is).
        protocol: ``"single"`` (the reference's: each case edited alone, scored, the edit removed), ``"batch"``
            (the MEMIT paper's: every case edited in ONE call, then every case scored) or ``"sequential"``
            (AlphaEdit's lifelong protocol: calls of ``edit_batch_size`` cases one after another, each on the model
            edited so far, every case scored at the end).
        n: evaluate the first ``n`` cases (a warning says so when there are fewer).
        every: sequential protocol: also score the cases edited so far after every ``every`` edits (a multiple of
            ``edit_batch_size``), for retention curves.
        edit_batch_size: sequential protocol: cases per edit call (1: one case at a time).  Named so because
            ``batch_size`` is the scoring batch.
        batch_size: rows per scoring forward pass.
        cases_per_batch: single protocol: cases whose post-edit prompts are scored together.
        generation: ``True`` or :class:`GenerationSettings` to run the generation tests (GE, RS) on CounterFact
            records that have generation prompts.
        zsre_path: zsRE inputs built by ``"string"`` concatenation (the reference), ``"ids"`` or ``"auto"``.
        stats: second-moment statistics for the methods that need them (see :class:`~hf_edit.EditedModel`).
        capability: a :class:`~hf_edit.evaluation.CapabilityCheck` (batch and sequential protocols): perplexity
            and next-token KL on unrelated text before and after the edits (and at every checkpoint).
        progress: show progress bars (on the main process only, when the cases are shared out).

    Raises:
        ConfigError: an unknown protocol, ``every`` or ``edit_batch_size`` without the sequential protocol (or not
            positive), ``capability`` with the single protocol, or the batch/sequential protocol under several
            processes.
        HfEditError: another process failed while evaluating its share (every process raises).
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"Unknown protocol {protocol!r}; use one of {PROTOCOLS}.")
    if every is not None and (protocol != "sequential" or every < 1):
        raise ConfigError("every= needs protocol='sequential' and a positive number of edits.")
    if edit_batch_size < 1 or (edit_batch_size > 1 and protocol != "sequential"):
        raise ConfigError(f"edit_batch_size={edit_batch_size}: it must be positive, and above 1 only with "
                          "protocol='sequential' (protocol='batch' edits every case in one call).")
    if every is not None and every % edit_batch_size:
        raise ConfigError(f"every={every} must be a multiple of edit_batch_size={edit_batch_size} (checkpoints fall "
                          "between edit calls).")
    if capability is not None and protocol == "single" and method != "none":
        raise ConfigError("The capability check measures the model holding many edits: use protocol='batch' or "
                          "'sequential' (the single protocol removes each edit before the next).")
    if batch_size < 1 or cases_per_batch < 1:
        raise ConfigError("batch_size and cases_per_batch must be positive.")
    group = _process_group()
    if method != "none":
        check_protocol_processes(protocol, 1 if group is None else group.size)
    show = progress and (group is None or group.is_main)
    edited = _edited_model(model, tokenizer, stats, show)
    if not isinstance(data, EvalData):
        source = data
        data = load_eval_data(source, n=n) if group is None else main_process_first(
            lambda: load_eval_data(source, n=n), "loading the evaluation data")
    elif n is not None:
        warn_if_fewer(n, len(data), data.source)
        data = EvalData(cases=data.cases[:n], data_format=data.data_format, source=data.source,
                        fingerprint=data.fingerprint, n_total=data.n_total)
    settings = generation if isinstance(generation, GenerationSettings) else (
        GenerationSettings() if generation else None)
    if settings is not None and data.data_format != "counterfact":
        raise ConfigError("The generation tests need CounterFact records in the ROME format (generation prompts).")
    run = _Run(edited, data, settings, batch_size=batch_size, zsre_path=zsre_path, progress=show)
    if capability is not None:
        run.capability = CapabilityProbe(capability, edited.model, edited.tokenizer)
    method_name = "none" if method == "none" else resolve_config(
        method, getattr(edited.base_model, "name_or_path", None)).name
    started = time.perf_counter()
    if group is not None:
        if method_name != "none":
            _prefetch_statistics(edited, method)
        run.shared(None if method_name == "none" else method, cases_per_batch, group)
    elif method_name == "none":
        run.score_pre()
    elif protocol == "single":
        run.score_pre()
        run.single(method, cases_per_batch)
    elif protocol == "batch":
        run.score_pre()
        run.sequential(method, None, edit_batch_size=max(1, len(data)), what="batch")
    else:
        run.score_pre()
        run.sequential(method, every, edit_batch_size=edit_batch_size)
    elapsed = time.perf_counter() - started
    run.timing["total_seconds"] = elapsed
    run.timing["cases_per_second"] = len(data) / elapsed if elapsed > 0 else math.nan
    run.timing["processes"] = 1 if group is None else group.size
    return EvaluationResult(
        protocol=protocol, method=method_name, method_config=run.method_config, model=_describe_model(edited),
        data=data.describe(), summary=run.summaries(), cases=run.records, checkpoints=run.checkpoints,
        counts=_counts(run.records), timing=dict(run.timing),
        settings={"batch_size": batch_size, "cases_per_batch": cases_per_batch if protocol == "single" else None,
                  "every": every, "edit_batch_size": edit_batch_size if protocol == "sequential" else (
                      len(data) if protocol == "batch" else 1),
                  "zsre_path": run.zsre_path_used,
                  "capability": capability.describe() if capability is not None else None,
                  "generation": settings.describe() | {"max_length_used": run.generation_length}
                  if settings else None,
                  "pre_existing_edits": run.base_edits},
        environment=_environment(edited), capability=run.capability_result())


# -- several processes ----------------------------------------------------------------------------------------------
def _process_group() -> ProcessGroup | None:
    """This process's place in the initialised default process group, if it has more than one process."""
    if dist.is_available() and dist.is_initialized():
        size = dist.get_world_size()
        return ProcessGroup(dist.get_rank(), size) if size > 1 else None
    if os.environ.get("WORLD_SIZE", "1").isdigit() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logger.warning("WORLD_SIZE=%s but torch.distributed is not initialised: this process evaluates every case "
                       "itself. Call accelerate.PartialState() or hf_edit.stats.init_distributed() first to share "
                       "the cases out.", os.environ["WORLD_SIZE"])
    return None


def check_protocol_processes(protocol: str, processes: int) -> None:
    """Refuse a protocol that cannot be shared out across ``processes`` processes.

    Raises:
        ConfigError: the batch or sequential protocol with more than one process.
    """
    if protocol in ("sequential", "batch") and processes > 1:
        raise ConfigError(
            f"The {protocol} protocol cannot be shared out across {processes} processes: its edits are computed on "
            "the model holding all the edits before them (or all together), so the cases form one chain. Run it in "
            "one process (without accelerate launch / torchrun), or use protocol='single', which is shared out.")


def main_process_first(action: Callable[[], T], doing: str) -> T:
    """``action()`` on the main process first, then on the others (e.g. so that only one fills the ``datasets``
    cache); a plain call without a process group of several processes.  Collective: every process calls it.

    Raises:
        StatisticsError: on the other processes, if the main process failed ``doing`` (it re-raises its own
            error).
    """
    group = _process_group()
    if group is None:
        return action()
    result, error = attempt(action) if group.is_main else (None, None)
    group.check_main(error, doing)
    return result if group.is_main else action()  # type: ignore[return-value]


def _prefetch_statistics(edited: EditedModel, method: Any) -> None:
    """Load or compute, on every process together, what the method's editor reads before its first edit.

    Under a process group computing statistics is collective, and editors ask for them lazily, at their first
    edit: once the cases are shared out, a process whose share is empty (or whose first edits fail early) would
    never join in.  So :meth:`EditedModel.prepare` runs first, through the editor that the edits will use.
    """
    edited.prepare(method)


def _edited_model(model: Any, tokenizer: PreTrainedTokenizerBase | None, stats: Any,
                  progress: bool) -> EditedModel:
    if isinstance(model, EditedModel):
        return model
    return EditedModel.from_pretrained(model, tokenizer=tokenizer, stats=stats, progress=progress)


def _describe_model(edited: EditedModel) -> dict[str, Any]:
    base = unwrap_model(edited.model)
    name = str(getattr(base, "name_or_path", "") or "")
    return {"name_or_path": name, "revision": edited.revision, "model_type": base.config.model_type,
            "fingerprint": model_fingerprint(base, edited.revision), "dtype": str(next(base.parameters()).dtype)}


def _environment(edited: EditedModel) -> dict[str, Any]:
    import peft
    import transformers

    return {"hf_edit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "device": str(edited.device)}


class _Run:
    """State of one evaluation run: per-case records, timings and the scoring of each data format."""

    def __init__(self, edited: EditedModel, data: EvalData, generation: GenerationSettings | None, *,
                 batch_size: int, zsre_path: str, progress: bool) -> None:
        self.edited, self.data, self.generation = edited, data, generation
        self.tokenizer = edited.tokenizer
        self.batch_size, self.progress = batch_size, progress
        self.is_zsre = data.data_format == "zsre"
        self.zsre_path_used = zsre.resolve_zsre_path(self.tokenizer, zsre_path) if self.is_zsre else None
        self.base_edits = len(edited.edits)
        limit = max_positions(edited.model)
        self.generation_length = None if generation is None else min(
            generation.max_length, limit if limit is not None else generation.max_length)
        self.method_config: dict[str, Any] | None = None
        self.first_edit: int | None = None  # the case whose edit gave method_config
        self.records: list[dict[str, Any]] = [
            {"case_id": case.case_id, "request": case.request.to_dict()} for case in data.cases]
        self.checkpoints: list[dict[str, Any]] = []
        self.timing: dict[str, float] = {"edit_seconds": 0.0, "score_seconds": 0.0, "generation_seconds": 0.0}
        self.capability: CapabilityProbe | None = None
        self.capability_post: dict[str, float] | None = None

    def capability_result(self) -> dict[str, Any] | None:
        if self.capability is None or self.capability.baseline is None:
            return None
        return {"pre": dict(self.capability.baseline), "post": self.capability_post}

    def measure_capability(self) -> dict[str, float] | None:
        if self.capability is None:
            return None
        started = time.perf_counter()
        result = self.capability.measure(self.edited.model)
        self.timing["capability_seconds"] = self.timing.get("capability_seconds", 0.0) + (
            time.perf_counter() - started)
        return result

    # -- scoring ------------------------------------------------------------------------------------------------
    def score(self, indices: Sequence[int], phase: str, *, row_edits: Mapping[int, list[Edit]] | None = None,
              into_records: bool = True) -> list[dict[str, Any]]:
        """Score the cases at ``indices`` on the model as it is (plus ``row_edits`` applied per case)."""
        cases = [self.data.cases[i] for i in indices]
        model = self.edited.model
        row_cases: list[int] = []
        batch_context = None
        if row_edits:
            local = {pos: row_edits[i] for pos, i in enumerate(indices) if i in row_edits}
            batch_context = _per_row_context(unwrap_model(model), row_cases, local)
        started = time.perf_counter()
        if self.is_zsre:
            scores = self._score_zsre(model, cases, batch_context, row_cases)
        else:
            scores = self._score_counterfact(model, cases, batch_context, row_cases)
        self.timing["score_seconds"] += time.perf_counter() - started
        if into_records:
            for i, score in zip(indices, scores):
                record = self.records[i].setdefault(phase, {})
                metrics = record.get("metrics", {})
                record.update(score)
                record["metrics"] = metrics | score["metrics"]
        return scores

    def _score_counterfact(self, model, cases, batch_context, row_cases) -> list[dict[str, Any]]:
        nlls = cf.counterfact_nlls(model, self.tokenizer, cases, batch_size=self.batch_size,
                                   batch_context=batch_context, row_cases=row_cases)
        return [{"nll": pairs, "metrics": cf.counterfact_case_metrics(pairs)} for pairs in nlls]

    def _score_zsre(self, model, cases, batch_context, row_cases) -> list[dict[str, Any]]:
        correct = zsre.zsre_correct(model, self.tokenizer, cases, path=self.zsre_path_used,
                                    batch_size=self.batch_size, batch_context=batch_context, row_cases=row_cases)
        return [{"correct": flags, "metrics": zsre.zsre_case_metrics(flags)} for flags in correct]

    def generate(self, indices: Sequence[int], phase: str) -> None:
        """Generation tests of the cases at ``indices`` on the model as it is now."""
        if self.generation is None:
            return
        settings, started = self.generation, time.perf_counter()
        prompts = [(i, p) for i in indices for p in self.data.cases[i].generation_prompts]
        if prompts:
            texts = generate_texts(self.edited.model, self.tokenizer, [p for _, p in prompts],
                                   max_length=self.generation_length, top_k=settings.top_k, seed=settings.seed,
                                   batch_size=self.batch_size)
            by_case: dict[int, list[str]] = {}
            for (i, _), text in zip(prompts, texts):
                by_case.setdefault(i, []).append(text)
            for i, case_texts in by_case.items():
                self._record_generation(i, phase, case_texts)
        self.timing["generation_seconds"] += time.perf_counter() - started

    def _record_generation(self, index: int, phase: str, texts: list[str]) -> None:
        settings, case = self.generation, self.data.cases[index]
        assert settings is not None and isinstance(case, CounterFactCase)
        record = self.records[index].setdefault(phase, {})
        record["generation"] = {"texts": texts}
        metrics = record.setdefault("metrics", {})
        metrics["GE"] = generation_entropy(texts, tokenizer=settings.word_tokenizer)
        if settings.snippets is not None and settings.tfidf is not None:
            metrics["RS"] = reference_score(texts, settings.snippets, settings.tfidf, case.relation_id,
                                            case.target_new_id)

    def score_pre(self) -> None:
        for chunk in self._chunks(list(range(len(self.data))), "scoring (pre)"):
            self._score_pre_chunk(chunk)
        self.measure_capability()

    def _score_pre_chunk(self, chunk: list[int]) -> None:
        self.score(chunk, "pre")
        self.generate(chunk, "pre")

    def _chunks(self, indices: list[int], what: str, size: int = _PRE_CHUNK) -> Iterator[list[int]]:
        chunks = [indices[i:i + size] for i in range(0, len(indices), size)]
        yield from tqdm(chunks, desc=what, disable=not self.progress or len(chunks) < 2)

    # -- protocols ----------------------------------------------------------------------------------------------
    def _edit(self, index: int, method: Any) -> list[Edit] | None:
        edits, done = self._edit_group([index], method)
        return edits if done else None

    def _edit_group(self, indices: Sequence[int], method: Any, call: int | None = None) -> tuple[list[Edit], list[int]]:
        """Edit the cases at ``indices`` in one call (a request that fails is skipped and recorded in its case);
        returns the edits made and the cases applied."""
        requests = [self.data.cases[i].request for i in indices]
        started = time.perf_counter()
        try:  # check=False: the metrics say whether each edit took
            result = self.edited.edit(requests[0] if len(indices) == 1 else requests, method=method, check=False,
                                      on_error="raise" if len(indices) == 1 else "skip")
            failures = {indices[s.index]: s.error for s in result.skipped}
        except HfEditError as err:
            result, failures = [], {i: err for i in indices}
        seconds = time.perf_counter() - started
        self.timing["edit_seconds"] += seconds
        shared = {} if call is None else {"call": call, "call_size": len(indices)}
        for i, err in failures.items():
            self._record_failure(i, err, seconds, **shared)
        edits = list(result)
        done = [i for i in indices if i not in failures]
        for i in done:
            mine = [e for e in edits if self.data.cases[i].request in e.requests] or edits
            self._record_success(i, mine, seconds, **shared)
        return edits, done

    def _record_failure(self, index: int, err: HfEditError, seconds: float, **extra: Any) -> None:
        status = "refused" if isinstance(err, _REFUSED) else "failed"
        logger.warning("Edit of case %s %s: %s", self.data.cases[index].case_id, status, err)
        message = _without_request_prefix(err)  # the record is the case's: its position in a call says nothing
        self.records[index]["edit"] = {"ok": False, "status": status, "error_type": type(err).__name__,
                                       "message": message, "error": f"{type(err).__name__}: {message}",
                                       "seconds": seconds, **extra}

    def _record_success(self, index: int, edits: list[Edit], seconds: float, **extra: Any) -> None:
        if edits and (self.first_edit is None or index < self.first_edit):
            self.method_config, self.first_edit = edits[0].config, index
        self.records[index]["edit"] = {"ok": True, "seconds": seconds, **extra, "modules": [e.module for e in edits],
                                       "info": _edit_summary(edits)}

    def _remove(self, edits: list[Edit]) -> None:
        """Remove ``edits`` (removing one edit removes its whole batch)."""
        for edit in reversed(edits):
            index = next((i for i, e in enumerate(self.edited.edits) if e is edit), None)
            if index is not None:
                self.edited.remove_edit(index)

    def single(self, method: Any, cases_per_batch: int) -> None:
        indices = list(range(len(self.data)))
        bar = tqdm(total=len(indices), desc="editing (single)", disable=not self.progress)
        for start in range(0, len(indices), cases_per_batch):
            self._single_chunk(indices[start:start + cases_per_batch], method, bar)
        bar.close()

    def _single_chunk(self, chunk: list[int], method: Any, bar: Any) -> None:
        """Edit each case of ``chunk`` alone (generation tests with its edit), then score them all together.

        Without generation tests the chunk's edits are computed together (:meth:`EditedModel.preview_edits`: ROME
        batches the v* optimisations of independent cases), never applied to the model, and scored per row."""
        applied: dict[int, list[Edit]] = {}
        if self.generation is None:
            started = time.perf_counter()
            previews = self.edited.preview_edits([self.data.cases[i].request for i in chunk], method=method)
            seconds = (time.perf_counter() - started) / len(chunk)
            self.timing["edit_seconds"] += seconds * len(chunk)
            for i, preview in zip(chunk, previews):
                if isinstance(preview, HfEditError):
                    self._record_failure(i, preview, seconds)
                else:
                    self._record_success(i, preview, seconds)
                    applied[i] = preview
                bar.update()
            if applied:
                self.score(list(applied), "post", row_edits=applied)
            return
        for i in chunk:
            edits = self._edit(i, method)
            if edits is not None:
                self.generate([i], "post")
                self._remove(edits)
                applied[i] = edits
            bar.update()
        if applied:
            self.score(list(applied), "post", row_edits=applied)

    def shared(self, method: Any, cases_per_batch: int, group: ProcessGroup) -> None:
        """The single protocol (or pre-edit scoring only, for ``method=None``) shared out across ``group``.

        The units of work are the chunks a single process runs (pre-edit scoring chunks, then post-edit batches of
        ``cases_per_batch`` cases), so every case is scored in the same batch as there; unit ``u`` of the
        concatenated list goes to process ``u mod size``.  Then the records are gathered on every process.
        """
        everything = list(range(len(self.data)))
        pre = [everything[i:i + _PRE_CHUNK] for i in range(0, len(everything), _PRE_CHUNK)]
        post = [] if method is None else [everything[i:i + cases_per_batch]
                                          for i in range(0, len(everything), cases_per_batch)]
        mine_pre = [chunk for u, chunk in enumerate(pre) if group.owns(u)]
        mine_post = [chunk for u, chunk in enumerate(post, start=len(pre)) if group.owns(u)]
        bar = tqdm(total=sum(map(len, mine_post)), desc=f"editing (single, process {group.rank} of {group.size})",
                   disable=not self.progress or method is None)

        def work() -> None:
            for chunk in mine_pre:
                self._score_pre_chunk(chunk)
            for chunk in mine_post:
                self._single_chunk(chunk, method, bar)

        _, error = attempt(work)
        bar.close()
        mine = [i for chunk in mine_pre + mine_post for i in chunk]
        share = None if error is not None else self._share(sorted(set(mine)))
        gathered: list[Any] = [None] * group.size
        dist.all_gather_object(gathered, (None if error is None else f"{type(error).__name__}: {error}", share))
        if error is not None:
            raise error
        failed = [(rank, message) for rank, (message, _) in enumerate(gathered) if message is not None]
        if failed:
            rank, message = failed[0]
            raise HfEditError(f"Process {rank} of {group.size} failed while evaluating its share of the cases "
                              f"({message}); there is no result.")
        self._merge([part for _, part in gathered])

    def _share(self, indices: list[int]) -> dict[str, Any]:
        """What this process found: the phases of its cases, its timings and the first edit's config."""
        base = {"case_id", "request"}
        return {"records": {i: {k: v for k, v in self.records[i].items() if k not in base} for i in indices},
                "timing": dict(self.timing), "first_edit": self.first_edit, "method_config": self.method_config}

    def _merge(self, shares: list[dict[str, Any]]) -> None:
        """Every process's findings, in case order and in the order a single process records the phases."""
        parts: dict[int, list[dict[str, Any]]] = {}
        for share in shares:
            for index, part in share["records"].items():
                parts.setdefault(int(index), []).append(part)
        for index, record in enumerate(self.records):
            found = parts.get(index, [])
            record.clear()
            record.update({"case_id": self.data.cases[index].case_id,
                           "request": self.data.cases[index].request.to_dict()})
            for key in ("pre", "edit", "post"):
                for part in found:
                    if key in part:
                        record[key] = part[key]
        self.timing = {key: sum(share["timing"].get(key, 0.0) for share in shares) for key in self.timing}
        firsts = [share for share in shares if share["first_edit"] is not None]
        if firsts:
            first = min(firsts, key=lambda share: share["first_edit"])
            self.first_edit, self.method_config = first["first_edit"], first["method_config"]

    def sequential(self, method: Any, every: int | None, *, edit_batch_size: int = 1,
                   what: str = "sequential") -> None:
        """Calls of ``edit_batch_size`` cases one after another, each on the model edited so far (the batch
        protocol: one call of every case); then every case scored, the capability measured, and the edits
        removed."""
        made: list[Edit] = []
        done: list[int] = []
        n = len(self.data)
        bar = tqdm(total=n, desc=f"editing ({what})", disable=not self.progress)
        try:
            for call, start in enumerate(range(0, n, edit_batch_size)):
                group = list(range(start, min(start + edit_batch_size, n)))
                edits, applied = self._edit_group(group, method, call=None if edit_batch_size == 1 else call)
                made += edits
                done += applied
                bar.update(len(group))
                if every and (start + len(group)) % every == 0 and start + len(group) < n:
                    self._checkpoint(start + len(group), done)
            bar.close()
            for chunk in self._chunks(done, "scoring (post)"):
                self.score(chunk, "post")
                self.generate(chunk, "post")
            self.capability_post = self.measure_capability()
            if every:
                self._checkpoint(n, done, capability=self.capability_post)
        finally:
            bar.close()
            self._remove(made)

    def _checkpoint(self, edits_made: int, done: list[int], capability: dict[str, float] | None = None) -> None:
        scores = []
        for chunk in self._chunks(list(done), f"scoring after {edits_made} edits"):
            scores += self.score(chunk, "", into_records=False)
        point = {"edits": edits_made, "successful_edits": len(done),
                 "summary": self._summarize([s["metrics"] for s in scores])}
        capability = capability if capability is not None else self.measure_capability()
        if capability is not None:
            point["capability"] = capability
        self.checkpoints.append(point)

    def _summarize(self, metrics: list[dict[str, float]]) -> dict[str, dict[str, float]]:
        if not metrics:
            return {}
        if self.is_zsre:
            return zsre.summarize_zsre(metrics)
        return cf.summarize(metrics)

    def summaries(self) -> dict[str, dict[str, dict[str, float]]]:
        out = {}
        for phase in ("pre", "post"):
            metrics = [r[phase]["metrics"] for r in self.records if phase in r and "metrics" in r[phase]]
            if metrics:
                out[phase] = self._summarize(metrics)
        return out


def _without_request_prefix(err: HfEditError) -> str:
    """The error's message without the ``Request i (subject -> target): `` prefix that ``edit`` puts on it."""
    text, request = str(err), getattr(err, "request", None)
    if request is not None:
        prefix = f"Request {getattr(err, 'request_index', '')} ({request.subject!r} -> {request.target_new!r}): "
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _edit_summary(edits: list[Edit]) -> dict[str, Any]:
    """The scalar diagnostics of each edited module (whatever the method reports)."""
    return {e.module: {k: v for k, v in e.info.items() if isinstance(v, (bool, int, float, str)) or v is None}
            for e in edits}


# -- per-row edits ------------------------------------------------------------------------------------------------
def _per_row_context(model: nn.Module, row_cases: list[int], case_edits: Mapping[int, list[Edit]]
                     ) -> Callable[[list[int]], Any]:
    """A ``batch_context`` for the scorers: each row gets the edits of its own case, through forward hooks on the
    edited modules that add ``(x Aᵀ) Bᵀ (+ bias)`` to that row's output, exactly as its LoRA adapter would."""
    modules = {e.module for edits in case_edits.values() for e in edits}

    @contextmanager
    def context(batch_rows: list[int]) -> Iterator[None]:
        row_factors: dict[str, list[tuple[int, LoraFactors]]] = {m: [] for m in modules}
        for position, row in enumerate(batch_rows):
            for edit in case_edits.get(row_cases[row], ()):
                row_factors[edit.module].append((position, edit.factors))
        with ExitStack() as stack:
            for name, factors in row_factors.items():
                if factors:
                    stack.enter_context(_add_row_deltas(model.get_submodule(name), factors, len(batch_rows)))
            yield

    return context


@contextmanager
def _add_row_deltas(module: nn.Module, row_factors: list[tuple[int, LoraFactors]], batch: int) -> Iterator[None]:
    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        seq = x.numel() // (batch * x.shape[-1])
        inputs, out = as_batch_seq(x, (batch, seq)), as_batch_seq(output, (batch, seq)).clone()
        for row, f in row_factors:
            A, B = f.A.to(inputs.device), f.B.to(inputs.device)
            delta = (inputs[row].to(A.dtype) @ A.T) @ B.T
            if f.bias is not None:
                delta = delta + f.bias.to(delta.device, delta.dtype)
            out[row] = out[row] + delta.to(out.dtype)
        return out.reshape(output.shape)

    with forward_hook(module, hook):
        yield
