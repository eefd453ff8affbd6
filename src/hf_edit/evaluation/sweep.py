"""Score a grid of hyperparameter settings on one data set and rank them: :func:`sweep` → :class:`SweepResult`.

Every setting is evaluated with :func:`~hf_edit.evaluation.evaluate_model` on the same model object and the same
cases (the single protocol batches the post-edit scoring across cases), so each row of the table is exactly what
an individual ``evaluate_model`` run with that config gives.  Build a grid with :func:`config_grid`::

    from hf_edit import ROMEConfig
    from hf_edit.evaluation import config_grid, load_eval_data, sweep

    dev = load_eval_data("counterfact-subset.json", n=100)
    grid = config_grid(ROMEConfig(mom2_dataset="wikitext-2-raw/", mom2_n_samples=2000),
                       {"layers": [0, 1, 2], "v_lr": [0.5, 1.0]})
    result = sweep("path/to/model", dev, grid)
    print(result.table())          # ranked by S, with ES/PS/NS ± stderr, cases/s and cases behind each number
    result.best.config             # the winner's resolved hyperparameters
    result.to_json("sweep.json")

Edits that fail (e.g. a guard's :class:`~hf_edit.errors.DisablingEditError`) are left out of the runner's summary;
:func:`sweep` records how many there were, and with ``failed="unedited"`` scores such cases as the unedited model
scores them (what a user who asked for the edit actually gets), so a setting cannot rank high by failing its hard
cases.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from ..errors import ConfigError
from ..methods.base import EditConfig
from ..methods.registry import MethodSpec, get_method, resolve_config
from . import counterfact as cf
from . import zsre
from .data import EvalData, load_eval_data
from .runner import EvaluationResult, Protocol, evaluate_model

__all__ = ["SWEEP_FORMAT", "SweepEntry", "SweepResult", "config_grid", "parse_grid_values", "setting_name", "sweep"]

SWEEP_FORMAT = "hf_edit.sweep.v1"
FailedPolicy = Literal["exclude", "unedited"]

#: Metrics shown in the table for each data format (the headline score first).
_TABLE_METRICS = {"counterfact": ("S", "ES", "PS", "NS"), "zsre": ("score", "rewrite_acc", "paraphrase_acc",
                                                                    "neighborhood_acc")}
#: Bootstrap resamples for the headline score's standard error.
_BOOTSTRAP = 1000


@dataclass
class SweepEntry:
    """One setting of a sweep and its scores.

    Attributes:
        name: the setting's label (e.g. ``"layers=0 v_lr=0.5"``).
        config: the resolved hyperparameters of the edits (``EditConfig.to_dict()``; ``layers`` filled in).
        overrides: the values that distinguish this setting (the grid point, or the fields that differ between
            the configs of a list).
        summary: post-edit summary ``{metric: {mean, stderr, n, ...}}`` ×100, under the sweep's ``failed``
            policy: with ``"exclude"`` it is the runner's summary (failed edits left out); with ``"unedited"``
            failed cases are scored as before the edit.  The headline score (S / score) gets a bootstrap
            ``stderr``.
        pre: the unedited model's summary on the same cases.
        n_cases: cases evaluated.
        n_failed: cases whose edit failed (their errors are in ``errors``).
        seconds: wall time of the evaluation (editing and scoring).
        cases_per_second: ``n_cases / seconds``.
        diagnostics: the mean, over successful edits and edited modules, of every numeric value the method
            records in its edits' ``info`` (booleans as fractions; e.g. ROME's ``clamped``, ``v_steps``,
            ``target_probability``, ``relative_norm``).
        errors: ``{error type: count}`` of the failed edits.
        result: the full :class:`~hf_edit.evaluation.EvaluationResult` (kept in memory, not serialised).
    """

    name: str
    config: dict[str, Any] | None
    overrides: dict[str, Any]
    summary: dict[str, dict[str, float]]
    pre: dict[str, dict[str, float]]
    n_cases: int
    n_failed: int
    seconds: float
    cases_per_second: float
    diagnostics: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    result: EvaluationResult | None = field(default=None, compare=False, repr=False)

    def score(self, metric: str) -> float:
        """The mean of ``metric`` (×100), NaN when absent."""
        value = self.summary.get(metric)
        return float(value["mean"]) if value else math.nan

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (without the full result)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "result"}


@dataclass
class SweepResult:
    """The settings of a sweep, their scores and the ranking.

    Attributes:
        entries: the settings in the order they were given.
        rank_by: the metric the ranking sorts by (descending; NaN last).
        metrics: the metrics the table shows.
        failed: how failed edits were scored (``"exclude"`` or ``"unedited"``).
        protocol: the evaluation protocol.
        method: the registry name of the method(s) swept.
        model: name, revision and fingerprint of the model.
        data: source, format, fingerprint and size of the cases.
    """

    entries: list[SweepEntry]
    rank_by: str
    metrics: tuple[str, ...]
    failed: str
    protocol: str
    method: str
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def ranked(self) -> list[SweepEntry]:
        """The entries, best first (by :attr:`rank_by`; ties keep the given order; NaN last)."""
        order = sorted(range(len(self.entries)), key=lambda i: (
            math.isnan(self.entries[i].score(self.rank_by)), -_nan_to(self.entries[i].score(self.rank_by)), i))
        return [self.entries[i] for i in order]

    @property
    def best(self) -> SweepEntry:
        """The best-ranked entry."""
        if not self.entries:
            raise ConfigError("The sweep has no entries.")
        return self.ranked()[0]

    def __getitem__(self, name: str) -> SweepEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def rows(self) -> list[list[str]]:
        """The ranked table's cells (header first): rank, setting, each metric (mean ± stderr), cases behind the
        numbers (successful edits / cases), failed edits, cases/s."""
        header = ["#", "setting", *self.metrics, "n", "failed", "cases/s"]
        rows = [header]
        for rank, entry in enumerate(self.ranked(), 1):
            n_scored = min((int(entry.summary[m]["n"]) for m in self.metrics if m in entry.summary), default=0)
            rows.append([str(rank), entry.name, *(_cell(entry.summary.get(m)) for m in self.metrics),
                         f"{n_scored}/{entry.n_cases}", str(entry.n_failed), f"{entry.cases_per_second:.3f}"])
        return rows

    def table(self) -> str:
        """The ranked table as aligned text, with a title line (method, protocol, data, ranking)."""
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in rows]
        title = (f"sweep · {self.method} · protocol={self.protocol} · {self.data.get('format')} "
                 f"n={self.data.get('n')} · ranked by {self.rank_by} (mean ± stderr ×100; failed edits "
                 f"{'scored as unedited' if self.failed == 'unedited' else 'left out'})")
        return "\n".join([title, *lines])

    def markdown(self) -> str:
        """The ranked table as a Markdown table."""
        rows = self.rows()
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN as ``null``); :meth:`from_dict` reads it back."""
        return _json_safe({"format": SWEEP_FORMAT, "rank_by": self.rank_by, "metrics": list(self.metrics),
                           "failed": self.failed, "protocol": self.protocol, "method": self.method,
                           "model": self.model, "data": self.data,
                           "ranking": [e.name for e in self.ranked()],
                           "entries": [e.to_dict() for e in self.entries]})

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The result as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return text

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SweepResult:
        """Inverse of :meth:`to_dict` (entries without their full results)."""
        if values.get("format") != SWEEP_FORMAT:
            raise ConfigError(f"Not an hf_edit sweep result ({SWEEP_FORMAT}).")
        names = {f.name for f in dataclasses.fields(SweepEntry)} - {"result"}
        entries = [SweepEntry(**{k: _none_to_nan(v) if k in ("seconds", "cases_per_second") else v
                                 for k, v in e.items() if k in names}) for e in values["entries"]]
        return cls(entries=entries, rank_by=values["rank_by"], metrics=tuple(values["metrics"]),
                   failed=values["failed"], protocol=values["protocol"], method=values["method"],
                   model=dict(values.get("model", {})), data=dict(values.get("data", {})))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SweepResult:
        """Read a file written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _nan_to(value: float, default: float = 0.0) -> float:
    return default if math.isnan(value) else value


def _none_to_nan(value: Any) -> Any:
    return math.nan if value is None else value


def _cell(value: Mapping[str, float] | None) -> str:
    if not value:
        return "-"
    text = f"{value['mean']:.1f}"
    if value.get("stderr") is not None and not math.isnan(value["stderr"]):
        text += f" ± {value['stderr']:.1f}"
    return text


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- grids --------------------------------------------------------------------------------------------------------
def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_name(overrides: Mapping[str, Any]) -> str:
    """``"key=value key=value"`` for a grid point (``"default"`` when empty)."""
    return " ".join(f"{k}={_format_value(v)}" for k, v in overrides.items()) or "default"


def config_grid(base: EditConfig | str, grid: Mapping[str, Sequence[Any]]) -> dict[str, EditConfig]:
    """Every combination of ``grid``'s values applied to ``base`` (the first key varies slowest).

    Args:
        base: the config the grid points override, or a method name (its defaults).
        grid: ``{field: [values...]}``, e.g. ``{"layers": [0, 1, 2], "v_lr": [0.5, 1.0]}``; an int for
            ``layers`` means that one layer.

    Returns:
        ``{"layers=0 v_lr=0.5": config, ...}`` in grid order.

    Raises:
        ConfigError: an unknown field, an empty list of values, or a value the config rejects.
    """
    if isinstance(base, str):
        base = get_method(base).config_class()
    if not isinstance(base, EditConfig):
        raise ConfigError(f"base must be a config object or a method name, got {type(base).__name__}.")
    names = {f.name for f in dataclasses.fields(base)}
    for key, values in grid.items():
        if key not in names:
            raise ConfigError(f"Unknown {type(base).__name__} field {key!r} in the grid; known: {sorted(names)}.")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ConfigError(f"The grid's {key!r} needs a non-empty list of values, got {values!r}.")
    keys = list(grid)
    configs: dict[str, EditConfig] = {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        overrides = dict(zip(keys, combo))
        try:
            config = dataclasses.replace(base, **overrides)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Grid point {setting_name(overrides)}: {err}") from err
        configs[setting_name(overrides)] = config
    return configs


def parse_grid_values(text: str) -> list[Any]:
    """``"0,1,2"`` → ``[0, 1, 2]``; each comma-separated item is read as JSON when it can be (numbers, true/false,
    null, quoted strings), else kept as a string.  A whole JSON list (``'[[0,1],[2]]'``) is read as the values."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ConfigError(f"Cannot read grid values {text!r} as a JSON list: {err}") from err
        if not isinstance(values, list) or not values:
            raise ConfigError(f"Grid values must be a non-empty list, got {text!r}.")
        return values
    out = []
    for item in stripped.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"Empty value in grid values {text!r}.")
        try:
            out.append(json.loads(item))
        except json.JSONDecodeError:
            out.append(item)
    return out


def _named_configs(configs: Mapping[str, MethodSpec] | Sequence[MethodSpec], model_id: str | None
                   ) -> list[tuple[str, EditConfig, dict[str, Any]]]:
    """(name, config, overrides) for every setting; a list's names come from the fields that differ."""
    if isinstance(configs, Mapping):
        resolved = [(str(k), resolve_config(v, model_id)) for k, v in configs.items()]
    elif isinstance(configs, Sequence) and not isinstance(configs, (str, bytes)):
        resolved = [(None, resolve_config(v, model_id)) for v in configs]
    else:
        raise ConfigError(f"configs must be a dict of name -> config or a list of configs, got "
                          f"{type(configs).__name__}.")
    if not resolved:
        raise ConfigError("The sweep needs at least one config.")
    dicts = [c.to_dict() for _, c in resolved]
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    varying = [k for k in keys if len({json.dumps(d.get(k), sort_keys=True, default=str) for d in dicts}) > 1]
    out, seen = [], set()
    for i, ((name, config), values) in enumerate(zip(resolved, dicts)):
        overrides = {k: values.get(k) for k in varying}
        label = name if name is not None else setting_name(overrides)
        if label in seen:
            label = f"{label} #{i}"
        seen.add(label)
        out.append((label, config, overrides))
    return out


# -- the sweep ----------------------------------------------------------------------------------------------------
def _diagnostics(result: EvaluationResult) -> tuple[dict[str, float], dict[str, int]]:
    sums: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    for record in result.cases:
        edit = record.get("edit") or {}
        if not edit.get("ok", False):
            if edit:
                kind = str(edit.get("error", "error")).split(":", 1)[0]
                errors[kind] = errors.get(kind, 0) + 1
            continue
        for info in (edit.get("info") or {}).values():
            for key, value in info.items():
                if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
                    sums.setdefault(key, []).append(float(value))
    return {k: float(np.mean(v)) for k, v in sums.items()}, errors


def _case_metrics(result: EvaluationResult, failed: FailedPolicy) -> list[dict[str, float]]:
    metrics = []
    for record in result.cases:
        if "metrics" in record.get("post", {}):
            metrics.append(record["post"]["metrics"])
        elif failed == "unedited" and "metrics" in record.get("pre", {}):
            metrics.append(record["pre"]["metrics"])
    return metrics


def _summary(result: EvaluationResult, failed: FailedPolicy, is_zsre: bool) -> dict[str, dict[str, float]]:
    if failed == "exclude":
        summary = {k: dict(v) for k, v in result.summary.get("post", {}).items()}
        metrics = _case_metrics(result, "exclude")
    else:
        metrics = _case_metrics(result, "unedited")
        summary = (zsre.summarize_zsre(metrics) if is_zsre else cf.summarize(metrics)) if metrics else {}
    headline, parts = (("score", ("rewrite_acc", "paraphrase_acc", "neighborhood_acc")) if is_zsre
                       else ("S", ("ES", "PS", "NS")))
    if headline in summary and len(metrics) > 1:
        summary[headline]["stderr"] = _bootstrap_stderr(metrics, parts, is_zsre)
    return summary


def _bootstrap_stderr(metrics: list[dict[str, float]], parts: Sequence[str], is_zsre: bool) -> float:
    """Bootstrap standard error (×100) of the headline score (a harmonic or arithmetic mean of the parts' means)
    over cases; seeded, so a sweep is reproducible."""
    from .aggregate import harmonic_mean

    values = np.array([[m.get(p, math.nan) for p in parts] for m in metrics], dtype=np.float64)
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(_BOOTSTRAP):
        sample = values[rng.integers(0, len(values), len(values))]
        means = [float(np.nanmean(sample[:, j])) if not np.isnan(sample[:, j]).all() else math.nan
                 for j in range(len(parts))]
        scores.append(float(np.mean(means)) if is_zsre else harmonic_mean(means))
    finite = [s for s in scores if not math.isnan(s)]
    return 100 * float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def sweep(model: Any, data: EvalData | str | os.PathLike,
          configs: Mapping[str, MethodSpec] | Sequence[MethodSpec], *, n: int | None = None,
          protocol: Protocol = "single", tokenizer: Any = None, stats: Any = None, batch_size: int = 64,
          cases_per_batch: int = 16, rank_by: str | None = None, failed: FailedPolicy = "exclude",
          keep_results: bool = True, progress: bool = True, print_table: bool | None = None) -> SweepResult:
    """Evaluate every config on the same cases and rank them.

    Args:
        model: an :class:`~hf_edit.EditedModel`, a transformers causal LM (with ``tokenizer``) or a model id /
            path; loaded once and reused for every setting (the model is left as it was given).
        data: :class:`~hf_edit.evaluation.EvalData` or anything :func:`~hf_edit.evaluation.load_eval_data`
            accepts (e.g. a dev split: ``EvalData(cases=data.cases[:450], ...)``).
        configs: ``{name: config}`` (e.g. from :func:`config_grid`) or a list of configs (named by the fields in
            which they differ).  A config is an ``EditConfig``, a method name or a dict with a ``"method"`` key.
        n: evaluate the first ``n`` cases.
        protocol: ``"single"`` (each case edited alone, batched scoring) or ``"sequential"``.
        tokenizer, stats, batch_size, cases_per_batch: as for :func:`~hf_edit.evaluation.evaluate_model`.
        rank_by: metric to rank by; default the headline score (``"S"`` on CounterFact, ``"score"`` on zsRE).
        failed: ``"exclude"`` (the runner's summary: failed edits left out; the ``n`` column shows how many
            cases are behind the numbers) or ``"unedited"`` (failed cases scored as the unedited model).
        keep_results: keep each setting's full :class:`~hf_edit.evaluation.EvaluationResult` in its entry.
        progress: show progress bars and one line per finished setting (stderr).
        print_table: print the ranked table at the end (stdout); default: as ``progress``.

    Returns:
        A :class:`SweepResult`.

    Raises:
        ConfigError: no configs, an unknown ``failed`` policy, or a config the registry cannot resolve.
    """
    from ..edited_model import EditedModel

    if failed not in ("exclude", "unedited"):
        raise ConfigError(f"failed must be 'exclude' or 'unedited', got {failed!r}.")
    if not isinstance(data, EvalData):
        data = load_eval_data(data, n=n)
    elif n is not None:
        data = EvalData(cases=data.cases[:n], data_format=data.data_format, source=data.source,
                        fingerprint=data.fingerprint, n_total=data.n_total)
    if not isinstance(model, EditedModel):
        model = EditedModel.from_pretrained(model, tokenizer=tokenizer, stats=stats, progress=progress)
    model_id = getattr(model.base_model, "name_or_path", None)
    settings = _named_configs(configs, model_id)
    is_zsre = data.data_format == "zsre"
    metrics = _TABLE_METRICS["zsre" if is_zsre else "counterfact"]
    rank_by = rank_by or metrics[0]
    entries: list[SweepEntry] = []
    result: EvaluationResult | None = None
    for index, (name, config, overrides) in enumerate(settings, 1):
        started = time.perf_counter()
        result = evaluate_model(model, data, method=config, protocol=protocol, batch_size=batch_size,
                                cases_per_batch=cases_per_batch, progress=progress)
        seconds = time.perf_counter() - started
        diagnostics, errors = _diagnostics(result)
        entry = SweepEntry(
            name=name, config=result.method_config or _resolved_dict(config, model.model), overrides=overrides,
            summary=_summary(result, failed, is_zsre), pre={k: dict(v) for k, v in result.summary.get("pre", {}).items()},
            n_cases=len(data), n_failed=sum(errors.values()), seconds=seconds,
            cases_per_second=len(data) / seconds if seconds > 0 else math.nan, diagnostics=diagnostics,
            errors=errors, result=result if keep_results else None)
        entries.append(entry)
        if progress:
            scores = "  ".join(f"{m} {_cell(entry.summary.get(m))}" for m in metrics)
            print(f"[{index}/{len(settings)}] {name}: {scores}  failed {entry.n_failed}/{entry.n_cases}  "
                  f"{entry.cases_per_second:.3f} cases/s", file=sys.stderr, flush=True)
    method_names = list(dict.fromkeys(c.name for _, c, _ in settings))
    out = SweepResult(entries=entries, rank_by=rank_by, metrics=metrics, failed=failed, protocol=protocol,
                      method=",".join(method_names), model=dict(result.model) if result else {}, data=data.describe())
    if progress if print_table is None else print_table:
        print(out.table(), flush=True)
    return out


def _resolved_dict(config: EditConfig, model: nn.Module) -> dict[str, Any]:
    try:
        return config.resolved_for(model).to_dict()
    except Exception:  # noqa: BLE001 - only for the record
        return config.to_dict()
