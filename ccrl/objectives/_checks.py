"""Shape and option checks shared by the objective families.

The objectives are pure tensor functions, so a wrong shape is usually a caller's bug; it
can also come from a recipe (a group size that does not divide the batch). The error is
therefore both a :class:`ValueError` (what tensor code conventionally raises) and a
:class:`ccrl.errors.CcrlError` (so the command line reports it as bad input).
"""

from __future__ import annotations

import torch

from ccrl.errors import CcrlError


class ObjectiveInputError(CcrlError, ValueError):
    """A tensor handed to an objective has the wrong shape, or an option is unknown."""


def check_choice(value: str, choices: tuple[str, ...], what: str, where: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming ``what`` and ``where``."""
    if value not in choices:
        raise ObjectiveInputError(f"{where}: unknown {what} {value!r}; expected one of {list(choices)}")
    return value


def check_same_shape(where: str, **tensors: torch.Tensor | None) -> None:
    """All non-None tensors must share one shape; the message lists each name and shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
        raise ObjectiveInputError(f"{where}: tensors must have the same shape, got {listed}")
