"""Every user-facing error type. The command line prints these in one line and exits with 2 (`INPUT_ERRORS`)."""

from __future__ import annotations


class ConfigError(ValueError):
    """An option outside its domain; the message names the command-line flag."""


class DataError(ValueError):
    """Bad training data (missing file, malformed row, empty dataset); the message is shown to the user."""


class ModelError(ValueError):
    """A model that cannot be used (missing, unsupported); the message is shown to the user."""


class RunDirError(ValueError):
    """An output folder that cannot be used as asked (holds another run, nothing to resume)."""


class TrainingError(RuntimeError):
    """Training cannot go on as configured (a non-finite loss or gradient, out of memory); the message says what
    to change."""


INPUT_ERRORS = (DataError, ModelError, RunDirError, ConfigError, TrainingError)
