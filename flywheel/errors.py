"""Errors that the CLI turns into one clean line (exit 1). Anything else is a bug."""

from __future__ import annotations


class FlywheelError(Exception):
    """A problem the user can fix: bad input, missing file, unreachable model."""


class TrainingError(FlywheelError):
    """Training could not start or did not finish (bad base model, diverged loss, failed job)."""


class SpecError(FlywheelError):
    """An eval or run spec is malformed; the message reads `file: field: message`."""


class DataError(FlywheelError):
    """A dataset file cannot be read; the message names the file and line."""


class ModelError(FlywheelError):
    """A model reference is unknown or the model cannot be loaded."""


class StoreError(FlywheelError):
    """The SQLite store cannot be opened or written."""


class TooManyErrors(FlywheelError):
    """A run recorded more failing samples than `--max-errors` allows."""


class PlatformImportError(FlywheelError):
    """A download from the hosted platform has the wrong shape (`file:line: field: message`); nothing
    of it was stored."""


class RescueError(FlywheelError):
    """`flywheel rescue` cannot start (no data, over budget) or a certificate does not verify."""
