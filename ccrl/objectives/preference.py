"""Offline preference losses: DPO (sigmoid), IPO and ORPO on sequence log-probabilities.

DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7), with summed completion log-probs:

    Δ = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))
    sigmoid: loss = mean(−log σ(β·Δ))
    ipo:     loss = mean((Δ − 1/(2β))²)       (IPO, Azar et al. 2023, arXiv 2310.12036, Eq. 17;
                                               β plays the role of the paper's τ)
    + nll_weight · chosen_nll                  (optional: the NLL of the chosen completions, RPO,
                                               Pang et al. 2024, arXiv 2404.19733, Eq. 3; TRL 1.16:
                                               loss_type ["sigmoid", "sft"], loss_weights [1, w])

Without the NLL term, DPO on the policy's own (right, wrong) samples can lower the log-prob of
the right answers together with the wrong ones (the margin grows while both fall); RPO adds the
NLL of the chosen completions so that they rise.

IPO length normalisation: TRL 1.16's DPOTrainer divides each log-ratio by its completion's
token count before taking Δ ("we confirmed this choice with the IPO authors"). Pass
``chosen_lengths``/``rejected_lengths`` to get exactly TRL's number; without them Δ is the
unnormalised difference of summed log-ratios, as DESIGN.md states.

ORPO (Hong et al. 2024, arXiv 2403.07691, Eqs. 4, 6, 7), on length-averaged log-probs
c = log P(y_c|x)/|y_c| and r likewise:

    log_odds = (c − r) − (log(1 − e^c) − log(1 − e^r))
    loss = chosen_nll − β · mean(log σ(log_odds))            (β is the paper's λ; TRL's β)

All metrics are detached 0-dim tensors, named as TRL logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccrl.objectives._checks import check_choice, check_same_shape

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO / IPO loss on summed sequence log-probs; see the module docstring.

        sigmoid: mean(−log σ(β·Δ)),  ipo: mean((Δ − 1/(2β))²),
        Δ = (pc − rc) − (pr − rr),   + nll_weight · mean(chosen_nll)

    Args:
        policy_chosen, policy_rejected: (B,) Σ_t log π_θ over each completion.
        ref_chosen, ref_rejected: (B,) the same under the reference policy.
        beta: β (DPO temperature; IPO's τ).
        loss_type: "sigmoid" | "ipo".
        chosen_lengths, rejected_lengths: (B,) token counts; only used by "ipo", where
            each log-ratio is divided by its length first (TRL's normalisation).
        chosen_nll: () or (B,) the SFT negative log-likelihood of the chosen completions (a
            (B,) tensor is averaged); needed when ``nll_weight`` > 0.
        nll_weight: weight of ``chosen_nll`` in the loss (0: plain DPO / IPO).

    Returns:
        (loss, metrics) with ``rewards/chosen`` = mean β(pc − rc), ``rewards/rejected`` =
        mean β(pr − rr), ``rewards/margins``, ``rewards/accuracies`` (fraction with
        chosen reward > rejected reward), ``logps/chosen``, ``logps/rejected``, and
        ``nll_loss`` when ``chosen_nll`` is given.
    """
    check_same_shape(
        "dpo_loss",
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
    )
    check_choice(loss_type, DPO_LOSS_TYPES, "loss_type", "dpo_loss")
    if nll_weight < 0:
        raise ValueError(f"dpo_loss: nll_weight must be >= 0, got {nll_weight}")
    if nll_weight > 0 and chosen_nll is None:
        raise ValueError("dpo_loss: nll_weight > 0 needs chosen_nll, the NLL of the chosen completions")
    chosen_logratio = policy_chosen - ref_chosen  # (B,)
    rejected_logratio = policy_rejected - ref_rejected  # (B,)
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))  # (B,)
    else:
        c, r = chosen_logratio, rejected_logratio
        if chosen_lengths is not None:
            c = c / chosen_lengths.to(c.dtype).clamp(min=1)  # (B,)
        if rejected_lengths is not None:
            r = r / rejected_lengths.to(r.dtype).clamp(min=1)  # (B,)
        per_pair = (c - r - 1 / (2 * beta)) ** 2  # (B,)
    loss = per_pair.mean()  # ()
    nll = None if chosen_nll is None else chosen_nll.mean()  # ()
    if nll_weight > 0:
        loss = loss + nll_weight * nll
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratio  # (B,)
        rejected_rewards = beta * rejected_logratio  # (B,)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(loss.dtype).mean(),
            "logps/chosen": policy_chosen.mean(),
            "logps/rejected": policy_rejected.mean(),
        }
        if nll is not None:
            metrics["nll_loss"] = nll
    return loss, {k: v.detach() for k, v in metrics.items()}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, stable on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss = chosen_nll − β · mean(log σ(log_odds)) (arXiv 2403.07691 Eq. 6–7).

        log_odds = (c − r) − (log(1 − e^c) − log(1 − e^r))

    Args:
        chosen_logps, rejected_logps: (B,) length-averaged log-probs, each < 0.
        chosen_nll: () or (B,) the SFT negative log-likelihood of the chosen completions
            (a (B,) tensor is averaged).
        beta: λ, the weight of the odds-ratio term.

    Returns:
        (loss, metrics) with ``nll_loss``, ``log_odds_ratio`` (mean log σ(log_odds)),
        ``log_odds_chosen`` (mean log_odds), ``rewards/chosen`` = mean β·c,
        ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
        ``logps/chosen``, ``logps/rejected`` (TRL's names).
    """
    check_same_shape("orpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))  # (B,)
    log_sig = F.logsigmoid(log_odds)  # (B,)
    nll = chosen_nll.mean()  # ()
    loss = nll - beta * log_sig.mean()  # ()
    with torch.no_grad():
        chosen_rewards = beta * chosen_logps  # (B,)
        rejected_rewards = beta * rejected_logps  # (B,)
        metrics = {
            "nll_loss": nll,
            "log_odds_ratio": log_sig.mean(),
            "log_odds_chosen": log_odds.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(loss.dtype).mean(),
            "logps/chosen": chosen_logps.mean(),
            "logps/rejected": rejected_logps.mean(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
