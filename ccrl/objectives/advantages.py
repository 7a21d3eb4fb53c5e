"""Group-relative advantages (GRPO family) and the combination of several rewards.

GRPO (Shao et al. 2024, arXiv 2402.03300, §4.1.2 "outcome supervision"): G completions
are sampled per prompt, and each completion's advantage is its reward standardised within
its group,

    A_i = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + ε)                       (scale="group")

with the unbiased sample std and ε = 1e-4, exactly as TRL 1.16's GRPOTrainer. Variants:

- ``scale="batch"``: the mean is still the group's, the std is taken over the whole batch
  (TRL ``scale_rewards="batch"``; the "REINFORCE++-baseline" normalisation).
- ``scale="none"``: A_i = r_i − mean (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783, Eq. 3
  without the 1/std factor that causes the question-level difficulty bias).
- ``clip=(lo, hi)``: clamp A afterwards (the seed's ``advantage_clip: [0, 1]``; off by
  default since it discards every negative advantage).

"No opinion" rewards (TRL ≥ 1.6 behaviour, PR #5902): a reward function may return None
for a sample; the trainer stores it as NaN. :func:`combine_rewards` takes the weighted sum
with ``nansum`` and marks as *unscorable* every sample whose rewards are all NaN (its
total is 0, the empty nansum, so logged means stay finite; pass ``valid=~unscorable``).
:func:`group_advantages` leaves invalid (and NaN) samples out of their group's
mean and std and gives them advantage exactly 0, so they neither move the policy nor bias
the baseline. A group with fewer than two valid samples has nothing to compare and gets
advantage 0 throughout (TRL gets the same through its NaN std).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ccrl.objectives._checks import ObjectiveInputError, check_choice

ADVANTAGE_EPS = 1e-4
"""ε in A = (r − mean)/(std + ε), TRL's value"""

SCALES = ("group", "batch", "none")


class UnscorableWarning(UserWarning):
    """Some samples got None from every reward function; their advantage is set to 0."""


def combine_rewards(
    per_func: torch.Tensor, weights: Sequence[float] | torch.Tensor, warn: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of several reward functions with "no opinion" (NaN) entries skipped.

        total_b = Σ_f w_f · r_{b,f}   over the f where r_{b,f} is not NaN   (nansum, as TRL)

    A cost (e.g. the ICE energy term, subtracted in V_Ω = w_R·R + w_C·C_VIR − w_E·E_ICE)
    enters with a negative weight; ``rewards.is_cost(fn)`` tells the trainer which.

    Args:
        per_func: (B, F) rewards, NaN where a function returned None.
        weights: (F,) weights.
        warn: emit an :class:`UnscorableWarning` when some sample is unscorable.

    Returns:
        total: (B,) weighted sums; 0 for unscorable samples (exclude them with
            ``group_advantages(total, G, valid=~unscorable)``).
        unscorable: (B,) bool, True where every function returned None.
    """
    if per_func.dim() != 2:
        raise ObjectiveInputError(f"combine_rewards: per_func must be (B, F), got {list(per_func.shape)}")
    if not per_func.is_floating_point():
        per_func = per_func.float()
    w = torch.as_tensor(weights, dtype=per_func.dtype, device=per_func.device).reshape(-1)  # (F,)
    if w.numel() != per_func.shape[1]:
        raise ObjectiveInputError(
            f"combine_rewards: {w.numel()} weights for {per_func.shape[1]} reward functions"
        )
    unscorable = torch.isnan(per_func).all(dim=1)  # (B,)
    total = (per_func * w).nansum(dim=1)  # (B,); 0 where unscorable
    if warn and bool(unscorable.any()):
        idx = unscorable.nonzero().flatten().tolist()
        warnings.warn(
            f"{len(idx)} of {per_func.shape[0]} samples got None from every reward function "
            f"(indices {idx[:10]}{' ...' if len(idx) > 10 else ''}); their advantage is set to 0",
            UnscorableWarning,
            stacklevel=2,
        )
    return total, unscorable


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str | bool = "group",
    clip: tuple[float, float] | None = None,
    valid: torch.Tensor | None = None,
    eps: float = ADVANTAGE_EPS,
) -> torch.Tensor:
    """Group-relative advantages; consecutive blocks of ``group_size`` are one prompt's group.

        group: A_i = (r_i − mean_g) / (std_g + ε)      (GRPO, arXiv 2402.03300 §4.1.2)
        batch: A_i = (r_i − mean_g) / (std_batch + ε)
        none:  A_i =  r_i − mean_g                    (Dr. GRPO, arXiv 2503.20783)

    std is the unbiased (Bessel-corrected) sample std over the valid samples; invalid
    samples (``valid`` False, or reward NaN) are excluded from mean and std and get A = 0.
    ``clip=(lo, hi)`` clamps A after normalising (invalid samples stay 0).

    Args:
        rewards: (B,) scalar rewards, B = num_prompts · group_size.
        group_size: G.
        scale: "group" | "batch" | "none" (True → "group", False → "none", as TRL).
        clip: optional (lo, hi).
        valid: optional (B,) bool mask of scorable samples.
        eps: ε added to the std.

    Returns:
        (B,) advantages, no gradient to ``rewards`` needed (rewards are data).
    """
    if scale is True:
        scale = "group"
    elif scale is False:
        scale = "none"
    check_choice(scale, SCALES, "advantage scale", "group_advantages")
    if rewards.dim() != 1:
        raise ObjectiveInputError(f"group_advantages: rewards must be (B,), got {list(rewards.shape)}")
    n_total = rewards.numel()
    if group_size < 1 or n_total % group_size != 0:
        raise ObjectiveInputError(
            f"group_advantages: batch of {n_total} rewards is not a whole number of groups of {group_size}"
        )
    r = rewards if rewards.is_floating_point() else rewards.float()  # (B,)
    ok = ~torch.isnan(r)  # (B,)
    if valid is not None:
        if valid.shape != r.shape:
            raise ObjectiveInputError(
                f"group_advantages: valid{list(valid.shape)} must match rewards{list(r.shape)}"
            )
        ok = ok & valid.bool()
    g = r.view(-1, group_size)  # (N, G)
    m = ok.view(-1, group_size)  # (N, G)
    n = m.sum(dim=1, keepdim=True).to(r.dtype)  # (N, 1)
    mean = torch.where(m, g, 0).sum(dim=1, keepdim=True) / n.clamp(min=1)  # (N, 1)
    dev = torch.where(m, g - mean, 0)  # (N, G); 0 for invalid samples and singleton groups
    if scale == "group":
        std = ((dev**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # (N, 1)
        adv = dev / (std + eps)  # (N, G)
    elif scale == "batch":
        std = _masked_unbiased_std(r, ok)  # ()
        adv = dev / (std + eps)  # (N, G)
    else:
        adv = dev  # (N, G)
    adv = adv.reshape(-1)  # (B,)
    if clip is not None:
        lo, hi = clip
        adv = adv.clamp(lo, hi)
    return torch.where(ok, adv, 0)  # (B,)


def _masked_unbiased_std(r: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Unbiased std of r[ok] (0 when fewer than two valid values)."""
    n = ok.sum().to(r.dtype)  # ()
    mean = torch.where(ok, r, 0).sum() / n.clamp(min=1)  # ()
    var = torch.where(ok, r - mean, 0).pow(2).sum() / (n - 1).clamp(min=1)  # ()
    return var.sqrt()


def informative_groups(
    rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None, atol: float = 1e-6
) -> torch.Tensor:
    """Which groups carry a learning signal: at least two valid rewards that differ.

    DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, Eq. 11 constraint
    0 < |{o_i : is_equivalent(a, o_i)}| < G) keeps only such groups; with all-equal rewards
    every advantage is 0 and the group only dilutes the token-level normaliser.

    Args:
        rewards: (B,) with NaN for unscorable samples.
        valid: optional (B,) bool.
    Returns:
        (B // group_size,) bool.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ObjectiveInputError(
            f"informative_groups: rewards{list(rewards.shape)} is not a whole number of groups of {group_size}"
        )
    r = rewards if rewards.is_floating_point() else rewards.float()
    ok = ~torch.isnan(r) if valid is None else (~torch.isnan(r) & valid.bool())
    g = r.view(-1, group_size)  # (N, G)
    m = ok.view(-1, group_size)  # (N, G)
    hi = torch.where(m, g, -torch.inf).amax(dim=1)  # (N,)
    lo = torch.where(m, g, torch.inf).amin(dim=1)  # (N,)
    return (m.sum(dim=1) >= 2) & ((hi - lo) > atol)  # (N,)
