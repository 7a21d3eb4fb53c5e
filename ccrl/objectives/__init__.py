"""Objectives: pure loss functions of tensors, one file per family.

Every loss returns ``(loss, metrics)``: ``loss`` is a differentiable 0-dim tensor and
``metrics`` a dict of *detached 0-dim tensors* under stable names (no device sync until
the trainer reads them). Nothing here holds trainer state or makes distributed calls;
global normalisers for micro-batching are plain arguments (see :func:`aggregate`).

    advantages.py   group_advantages, combine_rewards, informative_groups
    policy.py       policy_loss (PPO clip, GRPO/DAPO/Dr. GRPO/GSPO), aggregate
    council.py      council_entropy, ccrl_loss, mixture_logprobs, topk_log_alpha
    preference.py   dpo_loss (sigmoid, ipo), orpo_loss
    logprobs.py     token_logprobs (gather − logsumexp, chunked), token_entropy,
                    chunked_token_logprobs (from hidden states and the head's weight, chunked)
    registry.py     get_objective, list_objectives, ObjectiveSpec, HyperParameterError

Imports only the standard library and torch.
"""

from __future__ import annotations

from ccrl.objectives._checks import ObjectiveInputError
from ccrl.objectives.advantages import (
    ADVANTAGE_EPS,
    UnscorableWarning,
    combine_rewards,
    group_advantages,
    informative_groups,
)
from ccrl.objectives.council import ccrl_loss, council_entropy, mixture_logprobs, topk_log_alpha
from ccrl.objectives.logprobs import (
    auto_chunk_size,
    chunked_token_logprobs,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)
from ccrl.objectives.policy import AGGREGATIONS, IMPORTANCE_SAMPLING_LEVELS, aggregate, policy_loss
from ccrl.objectives.preference import dpo_loss, orpo_loss
from ccrl.objectives.registry import HyperParameterError, ObjectiveSpec, get_objective, list_objectives

__all__ = [
    "ADVANTAGE_EPS",
    "AGGREGATIONS",
    "HyperParameterError",
    "IMPORTANCE_SAMPLING_LEVELS",
    "ObjectiveInputError",
    "ObjectiveSpec",
    "UnscorableWarning",
    "aggregate",
    "auto_chunk_size",
    "ccrl_loss",
    "chunked_token_logprobs",
    "combine_rewards",
    "council_entropy",
    "dpo_loss",
    "get_objective",
    "group_advantages",
    "informative_groups",
    "list_objectives",
    "mixture_logprobs",
    "orpo_loss",
    "policy_loss",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "topk_log_alpha",
]
