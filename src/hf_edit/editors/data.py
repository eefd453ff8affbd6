"""Training data of editor networks: edits from CounterFact/zsRE records, minus the evaluation cases, and plain
text for the locality term.

An edit example is a request (prompt, subject, new target) plus its paraphrase prompts: the network sees the
gradient of the rewrite prompt + target (the "inner" edit), and is trained so that the edited model predicts the
target after a paraphrase (the "outer" edit, spec §2.4's reconstruction of the KE-CF/MEND-CF pipeline) while its
next-token distribution on unrelated text stays put (KL on locality texts).

Every case that also occurs in the evaluation data is excluded (CounterFact: same ``case_id`` or the same filled
rewrite prompt; zsRE: the same question), and how many were excluded is recorded.  Neighbourhood prompts of the
training edits that occur anywhere in the evaluation data (as a rewrite, paraphrase or neighbourhood prompt) are
dropped too (they are only used for the optional ``loc_neighbours`` locality rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetFormatError
from ..evaluation.data import CounterFactCase, EvalData, ZsRECase, load_eval_data
from ..files import file_sha256
from ..requests import EditRequest

__all__ = ["EditExample", "EditorTrainingData", "prepare_training_data", "read_locality_texts", "case_keys",
           "case_prompts"]


@dataclass(frozen=True)
class EditExample:
    """One training edit.

    Attributes:
        request: the fact to write (its filled prompt + target is the inner edit).
        paraphrases: filled prompts that should also give the target (outer edits); may be empty.
        key: the identity used to exclude evaluation cases.
        neighbours: prompts about other subjects that the edit must not change (CounterFact's neighbourhood
            prompts, zsRE's unrelated question); used for the locality term only with ``loc_neighbours``.
    """

    request: EditRequest
    paraphrases: tuple[str, ...] = ()
    key: str = ""
    neighbours: tuple[str, ...] = ()

    def outer_prompt(self, draw: int) -> str:
        """The paraphrase for the ``draw``-th use of this example (the rewrite prompt when there is none)."""
        if not self.paraphrases:
            return self.request.filled_prompt
        return self.paraphrases[draw % len(self.paraphrases)]


@dataclass
class EditorTrainingData:
    """Training and validation edits, locality texts, and where they came from.

    Attributes:
        train, val: the edits (validation: held back from training, or given separately).
        locality: texts for the locality term.
        source: the training data's source; format: its format.
        n_total: records in the source; n_excluded: those dropped because they are evaluation cases.
        exclude_source: what was excluded (the evaluation data's source), if anything.
        locality_source: where the locality texts came from.
        fingerprint: sha256 over the source's fingerprint, the train/val keys in order and the locality texts.
    """

    train: list[EditExample]
    val: list[EditExample]
    locality: list[str]
    source: str = ""
    data_format: str = ""
    n_total: int = 0
    n_excluded: int = 0
    exclude_source: str | None = None
    locality_source: str = ""
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"data_source": self.source, "data_format": self.data_format, "data_fingerprint": self.fingerprint,
                "n_source_records": self.n_total, "n_excluded": self.n_excluded, "n_train": len(self.train),
                "n_val": len(self.val), "exclude_source": self.exclude_source,
                "locality_source": self.locality_source, "n_locality_texts": len(self.locality), **self.extra}


def case_keys(case: Any) -> set[str]:
    """The identities of a case for exclusion: ``cf:<case_id>`` (CounterFact with an id) and the normalised
    filled rewrite prompt (``prompt:<text>``), so the same fact under another id is caught too."""
    keys = set()
    if isinstance(case, CounterFactCase) and case.case_id is not None:
        keys.add(f"cf:{case.case_id}")
    request = case.request if hasattr(case, "request") else case
    keys.add("prompt:" + " ".join(request.filled_prompt.lower().split()))
    return keys


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def case_prompts(case: Any) -> set[str]:
    """Every prompt of a case (rewrite, paraphrases, neighbourhood), normalised: an evaluation case's prompts
    must not appear in training, not even as another edit's neighbourhood prompt."""
    prompts = {case.request.filled_prompt, *case.paraphrase_prompts}
    if isinstance(case, CounterFactCase):
        prompts |= set(case.neighborhood_prompts)
    elif isinstance(case, ZsRECase):
        prompts.add(case.neighborhood_question)
    return {_normal(p) for p in prompts if p}


def _example(case: Any, banned: set[str] = frozenset()) -> EditExample:
    if isinstance(case, (CounterFactCase, ZsRECase)):
        paraphrases = tuple(p for p in case.paraphrase_prompts if p and p.strip())
        key = min(case_keys(case))
        neighbours = tuple(case.neighborhood_prompts) if isinstance(case, CounterFactCase) else (
            case.neighborhood_question,)
        neighbours = tuple(n for n in neighbours if n and n.strip() and _normal(n) not in banned)
        return EditExample(request=case.request, paraphrases=paraphrases, key=key, neighbours=neighbours)
    if isinstance(case, EditExample):
        return case
    raise DatasetFormatError(f"Cannot train on {type(case).__name__}; pass CounterFact/zsRE data.")


def _load(source: Any, n: int | None = None) -> EvalData:
    if isinstance(source, EvalData):
        return source
    if isinstance(source, (str, os.PathLike)) or type(source).__name__ == "Dataset":
        return load_eval_data(source, n=n)
    cases = list(source)
    return EvalData(cases=tuple(cases), data_format="in-memory", source="in-memory cases",
                    fingerprint="cases:" + hashlib.sha256(json.dumps(
                        [c.request.to_dict() for c in cases], sort_keys=True, default=str).encode()).hexdigest(),
                    n_total=len(cases))


def read_locality_texts(source: str | os.PathLike | Sequence[str] | Iterable[str], *, min_chars: int = 40
                        ) -> tuple[list[str], str, str]:
    """Plain texts for the locality term: a text file (WikiText's raw files: one paragraph per line, headings
    ``= ... =`` dropped), a folder of ``*.raw``/``*.txt`` files, or a list of strings.

    Returns:
        The texts, a description of the source, and a fingerprint of the texts.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        files = sorted(p for p in path.iterdir() if p.suffix in (".raw", ".txt")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise DatasetFormatError(f"No locality text at {source}: give a text file, a folder of .raw/.txt files "
                                     "or a list of strings.")
        texts = []
        for f in files:
            for line in f.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if len(line) >= min_chars and not (line.startswith("=") and line.endswith("=")):
                    texts.append(line)
        described = str(path)
        fingerprint = "sha256:" + hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
    else:
        texts = [str(t).strip() for t in source if str(t).strip()]
        described = "in-memory texts"
        fingerprint = "texts:" + hashlib.sha256("\n".join(texts).encode()).hexdigest()
    if not texts:
        raise DatasetFormatError(f"The locality source {described} holds no text.")
    return texts, described, fingerprint


def prepare_training_data(train_data: Any, *, locality: str | os.PathLike | Sequence[str],
                          exclude: Any = None, val_data: Any = None, val_size: int = 100, seed: int = 0,
                          n: int | None = None) -> EditorTrainingData:
    """Load the edits, drop evaluation cases, hold back a validation slice, and read the locality texts.

    Args:
        train_data: CounterFact (ROME or EasyEdit format) or zsRE data: a path, a Hub dataset id, an
            :class:`~hf_edit.evaluation.EvalData`, or a list of cases.
        locality: text for the locality term (see :func:`read_locality_texts`), e.g. WikiText-2.
        exclude: evaluation data whose cases must not be trained on (same forms as ``train_data``), or a list of
            CounterFact case ids.
        val_data: validation edits; ``None``: ``val_size`` edits held back from ``train_data`` (after a seeded
            shuffle).
        val_size: size of the held-back slice (ignored with ``val_data``).
        seed: seed of the held-back selection.
        n: use the first ``n`` records of ``train_data``.

    Raises:
        ConfigError: nothing is left to train on.
    """
    data = _load(train_data, n)
    excluded_keys: set[str] = set()
    banned_prompts: set[str] = set()
    exclude_source = None
    if exclude is not None:
        items = None if isinstance(exclude, (EvalData, str, os.PathLike)) else list(exclude)
        if items is not None and all(isinstance(x, (int, str)) for x in items):
            excluded_keys = {f"cf:{x}" for x in items}
            exclude_source = f"{len(excluded_keys)} case ids"
        else:
            exclude = exclude if items is None else items
            evaluation = _load(exclude)
            for case in evaluation.cases:
                excluded_keys |= case_keys(case)
                banned_prompts |= case_prompts(case)
            exclude_source = evaluation.source
    kept, n_excluded, by_id = [], 0, 0
    for case in data.cases:
        hit = case_keys(case) & excluded_keys
        if hit:
            n_excluded += 1
            by_id += any(k.startswith("cf:") for k in hit)
            continue
        kept.append(_example(case, banned_prompts))
    if val_data is not None:
        val = [_example(c, banned_prompts) for c in _load(val_data).cases if not (case_keys(c) & excluded_keys)]
        train = kept
    else:
        order = list(range(len(kept)))
        random.Random(seed).shuffle(order)
        held = set(order[:min(val_size, max(0, len(kept) - 1))])
        val = [kept[i] for i in sorted(held)]
        train = [kept[i] for i in range(len(kept)) if i not in held]
    if not train:
        raise ConfigError(f"No training edits are left in {data.source} ({n_excluded} excluded, {len(val)} held "
                          "back for validation).")
    texts, locality_source, locality_fingerprint = read_locality_texts(locality)
    digest = hashlib.sha256(data.fingerprint.encode())
    digest.update(json.dumps([e.key for e in train]).encode())
    digest.update(json.dumps([e.key for e in val]).encode())
    digest.update(locality_fingerprint.encode())
    digest.update(json.dumps([e.neighbours for e in train + val]).encode())
    n_neighbours = sum(len(c.neighborhood_prompts) if isinstance(c, CounterFactCase) else 1 for c in data.cases
                       if isinstance(c, (CounterFactCase, ZsRECase)) and not case_keys(c) & excluded_keys)
    kept_neighbours = sum(len(e.neighbours) for e in train + val)
    return EditorTrainingData(train=train, val=val, locality=texts, source=data.source,
                              data_format=data.data_format, n_total=len(data.cases), n_excluded=n_excluded,
                              exclude_source=exclude_source, locality_source=locality_source,
                              fingerprint="sha256:" + digest.hexdigest(),
                              extra={"n_excluded_by_case_id": by_id, "n_excluded_by_prompt": n_excluded - by_id,
                                     "n_neighbour_prompts": kept_neighbours,
                                     "n_neighbour_prompts_dropped": n_neighbours - kept_neighbours})
