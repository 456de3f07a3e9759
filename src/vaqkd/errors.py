"""The errors a user can cause and fix: the command line prints them as one line (no traceback unless
`--debug`); anything else is a bug and keeps its traceback."""

from __future__ import annotations


class VaqkdError(Exception):
    """Base of the errors whose message alone tells the user what is wrong and where."""


class RunFileError(VaqkdError):
    """A file of a run directory (or a cache) is missing, truncated, damaged or belongs to another model."""


class RunLockedError(VaqkdError):
    """Another process is writing to this run directory."""


class TrainingDiverged(VaqkdError):
    """The loss became non-finite; the last good checkpoint is kept."""


class ConfigError(VaqkdError, ValueError):
    """A config key is unknown, of the wrong type, or out of range."""
