"""Batched sampling with a KV cache, for any policy: Quillan, CouncilHead, or a plain HF causal LM.

One prefill per distinct prompt: the prompt batch [B, P] runs once (computing the logits of its
last position only), then its KV cache and last logits are repeated G times, so a GRPO group
costs one prompt forward instead of G. The decode loop is the only per-token Python; inside it
every operation is batched and there is one host sync per step (how many rows are done). The KV
cache (:class:`RolloutCache`) is allocated once for prompt + ``max_new_tokens`` and filled in
place, where ``DynamicCache`` concatenates and so copies the whole cache at every step. Rows
that have finished (EOS or a stop sequence) stop costing compute: when enough of them are done
the cache is compacted to the live rows, so the remaining decode steps run on a smaller batch.
Ternary (QAT) weights are quantised once per rollout (``policies.ternary.frozen_quantization``),
not once per decode step.

Recorded per completion token: the sampled id, its log-probability under the sampling policy
(log_softmax(logits / T), as TRL's GRPO computes π_old; top-k/top-p only restrict which tokens
can be drawn), the entropy of that distribution (the trainer's ``entropy`` metric), the
overseer's dense council weights α (Quillan / CouncilHead), each persona's probability of the
chosen token π_i(a_t) (for the council-consensus reward, when the policy exposes persona
log-probs), and the council layers' routed persona indices for the whole sequence (for routing
replay, R3 arXiv 2510.11370). Per completion: its token count and whether it was truncated at
``max_new_tokens``.

Why not ``model.generate``: it cannot share the prompt prefill across a group, does not return
the council statistics or routes, and keeps finished rows in the batch until the longest ends.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


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


def _sample(probs: torch.Tensor, live: torch.Tensor, n_rows: int, generator) -> torch.Tensor:
    """One token per live row from ``probs`` (n_live, V), drawn as if every row of the batch were
    still in it: ``torch.multinomial`` draws one exponential per (row, token) of its input, so the
    rows dropped by compaction get a placeholder distribution and the random stream, hence every
    live row's sample, is the same with compaction on or off. A generator on another device than
    ``probs`` (trainers seed CPU generators per step) draws on its own device, so runs stay
    reproducible from the same seed on CPU and GPU alike."""
    if generator is not None and generator.device != probs.device:
        return _sample(probs.to(generator.device), live.to(generator.device), n_rows, generator).to(probs.device)
    if live.numel() == n_rows:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    full = probs.new_ones((n_rows, probs.shape[-1]))                            # (N, V)
    full[live] = probs
    return torch.multinomial(full, 1, generator=generator).squeeze(-1)[live]


def _persona_token_probs(out, tokens: torch.Tensor) -> torch.Tensor | None:
    """π_i(a_t) for each persona, if the policy exposes per-persona log-probs. Returns (N, P) or None."""
    plp = getattr(out, "persona_logprobs", None)          # (N, 1, P, V) when present
    if plp is None:
        return None
    plp = plp[:, -1]                                      # (N, P, V)
    idx = tokens.view(-1, 1, 1).expand(-1, plp.shape[1], 1)
    return plp.gather(-1, idx).squeeze(-1).float().exp()  # (N, P)


def _accepts(model, name: str) -> bool:
    """Whether the policy's forward takes keyword ``name`` (through PEFT, the wrapped model decides)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _accepts_logits_to_keep(model) -> bool:
    """Whether the policy's forward takes ``logits_to_keep`` (HF causal LMs, Quillan, CouncilHead)."""
    return _accepts(model, "logits_to_keep")


def _frozen_quantization():
    """Quantise each ternary weight once per rollout instead of once per decode step (Quillan's
    ``generate`` does the same); a no-op context without ``policies``."""
    try:
        from policies.ternary import frozen_quantization
    except ImportError:  # pragma: no cover - policies ships with ccrl
        return contextlib.nullcontext()
    return frozen_quantization()


class _GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a buffer with room for ``extra`` more
    tokens after the prefill: a decode step writes its key/value in place and returns views of
    the filled prefix, where ``DynamicLayer`` concatenates, copying the whole cache every step
    (quadratic in the completion length; it was a third of the decode time of a small model)."""

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra
        self._k = self._v = None
        self._n = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        if self._k is None:
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty((b, h, t + self.extra, d))
            self._v = value_states.new_empty((b, h, t + self.extra, value_states.shape[-1]))
        elif self._n + t > self._k.shape[-2]:
            self._reallocate(None, self._n + t + self.extra)
        self._k[:, :, self._n: self._n + t] = key_states
        self._v[:, :, self._n: self._n + t] = value_states
        self._n += t
        self._views()
        return self.keys, self.values

    def _reallocate(self, rows: torch.Tensor | None, capacity: int) -> None:
        """New buffers of ``capacity`` positions holding the filled prefix of ``rows`` (all when None)."""
        src_k, src_v = self._k[:, :, : self._n], self._v[:, :, : self._n]
        if rows is not None:
            src_k, src_v = src_k[rows], src_v[rows]
        self._k = src_k.new_empty((*src_k.shape[:2], capacity, src_k.shape[-1]))
        self._v = src_v.new_empty((*src_v.shape[:2], capacity, src_v.shape[-1]))
        self._k[:, :, : self._n] = src_k
        self._v[:, :, : self._n] = src_v

    def _views(self):
        self.keys = self._k[:, :, : self._n]
        self.values = self._v[:, :, : self._n]

    def get_seq_length(self) -> int:
        return self._n

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._n:
            n = self._n
            b, h, cap, _ = self._k.shape
            new_k = self._k.new_empty((b * repeats, h, cap, self._k.shape[-1]))
            new_v = self._v.new_empty((b * repeats, h, cap, self._v.shape[-1]))
            # one broadcast copy of the filled prefix into each row's G slots
            new_k.view(b, repeats, h, cap, -1)[:, :, :, :n] = self._k[:, None, :, :n]
            new_v.view(b, repeats, h, cap, -1)[:, :, :, :n] = self._v[:, None, :, :n]
            self._k, self._v = new_k, new_v
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._n:
            self._reallocate(indices, self._k.shape[-2])
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop: pass a negative number of tokens to remove")
        self._n = max(0, self._n + tokens_to_remove)
        if self._k is not None:
            self._views()

    def reset(self) -> None:
        self._k = self._v = None
        self._n = 0
        super().reset()


class RolloutCache(DynamicCache):
    """A ``DynamicCache`` of :class:`_GrowingLayer` s: room for the prompt plus ``extra`` tokens is
    allocated once, decoding appends in place."""

    def __init__(self, extra: int):
        Cache.__init__(self, layer_class_to_replicate=lambda: _GrowingLayer(extra))


def varying_shape_attention(device: torch.device):
    """A context in which scaled-dot-product attention avoids cuDNN's kernel on CUDA.

    Decoding changes the attention's shape at every token (the key length grows, finished rows
    leave the batch), and cuDNN's SDPA builds an execution plan per new shape on the CPU:
    profiled on an H100 with torch 2.11, 6.7 ms of host time per call, 70% of an RL step's host
    time. Flash / memory-efficient attention have no per-shape set-up. Elsewhere a no-op."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


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
        with varying_shape_attention(device):
            return _generate(model, prompts, sampling, eos_token_id, pad_token_id, group_size, generator,
                             record_council, device)
    finally:
        model.train(was_training)


def _generate(model, prompts, sampling, eos_id, pad_id, G, generator, record_council, device) -> Rollout:
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)                 # (B, P)
    pos = (prompt_mask.cumsum(-1) - 1).clamp_min(0)                              # (B, P)
    cache = RolloutCache(extra=sampling.max_new_tokens)
    kw = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    if record_council and _accepts(model, "output_persona_logprobs"):
        kw["output_persona_logprobs"] = True    # π_i(a_t) of every persona, for the council-consensus reward
    with _frozen_quantization():
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos,
                    past_key_values=cache, use_cache=True, **kw)
        return _decode(model, out, cache, prompt_ids, prompt_mask, sampling, eos_id, pad_id, G, generator,
                       record_council, device)


def _decode(model, out, cache, prompt_ids, prompt_mask, sampling, eos_id, pad_id, G, generator, record_council,
            device) -> Rollout:
    step_kw = {"output_persona_logprobs": True} if getattr(out, "persona_logprobs", None) is not None else {}
    B, P = prompt_ids.shape
    N, T = B * G, sampling.max_new_tokens
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
    entropies = torch.zeros((N, T), device=device)
    alpha = alpha_last = None
    if council is not None:
        alpha = torch.zeros((N, T, council.shape[-1]), device=device)
        alpha_last = council[:, -1].float().repeat_interleave(G, 0)             # (N, P)
    chosen_p = None
    route_buf = None
    if routes is not None:
        # positions never fed through the model (padding, the last sampled token), and prompt
        # positions whose routes a prefill with logits_to_keep=1 does not compute (an overseer's
        # top-k), keep distinct placeholder routes 0..k-1; none of them influences any completion
        # token's log-prob
        route_buf = [torch.arange(r.shape[-1], device=device).expand(N, P + T, -1).clone() for r in routes]
        for buf, r in zip(route_buf, routes):
            buf[:, P - r.shape[1]: P] = r.repeat_interleave(G, 0)
    # the attention mask of every step is a prefix of one preallocated (N, P + T) mask
    full_mask = torch.cat([prompt_mask, prompt_mask.new_ones((N, T))], dim=1)  # (n_live, P + T)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    live = torch.arange(N, device=device)                                        # rows still in the batch
    live_done = torch.zeros(N, dtype=torch.bool, device=device)                 # (n_live,) finished, not yet dropped
    n_done = 0                                                                   # rows done overall
    next_pos = prompt_mask.sum(-1)                                              # (n_live,)
    stops = [torch.tensor(s, device=device) for s in sampling.stop_sequences if s]
    pad = torch.full((1,), pad_id, dtype=torch.long, device=device)
    steps = 0
    for t in range(T):
        steps += 1
        scaled = logits if sampling.greedy else logits / sampling.temperature
        logp = F.log_softmax(scaled, dim=-1)                                    # (n_live, V)
        ent = -(logp.exp() * logp).sum(-1)                                      # (n_live,)
        if sampling.greedy:
            tok = logp.argmax(-1)
        else:
            probs = _filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(-1)  # (n_live, V)
            tok = _sample(probs, live, N, generator)                            # (n_live,)
        tok_lp = logp.gather(-1, tok[:, None]).squeeze(-1)                      # (n_live,)
        if n_done:                                                               # finished rows emit pad, mask 0
            tok = torch.where(live_done, pad, tok)
            tok_lp = tok_lp.masked_fill(live_done, 0.0)
            ent = ent.masked_fill(live_done, 0.0)
        completion[live, t] = tok
        logprobs[live, t] = tok_lp
        entropies[live, t] = ent
        if alpha is not None:
            alpha[live, t] = alpha_last.masked_fill(live_done[:, None], 0.0) if n_done else alpha_last
        if plp_last is not None:
            if chosen_p is None:
                chosen_p = torch.zeros((N, T, plp_last.shape[1]), device=device)
            cp = plp_last.gather(-1, tok.view(-1, 1, 1).expand(-1, plp_last.shape[1], 1)).squeeze(-1).float().exp()
            chosen_p[live, t] = cp.masked_fill(live_done[:, None], 0.0) if n_done else cp
        lengths[live] += ~live_done if n_done else 1
        finished = tok == eos_id
        for s in stops:
            if t + 1 >= len(s):
                finished |= (completion[live, t + 1 - len(s): t + 1] == s).all(-1)
        live_done = live_done | finished
        # one host sync per step: how many rows have finished so far
        n_live_done = int(live_done.sum())
        n_done = n_live_done + (N - live.numel())
        if n_done == N or t == T - 1:
            break
        # drop finished rows from the batch when enough of them have accumulated
        if n_live_done and n_live_done >= sampling.compact_fraction * live.numel():
            keep = (~live_done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            live, tok, full_mask, next_pos = live[keep], tok[keep], full_mask[keep], next_pos[keep]
            live_done = live_done[keep]
            alpha_last = alpha_last[keep] if alpha_last is not None else None
            n_done = N - live.numel()
        out = model(input_ids=tok[:, None], attention_mask=full_mask[:, : P + t + 1],
                    position_ids=next_pos[:, None], past_key_values=cache, use_cache=True, **step_kw)
        next_pos = next_pos + 1
        logits = out.logits[:, -1].float()
        if alpha is not None:
            alpha_last = out.council_weights[:, -1].float()
        plp_last = _repeat_last_persona(out, 1)
        if route_buf is not None:
            for buf, r in zip(route_buf, out.routing_indices):
                buf[live, P + t] = r[:, -1]                          # routes of the token fed at P + t
    done = torch.zeros(N, dtype=torch.bool, device=device)
    done[live] = live_done
    if live.numel() < N:                                                         # rows dropped earlier were done
        dropped = torch.ones(N, dtype=torch.bool, device=device)
        dropped[live] = False
        done |= dropped
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
        routing_indices=route_buf, group_size=G, decode_steps=steps, entropies=entropies[:, :Tm],
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
        entropies=cat(lambda p: p.entropies, T, 0.0, False),
    )
