"""Batched sampling with a KV cache, for any policy: Quillan, CouncilHead, or a plain HF causal LM.

:func:`generate` prefills each distinct prompt once: the prompt batch [B, P] runs once (computing
the logits of its last position only), then its KV cache and last logits are repeated G times, so
a GRPO group costs one prompt forward instead of G. The KV cache (:class:`RolloutCache`) is
allocated once for prompt + ``max_new_tokens`` and filled in place. Ternary (QAT) weights are
quantised once per rollout (``policies.ternary.frozen_quantization``), not once per decode step.
Then one of two decoders runs, chosen by ``SamplingConfig.cuda_graph`` (:func:`_decode_mode`):

- the eager loop (``decode_eager``): the CPU, and wherever a graph is off or cannot be captured;
  finished rows are compacted out of the batch;
- the CUDA graph path (``decode_graph``; ``cuda_graph: auto``, the default, on a CUDA policy):
  static decoding whose decode step is captured once per rollout and replayed per token.
  ``"static"`` runs that decoding without the capture, on any device (its eager twin).

A decode step that cannot be captured raises :class:`NotCapturable`; under ``auto`` the policy is
remembered and decoded with the eager loop from then on (its prompts are prefilled again; no
generator has moved), under ``True`` the error propagates. A generator on another device than the
policy (a CPU generator for a CUDA policy) also means the eager loop.

The package, one idea per file:

    types.py         Rollout (what is recorded per token and per completion), concat_rollouts
    sampling.py      SamplingConfig; top-k / top-p filtering and the token draw
    cache.py         RolloutCache (in-place, repeatable, compactable, static mode), left_pad
    record.py        the state both decoders share and their one sample-and-record step
    decode_eager.py  the eager decoder (growing cache, compaction)
    decode_graph.py  static decoding and its CUDA graph capture, NotCapturable
    attention.py     an HF policy's decode-step attention: grouped heads without repeated key-value heads,
                     the Triton kernel on CUDA
    decode_kernel.py the Triton split-K decode attention kernel (flash-decoding)
    precision.py     linear weights cast to the autocast dtype once per rollout, not once per step
    engine.py        generate: the prefill and the choice of decoder

Why not ``model.generate``: it cannot share the prompt prefill across a group, does not return
the council statistics or routes, and keeps finished rows in the batch until the longest ends.
Measurements behind these choices are in docs/rollout-notes.md.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref

import torch

from ccrl.rollout.attention import casts_keys_under_autocast, rollout_attention
from ccrl.rollout.cache import RolloutCache, left_pad
from ccrl.rollout.decode_eager import decode_eager
from ccrl.rollout.decode_graph import NotCapturable, StaticDecode
from ccrl.rollout.precision import cast_linear_weights_once
from ccrl.rollout.sampling import SamplingConfig, same_device
from ccrl.rollout.sampling import draw as _draw  # noqa: F401  (its name here before the split)
from ccrl.rollout.types import Rollout, concat_rollouts
from policies.hf_compat import cache_kwargs

__all__ = [
    "NotCapturable",
    "Rollout",
    "RolloutCache",
    "SamplingConfig",
    "concat_rollouts",
    "generate",
    "left_pad",
    "varying_shape_attention",
]

_log = logging.getLogger(__name__)


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


def varying_shape_attention(device: torch.device):
    """A context in which scaled-dot-product attention avoids cuDNN's kernel on CUDA.

    Decoding changes the attention's shape at every token (the key length grows, finished rows
    leave the batch), and cuDNN's SDPA builds an execution plan per new shape on the CPU, a large
    part of a decode step's host time (docs/rollout-notes.md). Flash / memory-efficient attention
    have no per-shape set-up. Elsewhere a no-op."""
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
        with varying_shape_attention(device), rollout_attention(model, sampling.decode_kernel), \
                cast_linear_weights_once(model):
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
            return decode_eager(model, out, cache, *args)
        try:
            return StaticDecode(model, out, cache, *args).run(capture=mode == "graph")
        except NotCapturable as err:       # the generators are as they were: decode eagerly from the prompts
            if sampling.cuda_graph is True:
                raise
            _UNCAPTURABLE[model] = str(err)
            _log.warning("rollout: the decode step of %s cannot be captured in a CUDA graph, decoding eagerly "
                         "from now on: %s", type(model).__name__, err)
            out, cache = _prefill(model, prompt_ids, prompt_mask, sampling, kw)
            return decode_eager(model, out, cache, *args)


def _prefill(model, prompt_ids, prompt_mask, sampling, kw):
    """The prompt batch through the policy once, into a fresh cache with room for the completions."""
    pos = (prompt_mask.cumsum(-1) - 1).clamp_min(0)                              # (B, P)
    cache = RolloutCache(extra=sampling.max_new_tokens, store_autocast=casts_keys_under_autocast(model))
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
    on_device = generator is None or same_device(generator.device, device)
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
