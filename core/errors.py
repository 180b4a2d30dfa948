"""Errors that mean "the user gave us something we cannot use".

The CLI turns any `UserError` into a one-line message and exit code 2; everything
else is a bug and keeps its traceback (in the run's log).
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a message fit to show as is."""


class DataError(UserError):
    """A data file that cannot be used, located as precisely as we can."""

    def __init__(self, path, problem: str, line: int | None = None, row: int | None = None):
        self.path = str(path)
        self.problem = problem
        self.line = line
        self.row = row
        where = self.path
        if line is not None:
            where += f", line {line}"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {problem}")


class RunError(UserError):
    """A run folder that is missing, incomplete or not a run."""


class TrainingDiverged(UserError):
    """The loss or the adapter weights stopped being finite numbers."""


class ConfigError(UserError, ValueError):
    """A config (from a file or a form) with a missing or mistyped field."""
