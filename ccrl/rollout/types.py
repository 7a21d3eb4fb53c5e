"""The result of a rollout: :class:`Rollout` (N = B·G completions with what was recorded per token)
and :func:`concat_rollouts`, which stacks the rounds that dynamic sampling collects.

Recorded per completion token: the sampled id, its log-probability under the sampling policy
(log_softmax(logits / T), as TRL's GRPO computes π_old; top-k/top-p only restrict which tokens
can be drawn), the entropy of that distribution (the trainer's ``entropy`` metric), the
overseer's dense council weights α (Quillan / CouncilHead), each persona's probability of the
chosen token π_i(a_t) (for the council-consensus reward, when the policy exposes persona
log-probs), and the council layers' routed persona indices for the whole sequence (for routing
replay, R3 arXiv 2510.11370). Per completion: its token count and whether it was truncated at
``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """The result of sampling N = B·G completions. Tensors are on the policy's device."""

    prompt_ids: torch.Tensor          # (N, P) left-padded
    prompt_mask: torch.Tensor         # (N, P)
    completion_ids: torch.Tensor      # (N, T) right-padded with pad_token_id
    completion_mask: torch.Tensor     # (N, T) 1 on generated tokens (EOS included)
    logprobs: torch.Tensor            # (N, T) log π_old(a_t | s_t) at the sampling temperature
    lengths: torch.Tensor             # (N,) generated tokens
    truncated: torch.Tensor           # (N,) bool: hit max_new_tokens without EOS / stop sequence
    council_weights: torch.Tensor | None = None      # (N, T, P) dense α at each generated token
    chosen_token_probs: torch.Tensor | None = None   # (N, T, P) π_i(a_t) per persona
    routing_indices: tuple[torch.Tensor, ...] | None = None  # per council layer (N, P+T, k)
    group_size: int = 1
    decode_steps: int = 0
    entropies: torch.Tensor | None = None    # (N, T) entropy of the sampling distribution at each token

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)          # (N, P+T)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)        # (N, P+T)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (used by dynamic sampling)."""
        pick = lambda t: None if t is None else t[rows]
        return Rollout(
            prompt_ids=self.prompt_ids[rows], prompt_mask=self.prompt_mask[rows],
            completion_ids=self.completion_ids[rows], completion_mask=self.completion_mask[rows],
            logprobs=self.logprobs[rows], lengths=self.lengths[rows], truncated=self.truncated[rows],
            council_weights=pick(self.council_weights), chosen_token_probs=pick(self.chosen_token_probs),
            routing_indices=None if self.routing_indices is None else tuple(r[rows] for r in self.routing_indices),
            group_size=self.group_size, decode_steps=self.decode_steps, entropies=pick(self.entropies),
        )


def _pad_to(t: torch.Tensor, length: int, value, left: bool) -> torch.Tensor:
    """Pad dim 1 of ``t`` to ``length`` with ``value`` (a scalar or a tensor broadcastable to one column)."""
    n = length - t.shape[1]
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[1] = n
    fill = torch.empty(shape, dtype=t.dtype, device=t.device)
    fill[:] = value
    return torch.cat([fill, t] if left else [t, fill], dim=1)


def concat_rollouts(parts: list[Rollout], pad_token_id: int = 0) -> Rollout:
    """Stack rollouts row-wise (dynamic sampling collects several rounds): prompts re-padded on
    the left, completions on the right, routes split at the prompt boundary and padded likewise."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.completion_ids.shape[1] for p in parts)

    def cat(get, width, value, left):
        xs = [get(p) for p in parts]
        if any(x is None for x in xs):
            return None
        return torch.cat([_pad_to(x, width, value, left) for x in xs])

    routes = None
    if all(p.routing_indices is not None for p in parts):
        routes = []
        for layer in range(len(parts[0].routing_indices)):
            rows = []
            for p in parts:
                r = p.routing_indices[layer]
                pp = p.prompt_ids.shape[1]
                k = r.shape[-1]
                filler = torch.arange(k, device=r.device)
                rows.append(torch.cat([_pad_to(r[:, :pp], P, filler, True), _pad_to(r[:, pp:], T, filler, False)], 1))
            routes.append(torch.cat(rows))
        routes = tuple(routes)
    return Rollout(
        prompt_ids=cat(lambda p: p.prompt_ids, P, pad_token_id, True),
        prompt_mask=cat(lambda p: p.prompt_mask, P, 0, True),
        completion_ids=cat(lambda p: p.completion_ids, T, pad_token_id, False),
        completion_mask=cat(lambda p: p.completion_mask, T, 0, False),
        logprobs=cat(lambda p: p.logprobs, T, 0.0, False),
        lengths=torch.cat([p.lengths for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        council_weights=cat(lambda p: p.council_weights, T, 0.0, False),
        chosen_token_probs=cat(lambda p: p.chosen_token_probs, T, 0.0, False),
        routing_indices=routes, group_size=parts[0].group_size,
        decode_steps=sum(p.decode_steps for p in parts),
        entropies=cat(lambda p: p.entropies, T, 0.0, False),
    )
