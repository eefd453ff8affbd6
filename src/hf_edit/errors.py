"""Exceptions raised by hf_edit.

Every error hf_edit raises on bad input derives from :class:`HfEditError`; the message says what was found and
what to do.  Errors that concern a value the user passed also derive from :class:`ValueError`, so generic
``except ValueError`` code keeps working.  Whenever one of these is raised during an edit, the model, its adapters
and every cache are left exactly as they were before the call.
"""

from __future__ import annotations

__all__ = [
    "HfEditError",
    "InvalidRequestError",
    "SubjectNotFoundError",
    "ConfigError",
    "UnknownMethodError",
    "EditorNetworkError",
    "EditorMismatchError",
    "LayerOutOfRangeError",
    "UnsupportedArchitectureError",
    "TokenizerError",
    "StatisticsError",
    "StatisticsMismatchError",
    "StatisticsCacheError",
    "InsufficientStatisticsError",
    "StatisticsNotFoundError",
    "OptimizationError",
    "EditFolderError",
    "DisablingEditError",
    "DatasetFormatError",
    "ModelNotFoundError",
    "EditDidNotTakeWarning",
]


class HfEditError(Exception):
    """Base class of every error raised by hf_edit."""


class InvalidRequestError(HfEditError, ValueError):
    """An :class:`~hf_edit.EditRequest` is malformed (placeholders, empty subject or target, bad format)."""


class SubjectNotFoundError(InvalidRequestError):
    """The subject does not occur in the prompt, or no token of the tokenised prompt covers it."""


class ConfigError(HfEditError, ValueError):
    """A method configuration is invalid."""


class EditorNetworkError(ConfigError):
    """A folder or Hub repo does not hold a valid editor network (MEND, KE), or one of another kind: load the folder
    that ``train_editor``/``save_pretrained`` wrote, with the class of its kind."""


class EditorMismatchError(ConfigError):
    """An editor network was trained for another base model (its weight fingerprint differs) or other modules:
    train one for this model (``hf-edit train-editor``), or load the base model it was trained for."""


class UnknownMethodError(ConfigError):
    """``method=`` names no editing method hf_edit knows."""


class LayerOutOfRangeError(ConfigError):
    """A configured layer index does not exist in the model."""


class UnsupportedArchitectureError(HfEditError):
    """hf_edit cannot find the module to edit; pass its name explicitly (``rewrite_module_tmp``)."""


class TokenizerError(HfEditError, ValueError):
    """The tokenizer cannot do what an edit needs (e.g. it is not a fast tokenizer with offset mappings)."""


class StatisticsError(HfEditError):
    """Base class of errors about second-moment statistics."""


class StatisticsMismatchError(StatisticsError, ValueError):
    """Statistics do not fit the module being edited (shape, layer, model or data set)."""


class StatisticsCacheError(StatisticsError):
    """A statistics file is corrupted or unreadable; it is never used silently."""


class StatisticsNotFoundError(StatisticsError, LookupError):
    """No statistics for the requested (model, revision, module, data set, sample count, dtype) on the Hub."""


class InsufficientStatisticsError(StatisticsError):
    """Too few key vectors were seen for the second moment to be invertible."""


class OptimizationError(HfEditError):
    """The optimisation of an edit produced NaN or inf; nothing was applied."""


class DisablingEditError(HfEditError):
    """An edit failed the disabling-edit guard (its update would break the model); nothing was applied.

    Attributes:
        diagnostics: the guard's measurements (relative norm, key alignment, KL on unrelated prompts).
    """

    def __init__(self, message: str, diagnostics: dict | None = None) -> None:
        super().__init__(message)
        self.diagnostics = dict(diagnostics or {})


class EditFolderError(HfEditError):
    """A folder or repository does not hold a valid hf_edit edit (adapter and manifest disagree or are missing)."""


class DatasetFormatError(HfEditError, ValueError):
    """An evaluation data set is missing, unreadable, or in none of the supported formats."""


class ModelNotFoundError(HfEditError, FileNotFoundError):
    """A model or edit folder given by path does not exist."""


class EditDidNotTakeWarning(UserWarning):
    """An edit was applied but its new target is not the model's top prediction on the edit's own prompt."""
