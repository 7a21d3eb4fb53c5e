"""The PPO clipped surrogate of the GRPO family, and loss aggregation kept apart from it.

Per token (PPO, Schulman et al. 2017, arXiv 1707.06347, Eq. 7; GRPO arXiv 2402.03300 Eq. 3;
DAPO arXiv 2503.14476 Eq. 8 for the asymmetric clip):

    ρ_t = π_θ(a_t|s_t) / π_θold(a_t|s_t) = exp(logprobs − old_logprobs)
    ℓ_t = −min(ρ_t·A, clip(ρ_t, 1−ε_low, 1+ε_high)·A) + β_KL·k3_t
    k3_t = exp(ref − logprobs) − (ref − logprobs) − 1          (Schulman's k3 estimator of
                                                               KL(π_θ‖π_ref), GRPO Eq. 4)

With ``importance_sampling_level="sequence"`` (GSPO, Zheng et al. 2025, arXiv 2507.18071,
Eq. 5–7) one ratio per completion replaces ρ_t:

    s_i = (π_θ(y_i|x) / π_θold(y_i|x))^{1/|y_i|} = exp(mean_t (logprobs − old_logprobs))

and every token of completion i uses s_i (so a completion is clipped as a whole).

Aggregation (:func:`aggregate`) turns ℓ (B, T) into a scalar:

    sequence (GRPO):      (1/B) Σ_i (Σ_t ℓ_it m_it / Σ_t m_it)
    token (DAPO Eq. 8):   Σ_it ℓ_it m_it / Σ_it m_it
    constant (Dr. GRPO):  Σ_it ℓ_it m_it / (B · max_tokens)

Metrics (all detached 0-dim tensors, so logging them costs no device sync until the
trainer reads them), computed over the valid tokens of this call:

- ``clip_frac/low``: fraction of tokens with ρ < 1−ε_low and A < 0 (the gradient is
  clipped away), ``clip_frac/high``: ρ > 1+ε_high and A > 0, ``clip_frac``: either
  (TRL's ``clip_ratio/low_mean|high_mean|region_mean``; for sequence-level ratios every
  token of a clipped completion counts, as the GSPO paper's token clipping fraction).
- ``approx_kl``: mean over tokens of k3 of old vs new, (ρ_t − 1) − log ρ_t with the
  per-token ρ_t: an unbiased estimate of KL(π_old‖π_θ) under the rollout distribution.
- ``kl``: mean over tokens of k3_t to the reference (0 when no ``ref_logprobs``).
- ``ratio/mean``, ``ratio/min``, ``ratio/max``: of the ratio used in the loss (ρ_t or
  s_i broadcast to its tokens); 1 when there is no valid token.
- ``loss/policy``: the aggregated clipped surrogate alone, ``loss/kl``: β_KL times the
  aggregated k3 (``loss = loss/policy + loss/kl``), ``entropy_bonus``: 0 here (CCRL's
  :func:`ccrl.objectives.ccrl_loss` fills it in).

Deviation from TRL: with sequence-level ratios TRL multiplies the KL term by s_i
(``use_bias_correction_kl``); here the KL term is the plain k3 of DESIGN.md.

How a trainer uses the global normalisers (micro-batching, gradient accumulation, DDP)
-------------------------------------------------------------------------------------
Summing micro-batch losses only reproduces the whole-batch loss if every micro-batch
divides by the *whole* batch's count. For an optimizer step over a batch split into
micro-batches (and over W data-parallel ranks whose gradients DDP averages):

    num_sequences = completions in the step, over all micro-batches and ranks, / W
    num_tokens    = valid completion tokens in the step, all micro-batches and ranks, / W
    max_tokens    = max_completion_length (not the micro-batch's padded T)

then call ``policy_loss(..., num_sequences=..., num_tokens=..., max_tokens=...)`` on each
micro-batch and ``backward()`` each loss without further division. The accumulated
gradient then equals the gradient of the whole-batch loss (tested to 1e-6). Leaving
them None normalises by the micro-batch's own counts (TRL's ``bnpo`` behaviour for
``token``), which weights tokens unequally across micro-batches.
"""

from __future__ import annotations

import torch

from ccrl.objectives._checks import ObjectiveInputError, check_choice, check_same_shape

AGGREGATIONS = ("sequence", "token", "constant")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

Count = int | float | torch.Tensor


def _positive(count: Count, like: torch.Tensor) -> Count:
    """A normaliser that is never 0 (an empty batch then gives loss 0, not NaN)."""
    if isinstance(count, torch.Tensor):
        count = count.to(like.dtype)
        return torch.where(count > 0, count, torch.ones_like(count))
    return float(count) if count > 0 else 1.0


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    max_tokens: int | None = None,
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar (sequence | token | constant).

        sequence: (1/N_seq) Σ_i (Σ_t ℓ_it m_it / Σ_t m_it)    (GRPO, arXiv 2402.03300 Eq. 3)
        token:    Σ_it ℓ_it m_it / N_tok                       (DAPO, arXiv 2503.14476 Eq. 8)
        constant: Σ_it ℓ_it m_it / (N_seq · max_tokens)        (Dr. GRPO, arXiv 2503.20783 Eq. 3)

    N_seq defaults to B and N_tok to Σ m; pass the counts of the whole optimizer step to
    make micro-batch losses sum to the whole-batch loss (see the module docstring).
    ``max_tokens`` defaults to T. Masked positions never contribute, even if ℓ is NaN
    there; a completion with no valid token contributes 0 to ``sequence``.

    Args:
        per_token: (B, T), or (B, 1) for one value per completion (broadcast over T).
        mask: (B, T), bool or 0/1 (float weights are used as weights).
    Returns:
        () scalar loss.
    """
    check_choice(mode, AGGREGATIONS, "aggregation", "aggregate")
    if mask.dim() != 2 or per_token.dim() != 2 or per_token.shape[0] != mask.shape[0]:
        raise ObjectiveInputError(
            f"aggregate: per_token{list(per_token.shape)} and mask{list(mask.shape)} must be (B, T)"
        )
    per_token = per_token.expand(mask.shape)  # (B, T)
    w = mask.to(per_token.dtype)  # (B, T)
    x = torch.where(w != 0, per_token, 0) * w  # (B, T)
    n_seq, n_tok = mask.shape
    if mode == "token":
        denom = w.sum() if num_tokens is None else num_tokens
        return x.sum() / _positive(denom, x)
    seqs = n_seq if num_sequences is None else num_sequences
    if mode == "sequence":
        per_seq = x.sum(dim=-1) / w.sum(dim=-1).clamp(min=1)  # (B,)
        return per_seq.sum() / _positive(seqs, x)
    length = n_tok if max_tokens is None else max_tokens
    return x.sum() / _positive(seqs * length, x)


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    x = x.expand(valid.shape)
    return torch.where(valid, x, 0).sum() / valid.sum().clamp(min=1)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "sequence",
    ref_logprobs: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    max_tokens: int | None = None,
    importance_sampling_level: str = "token",
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate policy loss with optional k3 KL; see the module docstring.

        ℓ_t = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) + β_KL·(e^{ref−lp} − (ref−lp) − 1)
        loss = aggregate(ℓ, mask, aggregation)

    Args:
        logprobs: (B, T) log π_θ of the sampled tokens (differentiable).
        old_logprobs: (B, T) log π_θold (the rollout's), treated as constants.
        advantages: (B,) one per completion, or (B, T) per token.
        mask: (B, T) 1 on completion tokens, 0 on padding.
        eps_low, eps_high: the clip range (GRPO 0.2/0.2, DAPO 0.2/0.28, GSPO 3e-4/4e-4).
        aggregation: "sequence" | "token" | "constant".
        ref_logprobs: (B, T) log π_ref, for the KL penalty and the ``kl`` metric.
        kl_beta: β_KL (needs ``ref_logprobs`` when non-zero).
        max_tokens: the ``constant`` normaliser's length (max_completion_length).
        importance_sampling_level: "token" (PPO/GRPO) or "sequence" (GSPO).
        num_sequences, num_tokens: global normalisers (see :func:`aggregate`).

    Returns:
        (loss, metrics): loss is a differentiable scalar; metrics are detached 0-dim tensors.
    """
    check_same_shape(
        "policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, mask=mask, ref_logprobs=ref_logprobs
    )
    if logprobs.dim() != 2:
        raise ObjectiveInputError(f"policy_loss: logprobs must be (B, T), got {list(logprobs.shape)}")
    check_choice(
        importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level", "policy_loss"
    )
    check_choice(aggregation, AGGREGATIONS, "aggregation", "policy_loss")
    if kl_beta != 0.0 and ref_logprobs is None:
        raise ObjectiveInputError("policy_loss: kl_beta is non-zero but no ref_logprobs were given")
    adv = _broadcast_advantages(advantages, logprobs)  # (B, 1) or (B, T)
    valid = mask != 0  # (B, T)
    w = mask.to(logprobs.dtype)  # (B, T)
    delta = torch.where(valid, logprobs - old_logprobs.detach(), 0)  # (B, T)
    if importance_sampling_level == "token":
        log_ratio = delta  # (B, T)
    else:
        log_ratio = (delta * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    ratio = torch.exp(log_ratio)  # (B, T) or (B, 1)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)  # (B, T) or (B, 1)
    surrogate = -torch.min(ratio * adv, clipped * adv)  # (B, T) or (B, 1)
    per_token = surrogate
    kl_t = None
    if ref_logprobs is not None:
        d = torch.where(valid, ref_logprobs.detach() - logprobs, 0)  # (B, T)
        kl_t = torch.exp(d) - d - 1  # (B, T)
        if kl_beta != 0.0:
            per_token = surrogate + kl_beta * kl_t  # (B, T)
    norms = dict(max_tokens=max_tokens, num_sequences=num_sequences, num_tokens=num_tokens)
    loss = aggregate(per_token, mask, aggregation, **norms)  # ()

    with torch.no_grad():
        loss_pg = aggregate(surrogate, mask, aggregation, **norms)
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(w.dtype)  # (B, T) or (B, 1)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(w.dtype)
        has_any = valid.any()
        r_tok = ratio.expand(valid.shape)  # (B, T)
        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        metrics = {
            "loss/policy": loss_pg.detach(),
            "loss/kl": (loss - loss_pg).detach() if kl_beta != 0.0 else zero,
            "clip_frac/low": _masked_mean(low, valid),
            "clip_frac/high": _masked_mean(high, valid),
            "clip_frac": _masked_mean(torch.maximum(low, high), valid),
            "approx_kl": _masked_mean(torch.exp(delta) - 1 - delta, valid),
            "kl": _masked_mean(kl_t, valid) if kl_t is not None else zero,
            "ratio/mean": torch.where(has_any, _masked_mean(r_tok, valid), one),
            "ratio/min": torch.where(has_any, torch.where(valid, r_tok, torch.inf).min(), one),
            "ratio/max": torch.where(has_any, torch.where(valid, r_tok, -torch.inf).max(), one),
            "entropy_bonus": zero,
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def _broadcast_advantages(advantages: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    batch = logprobs.shape[0]
    if advantages.dim() == 1 and advantages.shape[0] == batch:
        return advantages.detach().to(logprobs.dtype)[:, None]  # (B, 1)
    if (
        advantages.dim() == 2
        and advantages.shape[0] == batch
        and advantages.shape[1] in (1, logprobs.shape[1])
    ):
        return advantages.detach().to(logprobs.dtype)  # (B, T) or (B, 1)
    raise ObjectiveInputError(
        f"policy_loss: advantages{list(advantages.shape)} must be (B,) or (B, T) for logprobs{list(logprobs.shape)}"
    )
