"""The policies' error types: bad input to a policy (a config, a forward's arguments, a
precision name, a weight that cannot be packed, a checkpoint directory).

They derive from ``rewards.errors.InputError``, the root of the distribution's bad-input
errors (``ccrl.errors.CcrlError`` is that class), and from ``ValueError`` where they replace
one. ``policies`` never imports ``ccrl``; ``rewards.errors`` is the one thing it takes from
the layer below (``rewards`` imports only the standard library at import time).
"""

from __future__ import annotations

from rewards.errors import InputError

__all__ = [
    "PackError",
    "PolicyCheckpointError",
    "PolicyError",
    "PrecisionError",
    "QuillanConfigError",
    "QuillanInputError",
]


class PolicyError(InputError, ValueError):
    """Bad input to a policy; the root of this module's errors."""


class QuillanConfigError(PolicyError):
    """A Quillan config field (or preset override) is invalid; the message names the field."""


class QuillanInputError(PolicyError):
    """Bad arguments to ``QuillanForCausalLM.forward`` (shapes of masks, replayed routes, inputs)."""


class PrecisionError(PolicyError):
    """An unknown precision name or an invalid quantisation size for a layer."""


class PackError(PolicyError):
    """A weight or model that cannot be packed as asked (sizes, mode), or a bad kernel setting."""


class PolicyCheckpointError(PolicyError):
    """A policy checkpoint directory (e.g. a council head's) is missing files or inconsistent."""
