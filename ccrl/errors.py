"""Errors that mean "bad input", as opposed to bugs.

Every error raised because of something a user gave us (a recipe, a dataset row, a
reward function's output, a checkpoint directory) is a :class:`CcrlError`. The CLI turns
it into one paragraph on stderr and exit code 2; anything else is a bug and keeps its
traceback. Messages name *what* was wrong and *where* (file, key, row, function).

``policies`` and ``rewards`` sit below ``ccrl`` and never import it: their errors derive
from ``rewards.errors.InputError``, the bottom layer's root, and ``CcrlError`` *is* that
class, so ``except CcrlError`` (or ``except USER_ERRORS``) catches bad input from the
policy and the rewards as well. ``RewardError`` is the rewards' own class, re-exported.
"""

from __future__ import annotations

from rewards.errors import InputError as CcrlError
from rewards.errors import RewardError, RewardSpecError

__all__ = [
    "USER_ERRORS",
    "CcrlError",
    "CheckpointError",
    "DataError",
    "RecipeError",
    "RewardError",
    "RewardSpecError",
    "TrainingDiverged",
]

USER_ERRORS: tuple[type[Exception], ...] = (CcrlError,)
"""What the CLI and the pipeline catch as bad input (exit code 2, one paragraph): the common root
of ccrl's, the policies' (``policies.errors.PolicyError``) and the rewards' error types."""


class RecipeError(CcrlError):
    """A recipe (YAML or dict) is invalid: unknown key, wrong type, value out of range, missing file."""


class DataError(CcrlError):
    """A dataset file or row is invalid: missing column, empty field, unreadable file."""


class CheckpointError(CcrlError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


class TrainingDiverged(CcrlError):
    """The loss became NaN/inf; the last good checkpoint is kept and the run stops."""
