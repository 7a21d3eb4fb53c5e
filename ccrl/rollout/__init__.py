"""Batched rollouts with a KV cache (see ``ccrl.rollout.engine``)."""

from ccrl.rollout.engine import Rollout, SamplingConfig, concat_rollouts, generate, left_pad

__all__ = ["Rollout", "SamplingConfig", "concat_rollouts", "generate", "left_pad"]
