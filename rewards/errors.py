"""Errors that mean "bad input", as opposed to bugs: the root of the distribution's error types.

``InputError`` is raised (through a subclass) for anything a user gave us: a recipe, a
dataset row, a reward function or its output, a checkpoint directory. Callers turn it into
one paragraph without a traceback (the ``ccrl`` command exits with code 2); anything else is
a bug and keeps its traceback.

Why the root lives here: the three packages are layered ccrl → policies → rewards, and a
package imports only from the layers below it. ``rewards`` imports only the standard library
and torch, so it is the bottom layer; ``policies.errors`` and ``ccrl.errors`` derive their
error types from ``InputError`` (``ccrl.errors.CcrlError`` is this class), so one
``except CcrlError`` catches bad input from any of them.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad user input. The message is shown as-is, without a traceback (exit code 2)."""


class RewardError(InputError):
    """A reward function raised, returned NaN, or returned the wrong number of values."""


class RewardSpecError(InputError):
    """A reward named in a recipe cannot be used: unknown name or module, not callable, bad parameters."""


class UnknownRewardError(RewardSpecError, RewardError):
    """A reward name or ``module:function`` path that resolves to nothing."""
