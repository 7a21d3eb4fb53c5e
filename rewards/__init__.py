"""Reward functions for ccrl: a registry with one signature, and the built-in V_Ω terms.

A reward function has TRL's signature and is called with keywords:

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

One value per completion; ``None`` = no opinion (skipped in the weighted sum); NaN/inf,
non-numbers and wrong lengths are errors (:func:`call_reward` raises RewardError naming
the function and the sample). Register with ``@rewards.register("name")``, look up with
``rewards.get(name)``; recipes may also name ``"package.module:function"``
(:func:`resolve`), and ``{name: ..., weight: ..., **params}`` entries bind their params
with :func:`bind`.

Keyword arguments the trainer passes (the built-ins read those listed in their docstring;
a user function takes whichever it needs and ignores the rest via ``**kwargs``):

    <dataset columns>          one entry per completion, e.g. ``answer``
    completion_ids             list[list[int]]: generated token ids (padding removed)
    completion_lengths         list[int]: generated token counts
    max_completion_length      int: the generation budget L_max
    overlong_cache             int: L_cache of DAPO's overlong shaping (recipe param)
    council_weights            list of float tensors [T_i, P]: dense α at each generated token
    chosen_token_probs         list of float tensors [T_i, P]: π_i(a_t) per persona per token
    active_params_per_token    int, or one entry per completion (int or per-token list)
    total_params               int: the policy's parameter count
    constitution               a constitution name, YAML path or mapping (optional)
    policy_device              the policy's device (optional; ``reward_model`` and ``judge`` run on it
                               when it is CUDA, on the CPU otherwise, unless their ``device`` is set)

Built-ins: ``exact_match``, ``partial_match``, ``numeric_match``, ``format``, ``overlong``,
``council_consensus``, ``vir``, ``ice`` (a cost: ``is_cost(ice)``, V_Ω subtracts it),
``council_value`` / :class:`CouncilValue` (V_Ω = w_R·R + w_C·C_VIR − w_E·E_ICE), and the
model-based ``reward_model`` and ``judge`` (:mod:`rewards.model_based`: a local sequence
classifier, a local LLM judge; transformers loads with the model).

Imports only the standard library and torch; pyyaml loads when a constitution file does.
"""

from __future__ import annotations

from rewards.council import council_consensus
from rewards.ice import ice
from rewards.model_based import judge, reward_model
from rewards.registry import (
    BoundReward,
    UnknownRewardError,
    bind,
    call_reward,
    get,
    is_cost,
    list_rewards,
    register,
    resolve,
    validate_output,
)
from rewards.shaping import overlong
from rewards.task import exact_match, format_match, numeric_match, parse_number, partial_match
from rewards.value import CouncilValue, council_value
from rewards.vir import Constitution, Rule, load_constitution, parse_constitution, shipped_constitutions, vir

__all__ = [
    "BoundReward",
    "Constitution",
    "CouncilValue",
    "Rule",
    "UnknownRewardError",
    "bind",
    "call_reward",
    "council_consensus",
    "council_value",
    "exact_match",
    "format_match",
    "get",
    "ice",
    "is_cost",
    "judge",
    "list_rewards",
    "load_constitution",
    "numeric_match",
    "overlong",
    "parse_constitution",
    "parse_number",
    "partial_match",
    "register",
    "resolve",
    "reward_model",
    "shipped_constitutions",
    "validate_output",
    "vir",
]
