"""The council terms of the CCRL objective: mixture log-probs, council entropy, the CCRL loss.

DESIGN.md, "The formulas":

    π_Ω(a|s) = Σ_{i=1..P} α_i(s) · π_i(a|s)                      (the council mixture)
    J(θ)     = E_{s,a~π_Ω}[A_Ω(s,a)] + β · H_Ω(π_Ω(s))
    H_Ω      = − Σ_i α_i(s) · log α_i(s)                         (council entropy, β = 0.05)

α(s) is the overseer's dense softmax over the P personas. The mixture is one of
probabilities, not of logits, so it is computed in log space as
log π_Ω = logsumexp_i(log α_i + log π_i) (a mixture-of-experts output layer; cf. the
mixture of softmaxes, Yang et al. 2018, arXiv 1711.03953, Eq. 2). The entropy bonus keeps
the overseer from collapsing onto one persona (the analogue of PPO's entropy bonus,
arXiv 1707.06347 Eq. 9, applied to the router rather than to the token distribution).
"""

from __future__ import annotations

import torch

from ccrl.objectives._checks import ObjectiveInputError
from ccrl.objectives.policy import Count, aggregate, policy_loss

# The formulas live in ``policies.council_math`` (policies sit below ccrl and compute the same
# quantities in the model); these are that module's functions with ccrl's input checks. It is
# imported on the first call: importing ccrl.objectives stays standard library and torch.


def council_entropy(alpha: torch.Tensor) -> torch.Tensor:
    """H_Ω = −Σ_i α_i log α_i over the last dim, with 0·log 0 = 0 (DESIGN.md, H_Ω).

    The gradient at α_i = 0 is taken as 0 (not −inf), so top-k-masked weights are safe.
    (``policies.council_math.council_entropy``.)

    Args:
        alpha: (..., P) persona weights (each row sums to 1).
    Returns:
        (...) entropies in nats, in [0, log P].
    """
    from policies import council_math

    return council_math.council_entropy(alpha)  # (...)


def mixture_logprobs(log_alpha: torch.Tensor, persona_logprobs: torch.Tensor) -> torch.Tensor:
    """log π_Ω = logsumexp_i (log α_i + log π_i), the council mixture in log space (DESIGN.md, π_Ω).

    With top-k routing pass ``log_alpha`` from :func:`topk_log_alpha` (−inf outside the
    k kept personas, renormalised over them); logsumexp ignores the −inf terms.
    (``policies.council_math.mixture_logprobs``.)

    Args:
        log_alpha: (..., P) log persona weights.
        persona_logprobs: (..., P, V) log π_i over the vocabulary.
    Returns:
        (..., V) log π_Ω.
    """
    if persona_logprobs.shape[:-1] != log_alpha.shape:
        raise ObjectiveInputError(
            f"mixture_logprobs: persona_logprobs{list(persona_logprobs.shape)} must be log_alpha"
            f"{list(log_alpha.shape)} plus a vocabulary dim"
        )
    from policies import council_math

    return council_math.mixture_logprobs(log_alpha, persona_logprobs)  # (..., V)


def topk_log_alpha(log_alpha: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest weights per row, renormalised over them; −inf elsewhere.

        log α'_i = log α_i − logsumexp_{j∈topk} log α_j   for i in the top k, −inf otherwise

    (``policies.council_math.topk_log_alpha``.)

    Args:
        log_alpha: (..., P).
    Returns:
        (..., P).
    """
    if not 1 <= k <= log_alpha.shape[-1]:
        raise ObjectiveInputError(f"topk_log_alpha: k={k} must be in [1, {log_alpha.shape[-1]}]")
    from policies import council_math

    return council_math.topk_log_alpha(log_alpha, k)  # (..., P)


def ccrl_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    council_alpha: torch.Tensor,
    beta: float = 0.05,
    **policy_loss_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CCRL loss = policy_loss − β · H̄_Ω, with H̄_Ω = Σ_t H_Ω(α_t)·m_t / Σ_t m_t.

    This is −J(θ) of DESIGN.md: the clipped surrogate of A_Ω (:func:`policy_loss`, all its
    options pass through) minus the council entropy bonus averaged over completion tokens.
    When ``num_tokens`` is given (a global token count for micro-batching), H̄_Ω divides by
    it too, so micro-batch losses still sum to the whole-batch loss.

    Args:
        logprobs, old_logprobs, advantages, mask: as :func:`policy_loss`.
        council_alpha: (B, T, P) the overseer's dense α at each completion token.
        beta: β of the council entropy bonus.

    Returns:
        (loss, metrics): the metrics of :func:`policy_loss` plus ``council_entropy`` (H̄_Ω
        over this call's valid tokens) and ``entropy_bonus`` (β·H̄_Ω as subtracted from
        the loss), detached 0-dim tensors.
    """
    if council_alpha.dim() != 3 or council_alpha.shape[:2] != logprobs.shape:
        raise ObjectiveInputError(
            f"ccrl_loss: council_alpha{list(council_alpha.shape)} must be (B, T, P) for "
            f"logprobs{list(logprobs.shape)}"
        )
    loss_pg, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, **policy_loss_kwargs)
    h = council_entropy(council_alpha).to(loss_pg.dtype)  # (B, T)
    num_tokens: Count | None = policy_loss_kwargs.get("num_tokens")
    h_bar = aggregate(h, mask, "token", num_tokens=num_tokens)  # ()
    loss = loss_pg - beta * h_bar  # ()
    with torch.no_grad():
        metrics["council_entropy"] = aggregate(h, mask, "token").detach()
        metrics["entropy_bonus"] = (beta * h_bar).detach()
    return loss, metrics
