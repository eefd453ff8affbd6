"""Edit requests: the fact to write into the model.

An :class:`EditRequest` says "in ``prompt`` with ``subject`` in place of ``{}``, the model should continue with
``target_new``".  It is validated when created; :func:`as_request` also accepts the reference implementation's dict
format, CounterFact records and EasyEdit-style requests whose prompt already contains the subject.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InvalidRequestError, SubjectNotFoundError

__all__ = ["EditRequest", "as_request", "as_requests"]

PLACEHOLDER = "{}"


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit.

    Args:
        prompt: text with exactly one ``{}`` where the subject goes and no other brace,
            e.g. ``"{} is located in the city of"``.
        subject: the entity whose fact changes, e.g. ``"The Eiffel Tower"``; no leading/trailing whitespace.
        target_new: the new object, e.g. ``"Rome"``; a leading space is added when tokenised, as the reference does.
        target_true: the current object (optional; used by evaluation and model cards).
        case_id: an identifier (e.g. the CounterFact case id).
        metadata: anything else worth keeping with the edit (JSON-serialisable).

    Raises:
        InvalidRequestError: no or several placeholders, stray braces, empty subject or target.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new", "target_true"):
            if name == "target_true" and self.target_true is None:
                continue
            if not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"EditRequest.{name} must be a string, got {type(getattr(self, name))}.")
        count = self.prompt.count(PLACEHOLDER)
        if count != 1:
            raise InvalidRequestError(
                f"The prompt must contain exactly one '{{}}' where the subject goes; found {count} in "
                f"{self.prompt!r}. Example: '{{}} is located in the city of'.")
        if "{" in self.prompt.replace(PLACEHOLDER, "") or "}" in self.prompt.replace(PLACEHOLDER, ""):
            raise InvalidRequestError(f"The prompt {self.prompt!r} has a brace besides its '{{}}' placeholder.")
        if not self.subject.strip():
            raise InvalidRequestError("The subject is empty.")
        if self.subject != self.subject.strip():
            raise InvalidRequestError(f"The subject {self.subject!r} has leading or trailing whitespace; strip it.")
        if not self.target_new.strip():
            raise InvalidRequestError("target_new is empty: say what the model should answer.")
        if self.target_true is not None and not self.target_true.strip():
            raise InvalidRequestError("target_true is empty; leave it None if unknown.")

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject in place of ``{}``."""
        return self.prefix + self.subject + self.suffix

    @property
    def prefix(self) -> str:
        """The prompt's text before the subject."""
        return self.prompt[: self.prompt.index(PLACEHOLDER)]

    @property
    def suffix(self) -> str:
        """The prompt's text after the subject."""
        return self.prompt[self.prompt.index(PLACEHOLDER) + len(PLACEHOLDER):]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :func:`as_request` reads back."""
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}


def _target_str(value: Any, field_name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "str" in value:
        return value["str"]
    raise InvalidRequestError(f"{field_name} must be a string or a dict with a 'str' key, got {value!r}.")


def _from_filled_prompt(prompt: str, subject: str) -> str:
    """EasyEdit style: the prompt already contains the subject; put ``{}`` at its first occurrence."""
    if not subject:
        raise InvalidRequestError("The subject is empty.")
    if subject not in prompt:
        raise SubjectNotFoundError(f"The subject {subject!r} does not occur in the prompt {prompt!r}.")
    return prompt.replace(subject, PLACEHOLDER, 1)


def as_request(item: EditRequest | Mapping[str, Any]) -> EditRequest:
    """Convert any supported request format to an :class:`EditRequest`.

    Accepted: an ``EditRequest``; the reference's dict ``{"prompt", "subject", "target_new": {"str": ...}}``;
    a CounterFact record (with ``requested_rewrite`` and ``case_id``); an EasyEdit dict whose ``prompt`` already
    contains the subject (``ground_truth`` is read as target_true).
    """
    if isinstance(item, EditRequest):
        return item
    if not isinstance(item, Mapping):
        raise InvalidRequestError(f"Cannot make an edit request from {type(item).__name__}: {item!r}.")
    if "requested_rewrite" in item:
        rewrite = dict(item["requested_rewrite"])
        rewrite.setdefault("case_id", item.get("case_id"))
        return as_request(rewrite)
    missing = [k for k in ("prompt", "subject", "target_new") if k not in item]
    if missing:
        raise InvalidRequestError(f"Edit request is missing {missing}: {dict(item)!r}.")
    prompt, subject = item["prompt"], item["subject"]
    if isinstance(prompt, str) and isinstance(subject, str) and PLACEHOLDER not in prompt:
        prompt = _from_filled_prompt(prompt, subject)
    known = {"prompt", "subject", "target_new", "target_true", "ground_truth", "case_id", "metadata"}
    metadata = dict(item.get("metadata") or {}) | {k: v for k, v in item.items() if k not in known}
    target_new = _target_str(item["target_new"], "target_new")
    target_true = _target_str(item.get("target_true", item.get("ground_truth")), "target_true")
    return EditRequest(prompt=prompt, subject=subject, target_new=target_new or "", target_true=target_true,
                       case_id=item.get("case_id"), metadata=metadata)


def as_requests(items: EditRequest | Mapping[str, Any] | Iterable[EditRequest | Mapping[str, Any]]
                ) -> list[EditRequest]:
    """Like :func:`as_request` for one request or a list of them."""
    if isinstance(items, (EditRequest, Mapping)):
        return [as_request(items)]
    return [as_request(item) for item in items]
