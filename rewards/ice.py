"""E_ICE: the compute-energy cost ("thermodynamic load") of producing a completion."""

from __future__ import annotations

from typing import Any

from rewards._common import column, lengths, positive_int
from rewards.errors import RewardError
from rewards.registry import register


def _active_sum(value: Any, n_tokens: int, i: int) -> float:
    """Σ_t N_active(t) for one completion: a per-token constant, or one value per token."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):
        if len(value) != n_tokens:
            raise RewardError(
                f"reward 'ice': active_params_per_token[{i}] has {len(value)} entries for {n_tokens} tokens"
            )
        values = [float(v) for v in value]
    else:
        values = [float(value)] * n_tokens
    if any(v < 0 for v in values):
        raise RewardError(f"reward 'ice': active_params_per_token[{i}] is negative")
    return sum(values)


@register("ice", cost=True)
def ice(
    prompts: list,
    completions: list,
    *,
    max_completion_length: int | None = None,
    active_params_per_token: Any = None,
    total_params: int | None = None,
    completion_lengths: Any = None,
    completion_ids: Any = None,
    **kwargs: Any,
) -> list[float]:
    """Compute-energy cost of a completion, normalised to [0, 1]; a *cost* (``is_cost``: V_Ω subtracts it).

        E_ICE = Σ_{t=1..|y|} N_active(t) / (L_max · N_total)

    Why: a decoder's forward pass costs ≈ 2·N FLOPs per token for N (active) parameters
    (Kaplan et al. 2020, arXiv 2001.08361, §2.1), and at fixed hardware energy is
    proportional to FLOPs, so Σ_t N_active(t) is the completion's energy up to a constant.
    The worst case within the generation budget — every one of L_max tokens using every
    parameter — normalises it to [0, 1]. A sparse council (top-k personas, top-m
    micro-agents) lowers N_active and so the cost; so does stopping early. Not counted:
    attention's context-length-dependent FLOPs and the prompt's prefill (the same for every
    completion of a group, so it would cancel in group-relative advantages anyway).

    kwargs read: ``completion_lengths`` or ``completion_ids`` (|y|),
    ``max_completion_length`` (L_max), ``active_params_per_token`` (an int for all
    completions, or one entry per completion: an int, or a list with one count per token),
    ``total_params`` (N_total). Without ``active_params_per_token`` the policy is treated as
    dense and E = |y| / L_max. Values are clamped to [0, 1].

    >>> ice(["q", "q"], ["", ""], completion_lengths=[5, 10], max_completion_length=10,
    ...     active_params_per_token=250, total_params=1000)
    [0.125, 0.25]
    """
    n = len(completions)
    l_max = positive_int(max_completion_length, "max_completion_length", "ice")
    counts = lengths(n, "ice", completion_lengths, completion_ids)
    if active_params_per_token is None:
        return [min(c / l_max, 1.0) for c in counts]
    total = positive_int(total_params, "total_params", "ice")
    active = column(active_params_per_token, n, "active_params_per_token", "ice")
    out = []
    for i, (c, a) in enumerate(zip(counts, active)):
        energy = _active_sum(a, c, i) / (l_max * total)
        out.append(min(max(energy, 0.0), 1.0))
    return out
