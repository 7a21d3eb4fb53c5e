"""Errors that mean "bad input", as opposed to bugs.

Every error raised because of something a user gave us (a recipe, a dataset row, a
reward function's output, a checkpoint directory) is a :class:`CcrlError`. The CLI turns
it into one paragraph on stderr and exit code 2; anything else is a bug and keeps its
traceback. Messages name *what* was wrong and *where* (file, key, row, function).
"""

from __future__ import annotations


class CcrlError(Exception):
    """Bad user input. The message is shown as-is, without a traceback (exit code 2)."""


class RecipeError(CcrlError):
    """A recipe (YAML or dict) is invalid: unknown key, wrong type, value out of range, missing file."""


class DataError(CcrlError):
    """A dataset file or row is invalid: missing column, empty field, unreadable file."""


class RewardError(CcrlError):
    """A reward function raised, returned NaN, or returned the wrong number of values."""


class CheckpointError(CcrlError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


class TrainingDiverged(CcrlError):
    """The loss became NaN/inf; the last good checkpoint is kept and the run stops."""
