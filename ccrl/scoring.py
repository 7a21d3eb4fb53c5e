"""Scoring completions with a recipe's reward terms: the V_Ω combination used everywhere.

    V_Ω = Σ_k w_k · r_k,   with cost terms (``ice``) entering as −w_E · E_ICE

Each recipe reward entry ``{name, weight, **params}`` is resolved through the ``rewards``
registry (or a ``package.module:function`` path), its params bound, and called with the TRL
signature ``fn(prompts, completions, **kwargs)``. kwargs carry the dataset columns of each row
(``answer`` and any extra column) and the rollout statistics the built-ins need:
``completion_ids``, ``completion_lengths``, ``max_completion_length``, ``council_weights``
(per completion [T_i, P]), ``chosen_token_probs`` ([T_i, P]), ``active_params_per_token`` and
``total_params``. Outputs are validated by ``rewards.call_reward`` (NaN, wrong length, raising
functions become a RewardError naming the function and sample); ``None`` means "no opinion" and
is skipped via ``combine_rewards`` (a sample with no opinion at all is marked unscorable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScoredBatch:
    """Rewards of N completions."""

    value: torch.Tensor                 # (N,) V_Ω (NaN-free; unscorable rows are 0)
    per_reward: dict[str, torch.Tensor]  # name → (N,) raw reward values (NaN where None)
    unscorable: torch.Tensor            # (N,) bool: every reward said None


class RewardSet:
    """The resolved, bound reward terms of a stage."""

    def __init__(self, specs):
        import rewards

        self.names: list[str] = []
        self.fns = []
        self.weights: list[float] = []
        seen: dict[str, int] = {}
        for spec in specs:
            fn = rewards.bind(spec.name, **spec.params)
            label = spec.name.split(":")[-1]
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}_{seen[label]}"
            sign = -1.0 if getattr(rewards.resolve(spec.name), "is_cost", False) else 1.0
            self.names.append(label)
            self.fns.append(fn)
            self.weights.append(sign * float(spec.weight))

    def __len__(self) -> int:
        return len(self.fns)

    def earned(self, per_reward: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_f w_f · r_f over this set's terms with a positive weight (NaN skipped): V_Ω without
        the costs, and without any entry of ``per_reward`` that is not one of this set's terms
        (the overlong penalty). What DAPO's dynamic sampling asks to vary within a group."""
        from ccrl.objectives import combine_rewards

        names = [n for n, w in zip(self.names, self.weights) if w > 0]
        n = next(iter(per_reward.values())).shape[0] if per_reward else 0
        if not names:
            return torch.zeros(n)
        per = torch.stack([per_reward[k] for k in names], dim=1)                  # (N, F+)
        w = [w for w in self.weights if w > 0]
        return combine_rewards(per, torch.tensor(w, dtype=torch.float32), warn=False)[0]

    def score(self, prompts: list[str], completions: list[str], **kwargs) -> ScoredBatch:
        import rewards
        from ccrl.objectives import combine_rewards

        cols = []
        for name, fn in zip(self.names, self.fns):
            vals = rewards.call_reward(fn, name, prompts, completions, **kwargs)
            cols.append([float("nan") if v is None else float(v) for v in vals])
        per = torch.tensor(cols, dtype=torch.float32).T if cols else torch.zeros((len(prompts), 0))  # (N, F)
        total, unscorable = combine_rewards(per, torch.tensor(self.weights, dtype=torch.float32))
        return ScoredBatch(value=total, per_reward={n: per[:, i] for i, n in enumerate(self.names)},
                           unscorable=unscorable)


def rollout_kwargs(rollout, examples: list, model=None, max_completion_length: int | None = None) -> dict:
    """The kwargs reward functions receive for a rollout: dataset columns + rollout statistics.

    ``examples`` has one entry per completion (already repeated per group)."""
    lengths = rollout.lengths.tolist()
    ids = [row[:n] for row, n in zip(rollout.completion_ids.tolist(), lengths)]
    kw = {
        "answer": [e.answer for e in examples],
        "completion_ids": ids,
        "completion_lengths": lengths,
        "max_completion_length": max_completion_length or int(rollout.completion_ids.shape[1]),
    }
    keys = sorted({k for e in examples for k in e.extra})
    for k in keys:
        kw[k] = [e.extra.get(k) for e in examples]
    if rollout.council_weights is not None:
        cw = rollout.council_weights.detach().cpu()
        kw["council_weights"] = [cw[i, :n] for i, n in enumerate(lengths)]
    if rollout.chosen_token_probs is not None:
        cp = rollout.chosen_token_probs.detach().cpu()
        kw["chosen_token_probs"] = [cp[i, :n] for i, n in enumerate(lengths)]
    if model is not None:
        counts = parameter_counts(model)
        if counts is not None:
            kw["active_params_per_token"], kw["total_params"] = counts
    return kw


def parameter_counts(model) -> tuple[int, int] | None:
    """(active parameters per token, total parameters) of a policy."""
    active = getattr(model, "active_parameters_per_token", None)
    total = sum(p.numel() for p in model.parameters())
    if callable(active):
        return int(active()), int(total)
    return int(total), int(total)
