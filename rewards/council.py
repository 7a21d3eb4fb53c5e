"""Council consensus: how far the personas agree on the tokens the policy chose."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewards._common import column
from rewards.errors import RewardError
from rewards.registry import register

if TYPE_CHECKING:
    import torch

# torch is imported on the first call, not with the module: importing ``rewards`` (and so
# ``rewards.errors``, the root of ccrl's error types) stays standard-library only.


def _as_matrix(x: Any, key: str, i: int) -> torch.Tensor:
    import torch

    try:
        t = torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise RewardError(f"reward 'council_consensus': {key}[{i}] is not numeric: {e}") from None
    if t.dim() != 2:
        raise RewardError(
            f"reward 'council_consensus': {key}[{i}] has shape {list(t.shape)}; expected [T_i, P]"
        )
    if not torch.isfinite(t).all() or (t < 0).any():
        raise RewardError(f"reward 'council_consensus': {key}[{i}] has negative or non-finite entries")
    return t


@register("council_consensus")
def council_consensus(
    prompts: list,
    completions: list,
    *,
    council_weights: Any = None,
    chosen_token_probs: Any = None,
    **kwargs: Any,
) -> list[float | None]:
    """Mean over completion tokens of the council's relative support for the chosen token, in [0, 1].

        c_t = Σ_i α_i(s_t) · π_i(a_t|s_t) / max_{j: α_j>0} π_j(a_t|s_t) = π_Ω(a_t|s_t) / max_j π_j(a_t|s_t)
        C   = (1/T) Σ_t c_t

    Why this measure: c_t is the α-weighted mean, over personas, of each persona's
    probability for the chosen token relative to the persona that supports it most. It is
    1 exactly when every persona the overseer weighs gives a_t the same probability (they
    agree), and it falls towards 0 when the weight sits on personas that find a_t unlikely
    while another is confident. It measures agreement, not confidence: a unanimous hedge
    scores as high as a unanimous certainty, and it is scale-free in π(a_t). It needs only
    the P chosen-token probabilities the rollout records per token, not the (P, V)
    distributions a divergence-based measure (e.g. generalised Jensen–Shannon) would.
    α rows are renormalised (top-k weights may be passed); tokens where every weighted
    persona gives probability 0 are skipped.

    kwargs read: ``council_weights`` (per completion, [T_i, P] dense α at each generated
    token) and ``chosen_token_probs`` (per completion, [T_i, P] π_i(a_t) for each persona).
    Returns None for a sample without council statistics (a non-council policy) or with
    no generated token.

    >>> council_consensus(["q", "q"], ["ab", "ab"],
    ...     council_weights=[[[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]],
    ...     chosen_token_probs=[[[0.25, 0.25], [0.75, 0.75]], [[1.0, 0.5], [0.5, 0.0]]])
    [1.0, 0.625]
    """
    import torch

    n = len(completions)
    if council_weights is None or chosen_token_probs is None:
        return [None] * n
    alphas = column(council_weights, n, "council_weights", "council_consensus")
    probs = column(chosen_token_probs, n, "chosen_token_probs", "council_consensus")
    out: list[float | None] = []
    for i, (a, p) in enumerate(zip(alphas, probs)):
        if a is None or p is None:
            out.append(None)
            continue
        alpha, prob = _as_matrix(a, "council_weights", i), _as_matrix(p, "chosen_token_probs", i)  # (T, P)
        if alpha.shape != prob.shape:
            raise RewardError(
                f"reward 'council_consensus': sample {i}: council_weights {list(alpha.shape)} and "
                f"chosen_token_probs {list(prob.shape)} differ"
            )
        if (prob > 1 + 1e-6).any():
            raise RewardError(f"reward 'council_consensus': chosen_token_probs[{i}] has entries > 1")
        total = alpha.sum(-1, keepdim=True)  # (T, 1)
        if (total <= 0).any():
            raise RewardError(f"reward 'council_consensus': council_weights[{i}] has a row summing to 0")
        alpha = alpha / total  # (T, P)
        p_max = torch.where(alpha > 0, prob, 0).amax(-1) if alpha.shape[0] else prob.new_zeros(0)  # (T,)
        keep = p_max > 0  # (T,)
        if not keep.any():
            out.append(None)
            continue
        c = (alpha * prob).sum(-1)[keep] / p_max[keep]  # (T',)
        out.append(float(c.mean().clamp(0.0, 1.0)))
    return out
