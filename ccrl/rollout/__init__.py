"""Batched rollouts with a KV cache (see ``ccrl.rollout.engine`` for how the files divide the work)."""

from ccrl.rollout.engine import (
    NotCapturable,
    Rollout,
    RolloutCache,
    SamplingConfig,
    concat_rollouts,
    generate,
    left_pad,
)

__all__ = ["NotCapturable", "Rollout", "RolloutCache", "SamplingConfig", "concat_rollouts", "generate", "left_pad"]
