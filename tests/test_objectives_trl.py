"""Cross-checks of ccrl.objectives against TRL 1.16 on identical tensors.

Where TRL exposes the computation as a function it is called directly
(``selective_log_softmax``, ``entropy_from_logits``, ``nanstd``, ORPO's
``odds_ratio_loss`` and ``get_batch_logps``, ``get_soft_overlong_punishment``). Where TRL
computes inside a trainer method (GRPO's advantages and ``_compute_loss``, DPO's
``_compute_loss``) the formula is reproduced line by line from
``trl/trainer/grpo_trainer.py`` / ``trl/trainer/dpo_trainer.py`` in the ``trl_*`` helpers
below, with TRL's variable names.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from ccrl.objectives import (
    combine_rewards,
    dpo_loss,
    group_advantages,
    orpo_loss,
    policy_loss,
    token_entropy,
    token_logprobs,
)

trl_utils = pytest.importorskip("trl.trainer.utils")
D = torch.float64


# --------------------------------------------------------------------------- log-probs and entropy


def test_token_logprobs_equals_trl_selective_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 50, generator=g)
    ids = torch.randint(0, 50, (4, 9), generator=g)
    for temperature in (1.0, 0.7):
        ours = token_logprobs(logits, ids, temperature=temperature, chunk_rows=5)
        theirs = trl_utils.selective_log_softmax(logits, ids, temperature=temperature)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # bf16: TRL does a bf16 log_softmax per row; we upcast per chunk (more accurate), so compare loosely
    lb = logits.bfloat16()
    torch.testing.assert_close(
        token_logprobs(lb, ids), trl_utils.selective_log_softmax(lb, ids).float(), rtol=0, atol=3e-2
    )


def test_token_entropy_equals_trl_entropy_from_logits():
    logits = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        token_entropy(logits, chunk_rows=4),
        trl_utils.entropy_from_logits(logits, chunk_size=3),
        rtol=0,
        atol=1e-6,
    )


# --------------------------------------------------------------------------- advantages


def trl_advantages(rewards_per_func, reward_weights, num_generations, scale_rewards):
    """GRPOTrainer._generate_and_score_completions, multi_objective_aggregation="sum_then_normalize"."""
    nanstd = trl_utils.nanstd
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:  # batch
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl(scale):
    g = torch.Generator().manual_seed(2)
    num_generations, n_prompts, n_funcs = 4, 6, 3
    per = torch.randn(n_prompts * num_generations, n_funcs, generator=g, dtype=D)
    per[per[:, 0] > 1.0, 1] = float("nan")  # some "no opinion" entries
    per[[1, 5, 6, 7], :] = float("nan")  # unscorable rows; group 1 keeps a single valid sample
    per[8:12] = per[8:9]  # group 2: all equal -> std 0
    weights = torch.tensor([1.0, 0.5, -0.25], dtype=D)
    expected = trl_advantages(per.clone(), weights, num_generations, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total, unscorable = combine_rewards(per, weights)
    ours = group_advantages(total, num_generations, scale=scale, valid=~unscorable)
    # TRL's nanstd computes Bessel's count/(count−1) on integer counts, i.e. in float32: ~1e-8 apart
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    # NaN in the rewards themselves is treated the same as an invalid mask
    nan_total = total.masked_fill(unscorable, float("nan"))
    torch.testing.assert_close(
        group_advantages(nan_total, num_generations, scale=scale), expected, rtol=0, atol=1e-6
    )


# --------------------------------------------------------------------------- policy loss


def trl_grpo_loss(
    per_token_logps,
    old_per_token_logps,
    ref_per_token_logps,
    advantages,
    mask,
    *,
    loss_type,
    importance_sampling_level,
    epsilon_low,
    epsilon_high,
    beta,
    max_completion_length,
    num_items_in_batch,
):
    """GRPOTrainer._compute_loss for loss_type grpo/bnpo/dr_grpo/dapo (1 process, no accumulation,
    no vLLM, no entropy mask, use_bias_correction_kl=False), plus its clip metrics."""
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    else:  # dapo
        loss = (per_token_loss * mask).sum() / num_items_in_batch.clamp(min=1.0)
    is_low = ((coef_1 < 1 - epsilon_low) & (advantages < 0)).float()
    is_high = ((coef_1 > 1 + epsilon_high) & (advantages > 0)).float()
    metrics = {}
    if importance_sampling_level == "token":
        metrics = {
            "clip_frac/low": (is_low * mask).sum() / mask.sum(),
            "clip_frac/high": (is_high * mask).sum() / mask.sum(),
            "clip_frac": (torch.maximum(is_low, is_high) * mask).sum() / mask.sum(),
        }
    if beta != 0.0:
        metrics["kl"] = (per_token_kl * mask).sum() / mask.sum()
    return loss, metrics


def _rollout(seed, b=6, t=8):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 3, 5, 1, 8, 6])[:b]
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(D)
    lp = -torch.rand(b, t, generator=g, dtype=D) * 3
    old = lp + 0.4 * torch.randn(b, t, generator=g, dtype=D)  # big enough to clip often
    ref = lp + 0.3 * torch.randn(b, t, generator=g, dtype=D)
    adv = torch.randn(b, generator=g, dtype=D)
    return lp, old, ref, adv, mask


# TRL loss_type -> ccrl aggregation (and how the global normaliser is passed)
LOSS_TYPES = {"grpo": "sequence", "bnpo": "token", "dr_grpo": "constant", "dapo": "token"}


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_equals_trl_grpo_compute_loss(loss_type, level, beta):
    lp, old, ref, adv, mask = _rollout(3)
    max_completion_length = 10
    # dapo's normaliser spans the generation batch: pretend this is half of it
    num_items_in_batch = mask.sum() * 2 if loss_type == "dapo" else None
    lp_ours = lp.clone().requires_grad_(True)
    lp_trl = lp.clone().requires_grad_(True)
    ours, m = policy_loss(
        lp_ours,
        old,
        adv,
        mask,
        eps_low=0.2,
        eps_high=0.28,
        aggregation=LOSS_TYPES[loss_type],
        ref_logprobs=ref,
        kl_beta=beta,
        max_tokens=max_completion_length,
        importance_sampling_level=level,
        num_tokens=num_items_in_batch,
    )
    theirs, tm = trl_grpo_loss(
        lp_trl,
        old,
        ref,
        adv,
        mask,
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=beta,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    (g_ours,) = torch.autograd.grad(ours, lp_ours)
    (g_trl,) = torch.autograd.grad(theirs, lp_trl)
    # TRL's unmasked padding positions get gradient only through masked-out terms (0); ours are exactly 0
    torch.testing.assert_close(g_ours, g_trl * (mask != 0), rtol=0, atol=1e-9)
    for key, value in tm.items():
        torch.testing.assert_close(m[key], value.detach(), rtol=0, atol=1e-9)
    if level == "token":
        assert m["clip_frac"] > 0  # the case actually exercises clipping


# --------------------------------------------------------------------------- DPO / IPO


def trl_dpo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, completion_mask, beta, loss_type
):
    """DPOTrainer._compute_loss, f_divergence_type="reverse_kl", one loss type (dpo_trainer.py)."""
    chosen_scores = chosen_logps - ref_chosen_logps
    rejected_scores = rejected_logps - ref_rejected_logps
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    else:  # ipo
        chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
        chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
        rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_scores.detach()
    rejected_rewards = beta * rejected_scores.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }
    return per_sequence_loss.mean(), metrics


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_equals_trl_dpo_trainer(loss_type):
    g = torch.Generator().manual_seed(4)
    b, t = 5, 7
    # the batch is [chosen; rejected], as TRL concatenates it
    completion_mask = (torch.arange(t)[None, :] < torch.randint(1, t + 1, (2 * b,), generator=g)[:, None]).to(
        D
    )
    per_token = -torch.rand(2 * b, t, generator=g, dtype=D) * 2
    ref_per_token = per_token + 0.2 * torch.randn(2 * b, t, generator=g, dtype=D)
    logps = (per_token * completion_mask).sum(1)
    ref_logps = (ref_per_token * completion_mask).sum(1)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    beta = 0.2
    theirs, tm = trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, completion_mask, beta, loss_type)
    lengths = completion_mask.sum(1).chunk(2)
    ours, m = dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_type=loss_type,
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    for key, value in tm.items():
        torch.testing.assert_close(
            m[key], value, rtol=0, atol=1e-6, check_dtype=False
        )  # TRL: float32 accuracies
    if loss_type == "ipo":  # without lengths: DESIGN's unnormalised Δ
        delta = (chosen - ref_chosen) - (rejected - ref_rejected)
        plain, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type="ipo")
        torch.testing.assert_close(plain, ((delta - 1 / (2 * beta)) ** 2).mean(), rtol=0, atol=1e-9)


def test_dpo_with_nll_weight_equals_trl_sigmoid_plus_sft():
    """nll_weight w is TRL's loss_type=["sigmoid", "sft"], loss_weights=[1, w]: "sft" is the token
    mean of the chosen completions' NLL over the batch (dpo_trainer.py, _compute_loss)."""
    g = torch.Generator().manual_seed(5)
    b, t, beta, w = 6, 5, 0.5, 0.7
    completion_mask = (torch.arange(t)[None, :] < torch.randint(1, t + 1, (2 * b,), generator=g)[:, None]).to(D)
    per_token = -torch.rand(2 * b, t, generator=g, dtype=D) * 2
    ref_per_token = per_token + 0.2 * torch.randn(2 * b, t, generator=g, dtype=D)
    logps, ref_logps = (per_token * completion_mask).sum(1), (ref_per_token * completion_mask).sum(1)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    sigmoid, _ = trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, completion_mask, beta, "sigmoid")
    chosen_mask, _ = completion_mask.chunk(2)
    sft = -per_token[:b][chosen_mask.bool()].mean()
    theirs = sigmoid * 1.0 + sft * w
    ours, m = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, nll_weight=w,
                       chosen_nll=-chosen.sum() / chosen_mask.sum())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    torch.testing.assert_close(m["nll_loss"], sft, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, nll_weight=w)


# --------------------------------------------------------------------------- ORPO


@pytest.fixture(scope="module")
def orpo_trainer_cls():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning on import
        mod = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    return mod.ORPOTrainer


def test_orpo_loss_equals_trl_odds_ratio_loss(orpo_trainer_cls):
    g = torch.Generator().manual_seed(5)
    b, t, v = 4, 6, 13
    logits = torch.randn(2 * b, t, v, generator=g)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[1, 4:] = -100  # padding
    # length-averaged log-probs, TRL's way and ours (TRL shifts labels by one)
    avg = orpo_trainer_cls.get_batch_logps(logits, labels, average_log_prob=True)
    shifted, shifted_logits = labels[:, 1:], logits[:, :-1]
    mask = (shifted != -100).float()
    ours_avg = (token_logprobs(shifted_logits, shifted.clamp(min=0)) * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(ours_avg, avg, rtol=0, atol=1e-6)
    chosen, rejected = avg[:b], avg[b:]
    nll = torch.tensor(1.7)
    stub = types.SimpleNamespace(beta=0.1, accelerator=types.SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = (
        orpo_trainer_cls.odds_ratio_loss(stub, chosen, rejected)
    )
    ours, m = orpo_loss(chosen, rejected, nll, beta=0.1)
    torch.testing.assert_close(
        ours, nll - losses.mean(), rtol=0, atol=1e-6
    )  # "loss = policy_nll_loss - losses.mean()"
    torch.testing.assert_close(m["log_odds_ratio"], log_odds_ratio, rtol=0, atol=1e-6)
    torch.testing.assert_close(m["log_odds_chosen"], log_odds_chosen, rtol=0, atol=1e-6)
    torch.testing.assert_close(m["rewards/chosen"], chosen_rewards.mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(m["rewards/rejected"], rejected_rewards.mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        m["rewards/accuracies"], (chosen_rewards > rejected_rewards).float().mean(), rtol=0, atol=1e-6
    )


# --------------------------------------------------------------------------- overlong reward


def test_overlong_equals_trl_soft_overlong_punishment():
    from trl.rewards import get_soft_overlong_punishment

    import rewards

    for l_max, l_cache in ((100, 20), (16, 4), (10, 0), (7, 7)):
        ids = [[1] * n for n in range(0, l_max + 3)]
        theirs = get_soft_overlong_punishment(l_max, l_cache)(ids)
        ours = rewards.overlong(
            ["q"] * len(ids),
            [""] * len(ids),
            completion_ids=ids,
            max_completion_length=l_max,
            overlong_cache=l_cache,
        )
        assert ours == pytest.approx(theirs, abs=1e-12), (l_max, l_cache)
