"""The council formulas of DESIGN.md as pure tensor functions: one definition of each.

    α(s)     = softmax(overseer logits)                           dense over the P personas
    π_Ω(a|s) = Σ_i α_i(s) · π_i(a|s)                               the council mixture
    log π_Ω  = logsumexp_i (log α_i + log π_i)                     a mixture of probabilities, not of logits
    H_Ω      = − Σ_i α_i · log α_i                                 council entropy, on the dense α

With top-k routing the mixture runs over the k kept personas with α renormalised over them:
log α̃_i = log α_i − logsumexp_{j∈K} log α_j for i in K (−inf elsewhere). The mixture is the
output layer of a mixture of experts (cf. the mixture of softmaxes, Yang et al. 2018,
arXiv 1711.03953, Eq. 2); the entropy bonus is PPO's (arXiv 1707.06347, Eq. 9) applied to the
overseer rather than to the token distribution.

The policies (``policies.council_head``) compute their outputs with these functions (the
mixture through a faster twin with a hand-written backward, tested against
``mixture_logprobs``); ``ccrl.objectives`` exports them under the same names with its input
checks. No validation here: shapes are the caller's contract.
"""

from __future__ import annotations

import torch

__all__ = ["council_entropy", "kept_log_alpha", "mixture_logprobs", "topk_log_alpha"]


def council_entropy(alpha: torch.Tensor, log_alpha: torch.Tensor | None = None) -> torch.Tensor:
    """H_Ω = −Σ_i α_i log α_i over the last dim, in nats, in [0, log P].

    ``alpha`` (..., P) sums to 1 over the last dim. Given ``log_alpha`` (the exact
    ``log_softmax`` that ``alpha`` is the ``exp`` of, as a model has it) the sum is taken with it,
    so the gradient reaches every logit through both factors. Without it, 0·log 0 = 0 and the
    gradient at α_i = 0 is 0 (not −inf), so top-k-masked weights are safe. Returns (...).
    """
    if log_alpha is not None:
        return -(alpha * log_alpha).sum(-1)                                  # (...)
    positive = alpha > 0                                                     # (..., P)
    safe = torch.where(positive, alpha, 1)                                   # (..., P); log 1 = 0 where α = 0
    return -torch.where(positive, alpha * torch.log(safe), 0).sum(dim=-1)    # (...)


def mixture_logprobs(log_alpha: torch.Tensor, persona_logprobs: torch.Tensor) -> torch.Tensor:
    """log π_Ω = logsumexp_i (log α_i + log π_i): the council mixture in log space.

    ``log_alpha`` (..., P) log persona weights (top-k: from :func:`topk_log_alpha`, −inf outside
    the kept personas, which logsumexp ignores; or the k kept entries of :func:`kept_log_alpha`
    against the k kept personas' log-probs); ``persona_logprobs`` (..., P, V) log π_i.
    Returns (..., V).
    """
    return torch.logsumexp(log_alpha.unsqueeze(-1) + persona_logprobs, dim=-2)   # (..., V)


def topk_log_alpha(log_alpha: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest weights per row, renormalised over them; −inf elsewhere.

        log α̃_i = log α_i − logsumexp_{j∈topk} log α_j   for i in the top k, −inf otherwise

    ``log_alpha`` (..., P) → (..., P).
    """
    idx = log_alpha.topk(k, dim=-1).indices                                       # (..., k)
    keep = torch.zeros_like(log_alpha, dtype=torch.bool).scatter(-1, idx, True)  # (..., P)
    kept = log_alpha.masked_fill(~keep, -torch.inf)                               # (..., P)
    return kept - torch.logsumexp(kept, dim=-1, keepdim=True)                     # (..., P)


def kept_log_alpha(overseer_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log α̃ of the kept personas ``indices`` (..., k), from the overseer logits (..., P): (..., k).

    The gathered form of :func:`topk_log_alpha`: log_softmax over the kept logits equals
    log α_i − logsumexp_{j∈K} log α_j (the softmax's normaliser cancels), computed on k entries
    instead of P, for a model that gathers only the kept personas' log-probs.
    """
    return overseer_logits.gather(-1, indices).log_softmax(-1)                    # (..., k)
