"""Batched sampling with a KV cache, for any policy: Quillan, CouncilHead, or a plain HF causal LM.

One prefill per distinct prompt: the prompt batch [B, P] runs once (computing the logits of its
last position only), then its KV cache and last logits are repeated G times, so a GRPO group
costs one prompt forward instead of G. The KV cache (:class:`RolloutCache`) is allocated once for
prompt + ``max_new_tokens`` and filled in place, where ``DynamicCache`` concatenates and so
copies the whole cache at every step. Ternary (QAT) weights are quantised once per rollout
(``policies.ternary.frozen_quantization``), not once per decode step. Two decoders follow the
prefill (``SamplingConfig.cuda_graph``):

- **The eager loop** (the CPU, and wherever a graph is off or cannot be captured). The decode
  loop is the only per-token Python; inside it every operation is batched. Rows that have
  finished (EOS or a stop sequence) stop costing compute: when enough of them are done the cache
  is compacted to the live rows, so the remaining steps run on a smaller batch. On the CPU it
  counts the finished rows (a host sync) every step; elsewhere every ``check_every`` steps.
- **The CUDA graph path** (``cuda_graph: auto``, the default, on a CUDA policy). Decoding a
  token is launch-bound on a GPU at RL sizes (a 59M-parameter model decoding 128 rows leaves the
  GPU idle between a few hundred small kernels), so the decode step (the policy's forward on the
  [N, 1] sampled tokens, then sampling, log-prob, entropy, α, persona-probability and route
  recording for the next column) is captured once per rollout and replayed per token. What a
  graph needs, the static decoding (:class:`_StaticDecode`) provides: every row stays in the
  batch to the end (finished rows emit pad with log-prob 0, as in the eager loop; no
  compaction), the cache is written in place at a device-side slot and attended over its whole
  preallocated length through a prepared boolean [N, 1, 1, P + T] mask (HF models and Quillan
  take a 4-D mask as is), and the slot, the column, the positions and the finished flags are
  device tensors the step advances itself, so a replay needs no host work. The first decode step
  runs eagerly as the warm-up, the second is captured (about one eager step of host time plus
  the graph's instantiation), and the rest replay it. Sampling draws on the device: the
  exponential race that ``torch.multinomial`` runs for one sample (``_draw``; the same draws
  and tokens), without multinomial's check of the probabilities, which some torch versions read
  back to the host; the trainers give each step a generator on the policy's device, seeded as
  before. Greedy decoding gives the eager loop's tokens; from the same generator state the graph
  replays give exactly what the static decoding gives run eagerly (``cuda_graph: "static"``, its
  eager twin, any device), whose samples are those of the eager loop (both draw N × V
  exponentials per step; tested on the CPU and the GPU). Captured whole: a plain HF Llama and
  Quillan (council layers with ``torch._grouped_mm`` included; its host syncs were replaced: the
  persona counts, the grouped-matmul fallback's padding size and the mixture head's deep-row
  repair no longer read values back while capturing). What falls back: a policy whose decode
  step reads a value back to the host, or refuses the prepared mask, raises
  :class:`NotCapturable` naming the operation; ``auto`` then logs a warning and decodes that
  policy with the eager loop from then on (the prompts are prefilled again; no generator has
  moved), ``True`` raises. A generator on another device (a CPU generator for a CUDA policy)
  also means the eager loop. ``torch.compile(mode="reduce-overhead")`` was not measured against
  this: each rollout has a new prompt width P (a recompile or dynamic shapes per step), the
  council layers' data-dependent routing and autograd Functions would break its graph, and its
  compile time is seconds where a capture costs milliseconds.

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
import logging
import traceback
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from policies.hf_compat import cache_kwargs

_log = logging.getLogger(__name__)


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
    """compact the batch when at least this fraction of live rows has finished (eager decoding)"""
    cuda_graph: bool | str = "auto"
    """decode on a static KV cache with one CUDA graph of the decode step, replayed per token:
    ``"auto"``: on CUDA when the step can be captured (else the eager loop); ``True``: on CUDA, an
    error where it cannot be captured; ``False``: the eager loop; ``"static"``: the graph path's
    decoding without the capture, on any device (its eager twin, which the tests compare)"""
    check_every: int = 8
    """off the CPU, count the finished rows (a host sync) only every this many decode steps; on the
    CPU every step"""

    def __post_init__(self):
        if self.cuda_graph not in (True, False, "auto", "static"):
            raise ValueError(f"SamplingConfig.cuda_graph: expected true, false, 'auto' or 'static', got {self.cuda_graph!r}")
        if self.check_every < 1:
            raise ValueError(f"SamplingConfig.check_every: expected an integer >= 1, got {self.check_every!r}")


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
    if generator is not None and not _same_device(generator.device, probs.device):
        return _sample(probs.to(generator.device), live.to(generator.device), n_rows, generator).to(probs.device)
    if live.numel() == n_rows:
        return _draw(probs, generator)
    full = probs.new_ones((n_rows, probs.shape[-1]))                            # (N, V)
    full[live] = probs
    return _draw(full, generator)[live]


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One token per row of ``probs`` (n, V): ``torch.multinomial(probs, 1)`` on the CPU; elsewhere the
    exponential race that multinomial runs for one sample, argmax(p / E) with E ~ Exp(1) drawn by
    ``exponential_`` (the same draws, the same tokens), without its check of the probabilities,
    which some torch versions read back to the host: a sync per token, and no CUDA graph."""
    if probs.device.type == "cpu":
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)         # (n, V)
    return (probs / race).argmax(-1)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one ("cuda" without an index is the current CUDA device)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index == b.index or a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


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
        self._slot: torch.Tensor | None = None       # static mode: (1,) where the next key/value goes

    def update(self, key_states, value_states, *args, **kwargs):
        if self._slot is not None:
            return self._update_static(key_states, value_states)
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

    def make_static(self, slot: torch.Tensor) -> None:
        """Static mode: ``update`` writes at ``slot`` (a (1,) device tensor that the caller advances)
        and returns the whole buffer, so a decode step changes no shape and no Python state and can
        be captured in a CUDA graph. The caller masks the slots not written yet; they are zeroed
        here, since a masked key still enters attention with weight 0 and 0 · NaN is NaN."""
        if self._k is None:
            return
        self._k[:, :, self._n:].zero_()
        self._v[:, :, self._n:].zero_()
        self._slot = slot
        self.keys, self.values = self._k, self._v

    def _update_static(self, key_states, value_states):
        t = key_states.shape[-2]
        idx = self._slot if t == 1 else self._slot + torch.arange(t, device=self._slot.device)
        self._k.index_copy_(2, idx, key_states)
        self._v.index_copy_(2, idx, value_states)
        self._n += t                      # the host's count: graph replays do not move it
        return self._k, self._v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self._slot is not None:
            return self._k.shape[-2], 0
        return super().get_mask_sizes(query_length)

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

    def make_static(self, slot: torch.Tensor) -> None:
        """Every layer in static mode, writing at ``slot`` (see :meth:`_GrowingLayer.make_static`)."""
        for layer in self.layers:
            layer.make_static(slot)


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
    kw = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    if record_council and _accepts(model, "output_persona_logprobs"):
        kw["output_persona_logprobs"] = True    # π_i(a_t) of every persona, for the council-consensus reward
    mode = _decode_mode(model, sampling, generator, device)
    args = (prompt_ids, prompt_mask, sampling, eos_id, pad_id, G, generator, record_council, device)
    with _frozen_quantization():
        out, cache = _prefill(model, prompt_ids, prompt_mask, sampling, kw)
        if mode == "eager":
            return _decode(model, out, cache, *args)
        try:
            return _StaticDecode(model, out, cache, *args).run(capture=mode == "graph")
        except NotCapturable as err:       # the generators are as they were: decode eagerly from the prompts
            if sampling.cuda_graph is True:
                raise
            _UNCAPTURABLE[model] = str(err)
            _log.warning("rollout: the decode step of %s cannot be captured in a CUDA graph, decoding eagerly "
                         "from now on: %s", type(model).__name__, err)
            out, cache = _prefill(model, prompt_ids, prompt_mask, sampling, kw)
            return _decode(model, out, cache, *args)


def _prefill(model, prompt_ids, prompt_mask, sampling, kw):
    """The prompt batch through the policy once, into a fresh cache with room for the completions."""
    pos = (prompt_mask.cumsum(-1) - 1).clamp_min(0)                              # (B, P)
    cache = RolloutCache(extra=sampling.max_new_tokens)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos,
                use_cache=True, **cache_kwargs(cache), **kw)
    return out, cache


_UNCAPTURABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""policies whose decode step failed to capture (``cuda_graph: auto`` then decodes them eagerly) → why"""


def _decode_mode(model, sampling, generator, device) -> str:
    """``eager`` (the compacting loop), ``static`` (static decoding, not captured) or ``graph``."""
    choice = sampling.cuda_graph
    if choice == "static" or choice is False:
        return "eager" if choice is False else "static"
    on_device = generator is None or _same_device(generator.device, device)
    if device.type == "cuda" and on_device and _graphs_available():
        if choice is True or model not in _UNCAPTURABLE:
            return "graph"
        return "eager"
    if choice is True:
        gen = "no generator" if generator is None else f"a generator on {generator.device}"
        raise ValueError(f"SamplingConfig.cuda_graph=True: needs a policy on a CUDA device and a generator on the "
                         f"same device (or none); got a policy on {device} and {gen}")
    return "eager"


def _graphs_available() -> bool:
    return hasattr(torch.cuda, "CUDAGraph") and hasattr(torch.cuda.CUDAGraph, "register_generator_state")


@dataclass
class _Start:
    """What both decoders start from: the prefill's last logits and council outputs repeated G
    times, the cache repeated likewise, and the (N, T) output buffers."""

    step_kw: dict
    prompt_ids: torch.Tensor          # (N, P)
    prompt_mask: torch.Tensor         # (N, P)
    logits: torch.Tensor              # (N, V) float32, predicting the first completion token
    alpha_last: torch.Tensor | None   # (N, P_c) dense α at that state
    plp_last: torch.Tensor | None     # (N, P_c, V) persona log-probs at that state
    completion: torch.Tensor          # (N, T) pad
    logprobs: torch.Tensor            # (N, T) 0
    entropies: torch.Tensor           # (N, T) 0
    alpha: torch.Tensor | None        # (N, T, P_c) 0
    route_buf: list | None            # per council layer (N, P + T, k) placeholder routes
    stops: list                       # stop sequences as device tensors


def _start(out, cache, prompt_ids, prompt_mask, sampling, pad_id, G, record_council, device) -> _Start:
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
    alpha = alpha_last = None
    if council is not None:
        alpha = torch.zeros((N, T, council.shape[-1]), device=device)
        alpha_last = council[:, -1].float().repeat_interleave(G, 0)             # (N, P_c)
    route_buf = None
    if routes is not None:
        # positions never fed through the model (padding, the last sampled token), and prompt
        # positions whose routes a prefill with logits_to_keep=1 does not compute (an overseer's
        # top-k), keep distinct placeholder routes 0..k-1; none of them influences any completion
        # token's log-prob
        route_buf = [torch.arange(r.shape[-1], device=device).expand(N, P + T, -1).clone() for r in routes]
        for buf, r in zip(route_buf, routes):
            buf[:, P - r.shape[1]: P] = r.repeat_interleave(G, 0)
    return _Start(
        step_kw=step_kw, prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
        logits=logits, alpha_last=alpha_last, plp_last=_repeat_last_persona(out, G),
        completion=torch.full((N, T), pad_id, dtype=torch.long, device=device),
        logprobs=torch.zeros((N, T), device=device), entropies=torch.zeros((N, T), device=device),
        alpha=alpha, route_buf=route_buf, stops=[torch.tensor(s, device=device) for s in sampling.stop_sequences if s],
    )


def _assemble(s: _Start, lengths, done, chosen_p, G: int, steps: int) -> Rollout:
    """The Rollout of a finished decode, cut to the longest completion."""
    N, P = s.prompt_ids.shape
    T = s.completion.shape[1]
    Tm = int(lengths.max()) if N else 0
    cmask = (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).long()
    route_buf = None if s.route_buf is None else tuple(b[:, : P + Tm] for b in s.route_buf)
    return Rollout(
        prompt_ids=s.prompt_ids, prompt_mask=s.prompt_mask,
        completion_ids=s.completion[:, :Tm], completion_mask=cmask[:, :Tm], logprobs=s.logprobs[:, :Tm],
        lengths=lengths, truncated=~done,
        council_weights=None if s.alpha is None else s.alpha[:, :Tm],
        chosen_token_probs=None if chosen_p is None else chosen_p[:, :Tm],
        routing_indices=route_buf, group_size=G, decode_steps=steps, entropies=s.entropies[:, :Tm],
    )


def _decode(model, out, cache, prompt_ids, prompt_mask, sampling, eos_id, pad_id, G, generator, record_council,
            device) -> Rollout:
    """The eager loop: a growing cache, finished rows compacted away."""
    s = _start(out, cache, prompt_ids, prompt_mask, sampling, pad_id, G, record_council, device)
    N, P = s.prompt_ids.shape
    T = sampling.max_new_tokens
    logits, alpha_last, plp_last = s.logits, s.alpha_last, s.plp_last
    completion, alpha, chosen_p = s.completion, s.alpha, None
    # the attention mask of every step is a prefix of one preallocated (N, P + T) mask
    full_mask = torch.cat([s.prompt_mask, s.prompt_mask.new_ones((N, T))], dim=1)  # (n_live, P + T)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    live = torch.arange(N, device=device)                                        # rows still in the batch
    live_done = torch.zeros(N, dtype=torch.bool, device=device)                 # (n_live,) finished, not yet dropped
    n_done = 0                                                                   # rows done overall
    next_pos = s.prompt_mask.sum(-1)                                            # (n_live,)
    pad = torch.full((1,), pad_id, dtype=torch.long, device=device)
    check = 1 if device.type == "cpu" else sampling.check_every                 # steps between host syncs
    steps = 0
    for t in range(T):
        steps += 1
        masked = n_done > 0 or check > 1                                         # may some live row be finished?
        scaled = logits if sampling.greedy else logits / sampling.temperature
        logp = F.log_softmax(scaled, dim=-1)                                    # (n_live, V)
        ent = -(logp.exp() * logp).sum(-1)                                      # (n_live,)
        if sampling.greedy:
            tok = logp.argmax(-1)
        else:
            probs = _filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(-1)  # (n_live, V)
            tok = _sample(probs, live, N, generator)                            # (n_live,)
        tok_lp = logp.gather(-1, tok[:, None]).squeeze(-1)                      # (n_live,)
        if masked:                                                               # finished rows emit pad, mask 0
            tok = torch.where(live_done, pad, tok)
            tok_lp = tok_lp.masked_fill(live_done, 0.0)
            ent = ent.masked_fill(live_done, 0.0)
        completion[live, t] = tok
        s.logprobs[live, t] = tok_lp
        s.entropies[live, t] = ent
        if alpha is not None:
            alpha[live, t] = alpha_last.masked_fill(live_done[:, None], 0.0) if masked else alpha_last
        if plp_last is not None:
            if chosen_p is None:
                chosen_p = torch.zeros((N, T, plp_last.shape[1]), device=device)
            cp = plp_last.gather(-1, tok.view(-1, 1, 1).expand(-1, plp_last.shape[1], 1)).squeeze(-1).float().exp()
            chosen_p[live, t] = cp.masked_fill(live_done[:, None], 0.0) if masked else cp
        lengths[live] += ~live_done if masked else 1
        finished = tok == eos_id
        for stop in s.stops:
            if t + 1 >= len(stop):
                finished |= (completion[live, t + 1 - len(stop): t + 1] == stop).all(-1)
        live_done = live_done | finished
        if t == T - 1:
            break
        if (t + 1) % check:                                                      # no host sync at this step
            n_live_done = 0
        else:                                                                    # a host sync: how many rows are done
            n_live_done = int(live_done.sum())
            n_done = n_live_done + (N - live.numel())
            if n_done == N:
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
                    position_ids=next_pos[:, None], use_cache=True, **cache_kwargs(cache), **s.step_kw)
        next_pos = next_pos + 1
        logits = out.logits[:, -1].float()
        if alpha is not None:
            alpha_last = out.council_weights[:, -1].float()
        plp_last = _repeat_last_persona(out, 1)
        if s.route_buf is not None:
            for buf, r in zip(s.route_buf, out.routing_indices):
                buf[live, P + t] = r[:, -1]                          # routes of the token fed at P + t
    done = torch.zeros(N, dtype=torch.bool, device=device)
    done[live] = live_done
    if live.numel() < N:                                                         # rows dropped earlier were done
        dropped = torch.ones(N, dtype=torch.bool, device=device)
        dropped[live] = False
        done |= dropped
    return _assemble(s, lengths, done, chosen_p, G, steps)


class NotCapturable(RuntimeError):
    """The policy's decode step cannot be captured in a CUDA graph (it synchronises with the host,
    or capture failed); the message names the operation."""


class _StaticDecode:
    """Static decoding: every row stays in the batch to the end (finished rows emit pad, mask 0),
    the cache is written in place at a device-side slot, and every per-step quantity lives in a
    device tensor that the step itself advances. A step (sample column t, feed that token) thus
    has fixed shapes and no host logic, so one CUDA graph of it is replayed for every token."""

    def __init__(self, model, out, cache, prompt_ids, prompt_mask, sampling, eos_id, pad_id, G, generator,
                 record_council, device):
        self.s = s = _start(out, cache, prompt_ids, prompt_mask, sampling, pad_id, G, record_council, device)
        self.model, self.cache, self.sampling, self.generator, self.G = model, cache, sampling, generator, G
        self.eos_id, self.device = eos_id, device
        N, P = s.prompt_ids.shape
        T = sampling.max_new_tokens
        self.N, self.P, self.T = N, P, T
        self.slot = torch.full((1,), P, dtype=torch.long, device=device)        # cache slot of the token fed next
        self.col = torch.zeros((1,), dtype=torch.long, device=device)           # completion column sampled next
        self.keys = torch.arange(P + T, device=device)                          # (P + T,) cache slots
        self.mask = torch.cat([s.prompt_mask, s.prompt_mask.new_ones((N, T))], dim=1).bool()  # (N, P + T)
        self.pos = s.prompt_mask.sum(-1, keepdim=True)                          # (N, 1) position of the fed token
        self.tok = torch.zeros(N, dtype=torch.long, device=device)              # (N,) the token fed next
        self.done = torch.zeros(N, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(N, dtype=torch.long, device=device)
        self.pad = torch.full((1,), pad_id, dtype=torch.long, device=device)
        s.logits = s.logits.clone()                                              # buffers the step rewrites
        s.alpha_last = None if s.alpha_last is None else s.alpha_last.clone()
        s.plp_last = None if s.plp_last is None else s.plp_last.clone()
        self.chosen_p = None
        if s.plp_last is not None:
            self.chosen_p = torch.zeros((N, T, s.plp_last.shape[1]), device=device)
        cache.make_static(self.slot)

    def sample(self) -> None:
        """Draw column ``col`` from the current logits and record it (finished rows: pad, 0)."""
        s, c, done = self.s, self.sampling, self.done
        scaled = s.logits if c.greedy else s.logits / c.temperature
        logp = F.log_softmax(scaled, dim=-1)                                    # (N, V)
        ent = -(logp.exp() * logp).sum(-1)                                      # (N,)
        if c.greedy:
            tok = logp.argmax(-1)
        else:
            probs = _filter_logits(scaled, c.top_k, c.top_p).softmax(-1)        # (N, V)
            tok = _draw(probs, self.generator)                                  # (N,)
        tok_lp = logp.gather(-1, tok[:, None]).squeeze(-1)                      # (N,)
        tok = torch.where(done, self.pad, tok)
        s.completion.index_copy_(1, self.col, tok[:, None])
        s.logprobs.index_copy_(1, self.col, tok_lp.masked_fill(done, 0.0)[:, None])
        s.entropies.index_copy_(1, self.col, ent.masked_fill(done, 0.0)[:, None])
        if s.alpha is not None:
            s.alpha.index_copy_(1, self.col, s.alpha_last.masked_fill(done[:, None], 0.0)[:, None])
        if self.chosen_p is not None:
            plp = s.plp_last
            cp = plp.gather(-1, tok.view(-1, 1, 1).expand(-1, plp.shape[1], 1)).squeeze(-1).float().exp()
            self.chosen_p.index_copy_(1, self.col, cp.masked_fill(done[:, None], 0.0)[:, None])
        self.lengths += ~done
        finished = tok == self.eos_id
        for stop in s.stops:                                    # the last len(stop) columns, once there are as many
            n = len(stop)
            cols = (self.col + 1 - n + torch.arange(n, device=self.device)).clamp_min(0)        # (n,)
            hit = (s.completion.index_select(1, cols) == stop).all(-1)                          # (N,)
            finished |= hit & (self.col + 1 >= n)
        done |= finished
        self.tok.copy_(tok)

    def feed(self) -> None:
        """Run the sampled tokens through the policy at ``slot``; keep what the next column needs."""
        s = self.s
        mask = (self.mask & (self.keys <= self.slot))[:, None, None, :]          # (N, 1, 1, P + T)
        out = self.model(input_ids=self.tok[:, None], attention_mask=mask, position_ids=self.pos,
                         use_cache=True, **cache_kwargs(self.cache), **s.step_kw)
        s.logits.copy_(out.logits[:, -1])
        if s.alpha_last is not None:
            s.alpha_last.copy_(out.council_weights[:, -1])
        if s.plp_last is not None:
            s.plp_last.copy_(out.persona_logprobs[:, -1])
        if s.route_buf is not None:
            for buf, r in zip(s.route_buf, out.routing_indices):
                buf.index_copy_(1, self.slot, r[:, -1:])                        # routes of the token fed at slot
        self.pos += 1
        self.slot += 1
        self.col += 1

    def step(self) -> None:
        self.sample()
        self.feed()

    def run(self, capture: bool) -> Rollout:
        """Decode every column: 0..T-2 sample and feed, column T-1 only samples. With ``capture``
        the first step runs eagerly as the warm-up, then one graph of the step is captured and
        replayed for the others; off the CPU the finished rows are counted every ``check_every``
        steps (a host sync), and decoding stops once all are."""
        if capture:
            return self._run_captured()
        return self._loop(capture=False)

    def _run_captured(self) -> Rollout:
        """``_loop`` with a private generator: a failed capture leaves every generator it registered
        unusable ("offset increment outside graph capture"), so the caller's generator never enters
        the capture (its state is copied in before and out after), and the default CUDA generator,
        which every capture registers, gets a fresh state after a failure."""
        caller, device = self.generator, self.device
        default = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        saved = default.get_state()
        self.generator = torch.Generator(device=device)
        self.generator.set_state(caller.get_state() if caller is not None else saved)
        try:
            ro = self._loop(capture=True)
        except NotCapturable:
            fresh = torch.Generator(device=device)
            fresh.set_state(saved)
            default.graphsafe_set_state(fresh)
            raise
        (caller if caller is not None else default).set_state(self.generator.get_state())
        return ro

    def _loop(self, capture: bool) -> Rollout:
        check = self.sampling.check_every if self.device.type != "cpu" else 1
        graph, steps = None, 0
        for t in range(self.T - 1):
            if graph is not None:
                graph.replay()
            elif capture:
                graph = _capture(self.step, self.generator, self.device)           # runs the first step too
            else:
                self.step()
            steps += 1
            if (t + 1) % check == 0 and bool(self.done.all()):
                break
        else:
            self.sample()
            steps += 1
        return _assemble(self.s, self.lengths, self.done, self.chosen_p, self.G, steps)


def _capture(step, generator, device):
    """Run ``step`` once eagerly on a side stream (the warm-up a capture wants: lazy initialisations
    stay out of the graph; it is a real decode step), then capture one CUDA graph of it there,
    drawing from ``generator`` (or the default CUDA generator, which capture registers itself).
    A step that fails either way raises :class:`NotCapturable` naming the operation."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            try:
                step()
            except Exception as err:               # e.g. a policy that does not take a prepared 4-D mask
                raise NotCapturable(_where(err)) from err
            if generator is not None:
                graph.register_generator_state(generator)
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                step()
            except Exception as err:               # e.g. an operation that reads a value back to the host
                with contextlib.suppress(RuntimeError):
                    graph.capture_end()
                raise NotCapturable(_where(err)) from err
            graph.capture_end()
    finally:
        torch.cuda.current_stream(device).wait_stream(stream)   # later work sees the warm-up's
    return graph


def _where(err: BaseException) -> str:
    """The error's first line and the innermost frame outside torch that raised it (which operation)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename.replace("\\", "/")]
    head = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not frames:
        return head
    f = frames[-1]
    return f"{head} (at {'/'.join(f.filename.replace(chr(92), '/').rsplit('/', 2)[-2:])}:{f.lineno}, {f.name}: {f.line})"


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
