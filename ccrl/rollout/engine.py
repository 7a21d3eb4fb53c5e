"""Batched sampling with a KV cache, for any policy: Quillan, CouncilHead, or a plain HF causal LM.

One prefill per distinct prompt: the prompt batch [B, P] runs once, then its KV cache and last
logits are repeated G times (``DynamicCache.batch_repeat_interleave``), so a GRPO group costs one
prompt forward instead of G. The decode loop is the only per-token Python; inside it every
operation is batched. Rows that have finished (EOS or a stop sequence) stop costing compute:
when enough of them are done the cache is compacted to the live rows
(``DynamicCache.batch_select_indices``), so the remaining decode steps run on a smaller batch.

Recorded per completion token: the sampled id, its log-probability under the sampling policy
(log_softmax(logits / T), as TRL's GRPO computes π_old; top-k/top-p only restrict which tokens can
be drawn), the overseer's dense council weights α (Quillan / CouncilHead), each persona's
probability of the chosen token π_i(a_t) (for the council-consensus reward), and the council
layers' routed persona indices for the whole sequence (for routing replay, R3 arXiv 2510.11370).
Per completion: its token count and whether it was truncated at ``max_new_tokens``.

Why not ``model.generate``: it cannot share the prompt prefill across a group, does not return
the council statistics or routes, and keeps finished rows in the batch until the longest ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SamplingConfig:
    """How completions are drawn."""

    max_new_tokens: int = 16
    """length limit of a completion"""
    temperature: float = 1.0
    """softmax temperature (ignored when greedy)"""
    top_p: float = 1.0
    """nucleus sampling threshold (1: off)"""
    top_k: int = 0
    """keep only the k most likely tokens (0: off)"""
    greedy: bool = False
    """argmax decoding (evaluation)"""
    stop_sequences: list[list[int]] = field(default_factory=list)
    """token-id sequences that end a completion (besides EOS); the stop tokens are kept"""
    compact_fraction: float = 0.25
    """compact the batch when at least this fraction of live rows has finished"""


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
            group_size=self.group_size, decode_steps=self.decode_steps,
        )


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, mask) of shape (B, max_len)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s):] = 1
    return ids.to(device), mask.to(device)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k / nucleus (top-p) set with -inf. logits: (N, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                          # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)              # (N, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p                           # keep the token crossing p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _persona_token_probs(out, tokens: torch.Tensor) -> torch.Tensor | None:
    """π_i(a_t) for each persona, if the policy exposes per-persona log-probs. Returns (N, P) or None."""
    plp = getattr(out, "persona_logprobs", None)          # (N, 1, P, V) when present
    if plp is None:
        return None
    plp = plp[:, -1]                                      # (N, P, V)
    idx = tokens.view(-1, 1, 1).expand(-1, plp.shape[1], 1)
    return plp.gather(-1, idx).squeeze(-1).float().exp()  # (N, P)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    *,
    eos_token_id: int,
    pad_token_id: int,
    group_size: int = 1,
    generator: torch.Generator | None = None,
    record_council: bool = True,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt (token-id lists). Rows are ordered
    prompt-major: rows ``[i*G, (i+1)*G)`` are prompt i's group."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, sampling, eos_token_id, pad_token_id, group_size, generator,
                         record_council, device)
    finally:
        model.train(was_training)


def _generate(model, prompts, sampling, eos_id, pad_id, G, generator, record_council, device) -> Rollout:
    from transformers import DynamicCache

    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)                 # (B, P)
    B, P = prompt_ids.shape
    N, T = B * G, sampling.max_new_tokens
    pos = (prompt_mask.cumsum(-1) - 1).clamp_min(0)                              # (B, P)
    cache = DynamicCache()
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos,
                past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1].float()                                          # (B, V)
    council = getattr(out, "council_weights", None) if record_council else None
    routes = getattr(out, "routing_indices", None) if record_council else None
    routes = tuple(routes) if routes else None
    if G > 1:
        cache.batch_repeat_interleave(G)
        logits = logits.repeat_interleave(G, 0)                                 # (N, V)
    prompt_ids = prompt_ids.repeat_interleave(G, 0)                             # (N, P)
    prompt_mask = prompt_mask.repeat_interleave(G, 0)
    plp_last = _repeat_last_persona(out, G)

    completion = torch.full((N, T), pad_id, dtype=torch.long, device=device)    # (N, T)
    logprobs = torch.zeros((N, T), device=device)
    alpha = None
    if council is not None:
        alpha = torch.zeros((N, T, council.shape[-1]), device=device)
        alpha_last = council[:, -1].float().repeat_interleave(G, 0)             # (N, P)
    chosen_p = None
    route_buf = None
    if routes is not None:
        # positions never fed through the model (padding, the last sampled token) keep distinct
        # placeholder routes 0..k-1; they do not influence any completion token's log-prob
        route_buf = [torch.arange(r.shape[-1], device=device).expand(N, P + T, -1).clone() for r in routes]
        for buf, r in zip(route_buf, routes):
            buf[:, :P] = r.repeat_interleave(G, 0)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    truncated = torch.zeros(N, dtype=torch.bool, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    live = torch.arange(N, device=device)                                        # rows still in the batch
    mask = prompt_mask.clone()                                                   # (n_live, P + t)
    next_pos = prompt_mask.sum(-1)                                              # (n_live,)
    stops = [torch.tensor(s, device=device) for s in sampling.stop_sequences if s]
    steps = 0
    for t in range(T):
        steps += 1
        scaled = logits if sampling.greedy else logits / sampling.temperature
        logp = F.log_softmax(scaled, dim=-1)                                    # (n_live, V)
        if sampling.greedy:
            tok = logp.argmax(-1)
        else:
            probs = _filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (n_live,)
        alive = ~done[live]                                                     # (n_live,)
        rows = live[alive]
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        completion[rows, t] = tok[alive]
        logprobs[rows, t] = logp.gather(-1, tok[:, None]).squeeze(-1)[alive]
        lengths[rows] += 1
        if alpha is not None:
            alpha[rows, t] = alpha_last[alive]
        if plp_last is not None:
            if chosen_p is None:
                chosen_p = torch.zeros((N, T, plp_last.shape[1]), device=device)
            chosen_p[rows, t] = plp_last.gather(-1, tok.view(-1, 1, 1).expand(-1, plp_last.shape[1], 1)).squeeze(-1)[alive].float().exp()
        finished = tok == eos_id
        for s in stops:
            if t + 1 >= len(s):
                tail = completion[live, t + 1 - len(s): t + 1]
                finished |= (tail == s).all(-1)
        done[rows] |= finished[alive]
        if bool(done.all()) or t == T - 1:
            break
        # drop finished rows from the batch when enough of them have accumulated
        n_done = int((done[live]).sum())
        if n_done and n_done >= sampling.compact_fraction * live.numel():
            keep = (~done[live]).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            live, tok, mask, next_pos = live[keep], tok[keep], mask[keep], next_pos[keep]
            alpha_last = alpha_last[keep] if alpha is not None else None
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)           # (n_live, P + t + 1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        if alpha is not None:
            alpha_last = out.council_weights[:, -1].float()
        plp_last = _repeat_last_persona(out, 1)
        if route_buf is not None:
            for buf, r in zip(route_buf, out.routing_indices):
                buf[live, P + t] = r[:, -1]                          # routes of the token fed at P + t
    truncated = ~done
    Tm = int(lengths.max()) if N else 0
    cmask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).long()
    if route_buf is not None:
        route_buf = tuple(b[:, : P + Tm] for b in route_buf)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        completion_ids=completion[:, :Tm], completion_mask=cmask[:, :Tm], logprobs=logprobs[:, :Tm],
        lengths=lengths, truncated=truncated,
        council_weights=None if alpha is None else alpha[:, :Tm],
        chosen_token_probs=None if chosen_p is None else chosen_p[:, :Tm],
        routing_indices=route_buf, group_size=G, decode_steps=steps,
    )


def _repeat_last_persona(out, G: int) -> torch.Tensor | None:
    plp = getattr(out, "persona_logprobs", None)          # (n, t, P, V)
    if plp is None:
        return None
    last = plp[:, -1]
    return last.repeat_interleave(G, 0) if G > 1 else last


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
    )
