"""Evaluation data: CounterFact (ROME format and EasyEdit's reduced format) and zsRE (ROME/MEND format).

Every file or Hub source is read through ``datasets`` with explicit ``Features`` (so an all-empty list or a
mixed-type id cannot silently change the schema) and converted to cases: an :class:`~hf_edit.EditRequest` plus the
prompts each metric needs.  Sources: a local JSON/JSONL file, a URL, a Hub dataset id (``"owner/name"``, optional
``split`` and ``revision``), an in-memory ``datasets.Dataset``, or plain record dicts (one or a list), which
:func:`case_from_record` turns into cases directly and which need only the fields the metrics read; the names
``"counterfact"`` and ``"zsre"`` mean the reference's original files (downloaded from the ROME project site, as the
reference does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import DatasetFormatError, InvalidRequestError
from ..files import file_sha256, looks_like_local_path
from ..requests import PLACEHOLDER, EditRequest

if TYPE_CHECKING:
    import datasets

__all__ = ["CounterFactCase", "ZsRECase", "EvalData", "load_eval_data", "load_counterfact", "load_zsre",
           "case_from_record", "DATA_ALIASES", "FORMATS"]

logger = logging.getLogger(__name__)

#: Named data sets: the reference implementation's own files.
DATA_ALIASES = {
    "counterfact": "https://rome.baulab.info/data/dsets/counterfact.json",
    "zsre": "https://rome.baulab.info/data/dsets/zsre_mem_eval.json",
}

#: ``"counterfact"`` (ROME's full records), ``"counterfact-easyedit"`` (reduced: one paraphrase, one neighbour,
#: no attribute or generation prompts; its PS/NS are not the paper's) and ``"zsre"`` (ROME/MEND records).
FORMATS = ("counterfact", "counterfact-easyedit", "zsre")
Format = Literal["counterfact", "counterfact-easyedit", "zsre"]

#: Keys that identify each format (all must be present).
_FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "counterfact": ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"),
    "counterfact-easyedit": ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                             "locality_prompt"),
    "zsre": ("subject", "src", "rephrase", "answers", "loc", "loc_ans"),
}


def _features(data_format: str) -> datasets.Features:
    from datasets import Features, List, Value

    text = Value("string")
    if data_format == "counterfact":
        target = {"str": text, "id": text}
        return Features({
            "case_id": Value("int64"), "pararel_idx": Value("int64"),
            "requested_rewrite": {"prompt": text, "relation_id": text, "subject": text, "target_new": target,
                                  "target_true": target},
            "paraphrase_prompts": List(text), "neighborhood_prompts": List(text),
            "attribute_prompts": List(text), "generation_prompts": List(text)})
    if data_format == "counterfact-easyedit":
        return Features({"case_id": Value("int64")} | {k: text for k in (
            "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
            "locality_ground_truth")})
    return Features({k: text for k in ("subject", "src", "pred", "rephrase", "alt", "loc", "loc_ans", "cond")}
                    | {"answers": List(text)})


@dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact record: the edit and the prompts its metrics read.

    Attributes:
        request: the rewrite (``case_id``, ``target_true`` set).
        paraphrase_prompts: prompts that paraphrase the rewrite (PS/PM).
        neighborhood_prompts: other subjects whose object is ``target_true`` (NS/NM).
        attribute_prompts: subjects whose object is ``target_new`` (scored, never aggregated).
        generation_prompts: prompts for the generation tests (GE, RS).
        relation_id, target_new_id, target_true_id: Wikidata ids (RS looks snippets up by them).
        data_format: ``"counterfact"`` or ``"counterfact-easyedit"``.
    """

    request: EditRequest
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    data_format: str = "counterfact"

    @property
    def case_id(self) -> int | str | None:
        return self.request.case_id

    def prompts(self) -> dict[str, tuple[str, ...]]:
        """The prefixes of the probability test, by kind (rewrite, paraphrase, neighborhood, attribute)."""
        return {"rewrite": (self.request.filled_prompt,), "paraphrase": self.paraphrase_prompts,
                "neighborhood": self.neighborhood_prompts, "attribute": self.attribute_prompts}


@dataclass(frozen=True)
class ZsRECase:
    """One zsRE record.

    Attributes:
        request: the edit; ``target_new`` is ``answers[0]`` (the reference inserts the *correct* answer) or
            ``alt`` (EasyEdit's choice), as chosen when loading.
        paraphrase_prompts: ``[rephrase]``.
        neighborhood_question: the unrelated NQ question ``loc`` (contains ``"nq question: "``).
        neighborhood_answer: its answer ``loc_ans``.
        target_field: ``"answers"`` or ``"alt"``.
        metadata: the record's remaining fields (``pred``, ``alt``, ``answers``, ``cond``).
    """

    request: EditRequest
    paraphrase_prompts: tuple[str, ...]
    neighborhood_question: str
    neighborhood_answer: str
    target_field: str = "answers"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def case_id(self) -> int | str | None:
        return self.request.case_id


Case = CounterFactCase | ZsRECase


@dataclass(frozen=True)
class EvalData:
    """Loaded cases plus where they came from.

    Attributes:
        cases: the cases, in file order (truncated to the first ``n``).
        data_format: one of :data:`FORMATS`.
        source: what was loaded (path, URL, Hub id).
        fingerprint: sha256 of the file, or Hub id/revision/split plus the ``datasets`` fingerprint.
        n_total: records in the source before truncation.
    """

    cases: tuple[Case, ...]
    data_format: str
    source: str
    fingerprint: str
    n_total: int

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self):
        return iter(self.cases)

    def describe(self) -> dict[str, Any]:
        """What a result file records about the data."""
        return {"source": self.source, "format": self.data_format, "fingerprint": self.fingerprint,
                "n": len(self.cases), "n_total": self.n_total}


RecordLike = Mapping[str, Any] | CounterFactCase | ZsRECase
EvalSource = str | os.PathLike | RecordLike | Sequence[RecordLike]


def load_eval_data(source: EvalSource | datasets.Dataset, *, data_format: Format | None = None,
                   n: int | None = None, split: str = "train", revision: str | None = None,
                   zsre_target: Literal["answers", "alt"] = "answers") -> EvalData:
    """Load an evaluation data set and convert it to cases.

    Args:
        source: a local JSON/JSONL file, a URL, a Hub dataset id, ``"counterfact"``/``"zsre"`` (the reference's
            files), a ``datasets.Dataset``, or plain records: one dict or a list of dicts (each needs only the
            fields the metrics read, see :func:`case_from_record`; cases are accepted too).
        data_format: one of :data:`FORMATS`; detected from the columns (or each record's keys) when omitted.
        n: keep the first ``n`` records (the reference's ``--dataset_size_limit``).  If the source holds fewer, all
            of them are kept and a ``UserWarning`` (and a log line) says how many there are.
        split, revision: for Hub datasets.
        zsre_target: zsRE's edit target: ``"answers"`` (``answers[0]``, the reference) or ``"alt"`` (EasyEdit).

    Raises:
        DatasetFormatError: the source cannot be read, or its records match no supported format (for plain
            records: the message names the record and the missing or malformed field).
    """
    if n is not None and n < 1:
        raise DatasetFormatError(f"n must be a positive number of records, got {n}.")
    if zsre_target not in ("answers", "alt"):
        raise DatasetFormatError(f"zsre_target must be 'answers' or 'alt', got {zsre_target!r}.")
    records = _as_records(source)
    if records is not None:
        return _from_records(records, data_format=data_format, n=n, zsre_target=zsre_target)
    raw, described, fingerprint, files = _read(source, split=split, revision=revision)
    detected = data_format or _detect_format(raw.column_names, described)
    if detected not in FORMATS:
        raise DatasetFormatError(f"Unknown data format {detected!r}; expected one of {FORMATS}.")
    missing = [k for k in _FORMAT_KEYS[detected] if k not in raw.column_names]
    if missing:
        raise DatasetFormatError(f"{described} lacks the {detected} fields {missing} (it has {raw.column_names}).")
    ds = _with_features(raw, detected, described, files)
    n_total = len(ds)
    if n is not None:
        warn_if_fewer(n, n_total, described)
        ds = ds.select(range(min(n, n_total)))
    convert = {"counterfact": _counterfact_case, "counterfact-easyedit": _easyedit_case,
               "zsre": lambda r, i: _zsre_case(r, i, zsre_target)}[detected]
    cases = []
    for index, record in enumerate(ds):
        try:
            cases.append(convert(record, index))
        except InvalidRequestError as err:
            raise DatasetFormatError(f"Record {index} of {described} is not a valid edit: {err}") from err
    return EvalData(cases=tuple(cases), data_format=detected, source=described, fingerprint=fingerprint,
                    n_total=n_total)


def warn_if_fewer(n: int, n_total: int, described: str) -> None:
    """Warn (``UserWarning`` and a log line) when ``n`` cases were asked for but ``described`` holds fewer."""
    if n > n_total:
        message = (f"{n} cases were asked for, but {described} holds only {n_total}: evaluating all {n_total} "
                   "of them.")
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def load_counterfact(source: EvalSource | datasets.Dataset = "counterfact", n: int | None = None,
                     **kwargs: Any) -> EvalData:
    """CounterFact in the ROME format or EasyEdit's reduced one (detected); see :func:`load_eval_data`."""
    data = load_eval_data(source, n=n, **kwargs)
    if data.data_format == "zsre":
        raise DatasetFormatError(f"{data.source} holds zsRE records, not CounterFact; use load_zsre.")
    return data


def load_zsre(source: EvalSource | datasets.Dataset = "zsre", n: int | None = None,
              target: Literal["answers", "alt"] = "answers", **kwargs: Any) -> EvalData:
    """zsRE in the ROME/MEND format; see :func:`load_eval_data`."""
    return load_eval_data(source, data_format="zsre", n=n, zsre_target=target, **kwargs)


# -- reading ------------------------------------------------------------------------------------------------------
def _read(source: Any, *, split: str, revision: str | None
          ) -> tuple[datasets.Dataset, str, str, list[str] | None]:
    """The raw dataset, a description of the source, its fingerprint, and the JSON files it came from (if any)."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source, "a datasets.Dataset", f"dataset:{source._fingerprint}", None
    if not isinstance(source, (str, os.PathLike)):
        raise DatasetFormatError(f"Unsupported evaluation data {source!r}: pass a path, a URL, a Hub dataset id "
                                 "or a datasets.Dataset.")
    text = DATA_ALIASES.get(os.fspath(source), os.fspath(source))
    path = Path(text).expanduser()
    if path.is_file():
        return _load_json([str(path)], str(path)), str(path), f"sha256:{file_sha256(path)}", [str(path)]
    if text.startswith(("http://", "https://")):
        return _load_json([text], text), text, f"url:{text}", [text]
    if looks_like_local_path(text, (".json", ".jsonl")):
        raise DatasetFormatError(f"Evaluation data file {text!r} does not exist.")
    try:
        ds = datasets.load_dataset(text, split=split, revision=revision)
    except Exception as exc:
        raise DatasetFormatError(f"Cannot load the evaluation data set {text!r} (split {split!r}): "
                                 f"{type(exc).__name__}: {exc}. Pass a local JSON file instead.") from exc
    return ds, f"{text}:{split}", f"hub:{text}@{revision or 'main'}:{split}:{ds._fingerprint}", None


def _load_json(files: list[str], described: str, features: datasets.Features | None = None) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset("json", data_files=files, split="train", features=features)
    except Exception as exc:
        raise DatasetFormatError(f"Cannot read {described} as JSON records ({type(exc).__name__}: {exc}). "
                                 "Expected a JSON array of records or JSON lines.") from exc


def _detect_format(columns: Sequence[str], described: str) -> str:
    for data_format, keys in _FORMAT_KEYS.items():
        if all(k in columns for k in keys):
            return data_format
    raise DatasetFormatError(
        f"{described} is in no supported format (columns: {list(columns)}). Expected CounterFact records "
        "(requested_rewrite, paraphrase_prompts, ...), EasyEdit's CounterFact records (prompt, subject, "
        "target_new, ground_truth, rephrase_prompt, locality_prompt) or zsRE records (src, answers, loc, ...).")


def _with_features(ds: datasets.Dataset, data_format: str, described: str,
                   files: list[str] | None) -> datasets.Dataset:
    """The data with the format's explicit features: JSON files are read again with them (which repairs lists that
    are empty everywhere; the reader fills missing optional keys itself); other data sets get missing optional
    columns added empty, extra columns dropped, and are cast."""
    features = _features(data_format)
    if files is not None:
        return _load_json(files, described, features)
    for name, feature in features.items():
        if name not in ds.column_names:
            ds = ds.add_column(name, [[] if hasattr(feature, "feature") else None] * len(ds))
    try:
        return ds.select_columns(list(features)).cast(features)
    except Exception as exc:
        raise DatasetFormatError(f"{described} does not fit the {data_format} schema ({type(exc).__name__}: "
                                 f"{exc}).") from exc


# -- conversion ---------------------------------------------------------------------------------------------------
def _counterfact_case(record: dict[str, Any], index: int) -> CounterFactCase:
    rewrite = record["requested_rewrite"]
    request = EditRequest(prompt=rewrite["prompt"], subject=rewrite["subject"],
                          target_new=rewrite["target_new"]["str"], target_true=rewrite["target_true"]["str"],
                          case_id=record["case_id"] if record["case_id"] is not None else index)
    return CounterFactCase(
        request=request, paraphrase_prompts=tuple(record["paraphrase_prompts"] or ()),
        neighborhood_prompts=tuple(record["neighborhood_prompts"] or ()),
        attribute_prompts=tuple(record["attribute_prompts"] or ()),
        generation_prompts=tuple(record["generation_prompts"] or ()), relation_id=_plain(rewrite["relation_id"]),
        target_new_id=_plain(rewrite["target_new"]["id"]), target_true_id=_plain(rewrite["target_true"]["id"]))


def _plain(value: str | None) -> str | None:
    """Undo the JSON quoting that ``datasets`` applies to the string values of a column with mixed types (e.g. ids
    ``"Q1860"`` in some records and ``1860`` in others read as ``'"Q1860"'`` and ``'1860'``)."""
    if value and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


def _easyedit_case(record: dict[str, Any], index: int) -> CounterFactCase:
    request = EditRequest(prompt=_placeholder_prompt(record["prompt"], record["subject"]),
                          subject=record["subject"], target_new=record["target_new"],
                          target_true=record["ground_truth"],
                          case_id=record["case_id"] if record["case_id"] is not None else index)
    return CounterFactCase(request=request, paraphrase_prompts=(record["rephrase_prompt"],),
                           neighborhood_prompts=(record["locality_prompt"],),
                           data_format="counterfact-easyedit")


def _zsre_case(record: dict[str, Any], index: int, target_field: str) -> ZsRECase:
    if "nq question: " not in record["loc"]:
        raise InvalidRequestError(f"its neighbourhood question {record['loc']!r} lacks the 'nq question: ' "
                                  "prefix of the ROME/MEND zsRE records.")
    answers = list(record["answers"] or ())
    if target_field == "answers" and not answers:
        raise InvalidRequestError("it has no answers.")
    target = answers[0] if target_field == "answers" else record["alt"]
    request = EditRequest(prompt=_placeholder_prompt(record["src"], record["subject"]), subject=record["subject"],
                          target_new=target or "", case_id=index)
    return ZsRECase(request=request, paraphrase_prompts=(record["rephrase"],),
                    neighborhood_question=record["loc"], neighborhood_answer=record["loc_ans"],
                    target_field=target_field,
                    metadata={k: record[k] for k in ("pred", "alt", "answers", "cond")})


def _placeholder_prompt(filled: str, subject: str) -> str:
    """The prompt with ``{}`` where the subject is (first occurrence; braces elsewhere are an error)."""
    if not subject or subject not in filled:
        raise InvalidRequestError(f"the subject {subject!r} does not occur in {filled!r}.")
    return filled.replace(subject, PLACEHOLDER, 1)


# -- plain records ------------------------------------------------------------------------------------------------
#: What each format's fields are for, in the messages about a missing field.
_FIELD_ROLES = {
    "requested_rewrite.prompt": "the rewrite prompt, with {} where the subject goes",
    "requested_rewrite.subject": "the subject whose fact changes",
    "requested_rewrite.target_new": "the new object",
    "requested_rewrite.target_true": "the true object, which CounterFact scoring compares with the new one",
    "prompt": "the rewrite prompt",
    "subject": "the subject whose fact changes",
    "target_new": "the new object",
    "target_true": "the true object, which CounterFact scoring compares with the new one",
    "ground_truth": "the true object, which CounterFact scoring compares with the new one",
    "src": "the question that is edited",
    "answers": "the edit target answers[0] (the reference's); load_zsre(..., target='alt') edits to 'alt' instead",
    "alt": "the edit target with zsre_target='alt'",
    "loc_ans": "the answer of the neighbourhood question 'loc'",
}

#: Keys that say which format a single record is in (checked in this order).
_RECORD_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("counterfact", ("requested_rewrite",)),
    ("zsre", ("src", "loc", "loc_ans", "answers", "rephrase")),
    ("counterfact-easyedit", ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth")),
    ("counterfact", ("prompt",)),
)


def case_from_record(record: Mapping[str, Any], *, data_format: Format | None = None, index: int = 0,
                     zsre_target: Literal["answers", "alt"] = "answers") -> CounterFactCase | ZsRECase:
    """One evaluation case built directly from a plain mapping (hand-written, or read from JSON).

    Only the fields the metrics read are required; a ``None`` value counts as absent.

    * CounterFact (ROME format): ``requested_rewrite`` with ``prompt`` (``{}`` where the subject goes, or the
      prompt with the subject in it), ``subject``, ``target_new`` and ``target_true`` (strings or
      ``{"str": ...}``).  Optional: ``case_id`` (default ``index``), ``paraphrase_prompts``,
      ``neighborhood_prompts``, ``attribute_prompts``, ``generation_prompts`` (lists of strings; a metric whose
      prompts are absent is NaN), ``relation_id`` and the targets' ``id``.  The same fields at the top level
      (``prompt``, ``subject``, ``target_new``, ``target_true``, the prompt lists), as in an edit request, work too.
    * EasyEdit's CounterFact: ``prompt`` (containing the subject), ``subject``, ``target_new``, ``ground_truth``;
      optional ``rephrase_prompt``, ``locality_prompt`` (a string or a list) and ``case_id``.
    * zsRE: ``src`` (containing the subject), ``subject`` and ``answers`` (or ``alt`` with ``zsre_target="alt"``);
      optional ``rephrase``, ``loc`` with ``loc_ans`` (without them the neighbourhood accuracy is NaN), ``case_id``.

    Args:
        record: the record.
        data_format: one of :data:`FORMATS`; told from the keys when omitted.
        index: the case id of a record without ``case_id`` (and its position in messages).
        zsre_target: zsRE's edit target field: ``"answers"`` (``answers[0]``) or ``"alt"``.

    Raises:
        DatasetFormatError: the record is not a mapping, its format cannot be told, a required field is missing or
            of the wrong type (the message names the field and what it is for), or it is not a valid edit.
    """
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"An evaluation record must be a dict (or a case), got {type(record).__name__}: "
                                 f"{record!r:.200}.")
    detected = data_format or _record_format(record)
    if detected not in FORMATS:
        raise DatasetFormatError(f"Unknown data format {detected!r}; expected one of {FORMATS}.")
    if zsre_target not in ("answers", "alt"):
        raise DatasetFormatError(f"zsre_target must be 'answers' or 'alt', got {zsre_target!r}.")
    fields = _RecordFields(record, detected)
    try:
        if detected == "counterfact":
            return _counterfact_case_from(fields, index)
        if detected == "counterfact-easyedit":
            return _easyedit_case_from(fields, index)
        return _zsre_case_from(fields, index, zsre_target)
    except InvalidRequestError as err:
        raise DatasetFormatError(f"The {detected} record is not a valid edit: {err}") from err


def _record_format(record: Mapping[str, Any]) -> str:
    for data_format, markers in _RECORD_MARKERS:
        if any(record.get(key) is not None for key in markers):
            return data_format
    raise DatasetFormatError(
        f"Cannot tell the format of the record with keys {sorted(map(str, record))}. Expected a CounterFact record "
        "(requested_rewrite: {prompt, subject, target_new, target_true}, optional paraphrase_prompts and "
        "neighborhood_prompts), EasyEdit's CounterFact record (prompt, subject, target_new, ground_truth, ...) or "
        "a zsRE record (src, subject, answers, optional rephrase, loc, loc_ans).")


class _RecordFields:
    """Typed access to a record's fields, with errors that name the field, its role and what the record has."""

    def __init__(self, record: Mapping[str, Any], data_format: str) -> None:
        self.record, self.data_format = record, data_format

    def get(self, path: str) -> Any:
        value: Any = self.record
        for part in path.split("."):
            if not isinstance(value, Mapping):
                return None
            value = value.get(part)
        return value

    def missing(self, path: str) -> DatasetFormatError:
        role = _FIELD_ROLES.get(path)
        return DatasetFormatError(
            f"The {self.data_format} record lacks {path}" + (f" ({role})" if role else "")
            + f"; it has {', '.join(self._present()) or 'no fields'}.")

    def _present(self) -> list[str]:
        names = []
        for key, value in self.record.items():
            if isinstance(value, Mapping):
                names += [f"{key}.{inner}" for inner, v in value.items() if v is not None]
            elif value is not None:
                names.append(str(key))
        return names

    def text(self, path: str, *, required: bool = True, target: bool = False) -> str | None:
        """A string field; a target may be ``{"str": ...}``."""
        value = self.get(path)
        if target and isinstance(value, Mapping):
            value = value.get("str")
            path = f"{path}.str"
        if value is None:
            if required:
                raise self.missing(path)
            return None
        if not isinstance(value, str):
            raise DatasetFormatError(f"The {self.data_format} record's {path} must be a string"
                                     + (" or {'str': ...}" if target else "") + f", got {value!r}.")
        return value

    def texts(self, path: str) -> tuple[str, ...]:
        """A list of strings (a single string is one prompt; absent is none)."""
        value = self.get(path)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
            raise DatasetFormatError(f"The {self.data_format} record's {path} must be a list of strings, got "
                                     f"{value!r:.200}.")
        return tuple(value)

    def plain_id(self, path: str) -> str | None:
        value = self.get(path)
        return None if value is None else str(value)

    def case_id(self, index: int) -> int | str:
        value = self.get("case_id")
        if value is None:
            return index
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DatasetFormatError(f"The {self.data_format} record's case_id must be an int or a string, got "
                                     f"{value!r}.")
        return value


def _request_prompt(prompt: str, subject: str) -> str:
    """``{}`` where the subject goes: kept if the prompt has it, else put at the subject's first occurrence."""
    return prompt if PLACEHOLDER in prompt else _placeholder_prompt(prompt, subject)


def _counterfact_case_from(fields: _RecordFields, index: int) -> CounterFactCase:
    nested = fields.get("requested_rewrite") is not None
    if nested and not isinstance(fields.get("requested_rewrite"), Mapping):
        raise DatasetFormatError(f"The counterfact record's requested_rewrite must be a dict, got "
                                 f"{fields.get('requested_rewrite')!r:.200}.")
    at = "requested_rewrite." if nested else ""
    prompt, subject = fields.text(at + "prompt"), fields.text(at + "subject")
    target_new = fields.text(at + "target_new", target=True)
    target_true = fields.text(at + "target_true", target=True)
    assert prompt is not None and subject is not None and target_new is not None
    request = EditRequest(prompt=_request_prompt(prompt, subject), subject=subject, target_new=target_new,
                          target_true=target_true, case_id=fields.case_id(index))
    return CounterFactCase(
        request=request, paraphrase_prompts=fields.texts("paraphrase_prompts"),
        neighborhood_prompts=fields.texts("neighborhood_prompts"),
        attribute_prompts=fields.texts("attribute_prompts"), generation_prompts=fields.texts("generation_prompts"),
        relation_id=fields.plain_id(at + "relation_id"), target_new_id=fields.plain_id(at + "target_new.id"),
        target_true_id=fields.plain_id(at + "target_true.id"))


def _easyedit_case_from(fields: _RecordFields, index: int) -> CounterFactCase:
    prompt, subject = fields.text("prompt"), fields.text("subject")
    target_new, ground_truth = fields.text("target_new", target=True), fields.text("ground_truth", target=True)
    assert prompt is not None and subject is not None and target_new is not None
    request = EditRequest(prompt=_request_prompt(prompt, subject), subject=subject, target_new=target_new,
                          target_true=ground_truth, case_id=fields.case_id(index))
    return CounterFactCase(request=request, paraphrase_prompts=fields.texts("rephrase_prompt"),
                           neighborhood_prompts=fields.texts("locality_prompt"), data_format="counterfact-easyedit")


def _zsre_case_from(fields: _RecordFields, index: int, target_field: str) -> ZsRECase:
    src, subject = fields.text("src"), fields.text("subject")
    assert src is not None and subject is not None
    answers = list(fields.texts("answers"))
    if target_field == "answers":
        if not answers:
            raise fields.missing("answers")
        target = answers[0]
    else:
        target = fields.text("alt")
    question = fields.text("loc", required=False) or ""
    answer = fields.text("loc_ans", required=bool(question)) or ""
    request = EditRequest(prompt=_request_prompt(src, subject), subject=subject, target_new=target or "",
                          case_id=fields.case_id(index))
    return ZsRECase(request=request, paraphrase_prompts=fields.texts("rephrase"), neighborhood_question=question,
                    neighborhood_answer=answer, target_field=target_field,
                    metadata={"pred": fields.get("pred"), "alt": fields.get("alt"), "answers": answers,
                              "cond": fields.get("cond")})


def _as_records(source: Any) -> list[Any] | None:
    """``source`` as a list of records if it is plain records (one mapping, or a list/tuple), else ``None``."""
    if isinstance(source, (CounterFactCase, ZsRECase)):
        return [source]
    if isinstance(source, Mapping):
        try:
            import datasets
        except ImportError:  # pragma: no cover (a dependency)
            return [source]
        return None if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)) else [source]
    if isinstance(source, (list, tuple)):
        return list(source)
    return None


def _from_records(records: list[Any], *, data_format: str | None, n: int | None, zsre_target: str) -> EvalData:
    """Cases built directly from plain records (or cases), all of one format."""
    if not records:
        raise DatasetFormatError("No evaluation records were given (an empty list).")
    described, n_total = f"the {len(records)} record(s) given", len(records)
    if n is not None:
        warn_if_fewer(n, n_total, described)
        records = records[:n]
    cases: list[Case] = []
    for index, record in enumerate(records):
        if isinstance(record, (CounterFactCase, ZsRECase)):
            cases.append(record)
            continue
        try:
            cases.append(case_from_record(record, data_format=data_format, index=index,  # type: ignore[arg-type]
                                          zsre_target=zsre_target))  # type: ignore[arg-type]
        except DatasetFormatError as err:
            raise DatasetFormatError(f"Record {index}: {err}") from err
    formats = [_case_format(case) for case in cases]
    if any(f != formats[0] for f in formats):
        other = next(i for i, f in enumerate(formats) if f != formats[0])
        raise DatasetFormatError(f"The records mix formats: record 0 is {formats[0]}, record {other} is "
                                 f"{formats[other]}. Evaluate one data set at a time.")
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(c) for c in cases], sort_keys=True,
                                       default=str).encode()).hexdigest()
    return EvalData(cases=tuple(cases), data_format=formats[0], source=described, fingerprint=f"records:{digest}",
                    n_total=n_total)


def _case_format(case: Case) -> str:
    return "zsre" if isinstance(case, ZsRECase) else case.data_format
