"""The error classes of safetypatch, in one place.

Every error a user can cause (a bad flag, file, row, model, patch or suite) is a `SafetypatchError`; the command
line prints its message and exits with status 2, without a traceback. Each message names the input (file, line,
field or flag) and the fix. Anything else that escapes is a bug and keeps its traceback.

The classes also derive from the built-in exception a caller would expect (`ValueError`, `RuntimeError`,
`FileExistsError`), so code written against those keeps working.
"""

from __future__ import annotations


class SafetypatchError(Exception):
    """Base class: an input problem the message explains (shown without a traceback, exit status 2)."""


class ConfigError(SafetypatchError, ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the field and the file."""


class DataError(SafetypatchError, ValueError):
    """A data file or row is unusable; the message names file, line and field."""


class ModelError(SafetypatchError, RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


class PatchError(SafetypatchError, ValueError):
    """A patch is missing, damaged, or made for another model; the message says what differs."""


class OutputExistsError(SafetypatchError, FileExistsError):
    """An output already holds results; nothing is overwritten silently."""


class SuiteError(ConfigError):
    """A suite file is invalid; the message names the file and the entry."""


class StoreError(ConfigError):
    """The results database cannot be opened or does not hold what was asked for."""


class JudgeError(ModelError):
    """A model-based judge was set up wrongly (no model given, a tokenizer without the needed chat template)."""


class BackendError(ModelError):
    """A generation backend is unknown, not installed, or was given unusable arguments."""


class LMEvalUnavailable(ModelError):
    """lm-evaluation-harness is not installed."""
