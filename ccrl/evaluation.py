"""Held-out evaluation: greedy completions of held-out prompts, task accuracy and the V_Ω terms.

Every stage (pretrain and SFT included) is scored the same way after it ends, so the run
summary shows what each stage did to accuracy and to each reward term:
``heldout_accuracy`` (0–1, when the task has answers), ``reward/<name>`` (mean of each recipe
reward on the greedy completions) and ``value`` (mean V_Ω). A reward written for columns the
stage's rows do not have (the RL rows' ``answer``, on SFT chat rows) is not scored there: its
``reward/<name>`` is NaN and the reason is logged once (``ccrl.scoring``).
"""

from __future__ import annotations

import functools
import logging

import torch

from ccrl.rollout.engine import SamplingConfig, generate
from ccrl.scoring import RewardSet, RewardState, reward_inputs, rollout_kwargs

_log = logging.getLogger(__name__)


def complete(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 128,
             greedy: bool = True, temperature: float = 1.0, group_size: int = 1, generator=None):
    """Decode completions for ``prompts``; returns (texts, list of rollouts)."""
    texts, rollouts = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i: i + batch_size]
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in chunk]
        ro = generate(model, ids, SamplingConfig(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature),
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      group_size=group_size, generator=generator)
        texts.extend(decode_completions(tokenizer, ro))
        rollouts.append(ro)
    return texts, rollouts


def decode_completions(tokenizer, rollout) -> list[str]:
    """Completion texts without padding and without the EOS token."""
    eos = tokenizer.eos_token_id
    out = []
    for row, n in zip(rollout.completion_ids.tolist(), rollout.lengths.tolist()):
        row = row[:n]
        if row and row[-1] == eos:
            row = row[:-1]
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


@torch.no_grad()
def evaluate_policy(model, ctx, examples=None, state=None) -> dict[str, float]:
    """Greedy-decode the held-out prompts and score them (see module docstring). Rewards get their
    arguments as in training (``ccrl.scoring``); ``state`` is their ``trainer_state``."""
    examples = ctx.heldout if examples is None else examples
    if not examples:
        return {}
    cfg = ctx.eval_config
    max_new = cfg.max_new_tokens if cfg is not None else 16
    bs = cfg.batch_size if cfg is not None else 128
    prompts = [e.prompt for e in examples]
    texts, rollouts = complete(model, ctx.tokenizer, prompts, max_new, bs)
    metrics: dict[str, float] = {}
    if all(e.answer is not None for e in examples):
        # a built-in task knows how to compare; file data falls back to exact match after strip
        check = ctx.task.is_correct if ctx.task is not None else (lambda t, e: t.strip() == e.answer.strip())
        correct = [check(t, e) for t, e in zip(texts, examples)]
        metrics["heldout_accuracy"] = sum(correct) / len(correct)
    if ctx.reward_specs:
        state = state if state is not None else RewardState(global_step=0, max_steps=0)
        rs = RewardSet(ctx.reward_specs, heldout=True)
        values, per, not_scored = [], {n: [] for n in rs.names}, {}
        off = 0
        for ro in rollouts:
            n = ro.completion_ids.shape[0]
            exs = examples[off: off + n]
            kw = rollout_kwargs(ro, exs, model, max_new, state=state, tokenizer=ctx.tokenizer)
            sb = rs.score(*reward_inputs(exs, texts[off: off + n]), **kw)
            for k, why in sb.not_scored.items():
                not_scored.setdefault(k, why)
            values.append(sb.value)
            for k, v in sb.per_reward.items():
                per[k].append(v)
            off += n
        for k, v in per.items():
            t = torch.cat(v)
            t = t[~t.isnan()]
            metrics[f"reward/{k}"] = float(t.mean()) if t.numel() else float("nan")
        metrics["value"] = float(torch.cat(values).mean())
        for k, why in sorted(not_scored.items()):
            _tell_not_scored(getattr(state, "stage", "") or "", k, why)
    lengths = torch.cat([ro.lengths for ro in rollouts]).float()
    metrics["completion_tokens"] = float(lengths.mean())
    return metrics


@functools.cache
def _tell_not_scored(stage: str, reward: str, why: str) -> None:
    """Log once per stage, reward and reason that held-out scoring skipped the reward."""
    where = f"stage {stage!r}" if stage else "held-out scoring"
    _log.warning("%s: reward %r is not scored on these rows: %s (reward/%s is NaN here; the stages whose "
                 "rows have its columns score it)", where, reward, why, reward)
