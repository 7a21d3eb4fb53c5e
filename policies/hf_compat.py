"""The part of transformers' generation contract that changes between the releases ccrl supports.

ccrl's policies (``QuillanForCausalLM``, ``CouncilHead``) and its rollout engine talk to
transformers only through public names. One of them moved inside the 5.x series:

- **The KV cache argument.** Up to transformers 5.23 every causal LM's ``forward``, its output
  and ``GenerationMixin.prepare_inputs_for_generation`` call the cache ``past_key_values``.
  From 5.24 they call it ``cache``: ``generate`` passes ``cache=…`` to ``forward`` and reads
  ``outputs["cache"]`` back, and the old name only warns (``FutureWarning``) until it goes in
  5.40. ``CACHE_ARG`` is the name the installed release uses, read once from the signature of
  ``GenerationMixin.prepare_inputs_for_generation``; ccrl passes caches to transformers' models
  under that name (``cache_kwargs``). Its own models accept both names (``take_cache``) and
  return the cache under both (``cache_fields``): ``past_key_values`` is their documented output
  field and what releases up to 5.23 read, ``cache`` what later ones read, so ``generate`` finds
  it on every release and a user's ``out.past_key_values`` keeps working.
- **Keeping the last positions before the output head.** transformers' ``slice_logits_to_keep``
  lives in ``transformers.modeling_utils`` and is not exported; ``keep_last_positions`` is the
  same slice (an int keeps the last n positions, 0 all of them; a 1-D tensor keeps those
  positions), written here so no private helper is imported.
"""

from __future__ import annotations

import inspect

import torch
from transformers import GenerationMixin

__all__ = ["CACHE_ARG", "cache_fields", "cache_kwargs", "keep_last_positions", "output_cache", "take_cache"]

_CACHE_NAMES = ("cache", "past_key_values")


def _cache_arg() -> str:
    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


CACHE_ARG: str = _cache_arg()
"""``"cache"`` on transformers ≥ 5.24, ``"past_key_values"`` before."""


def cache_kwargs(cache) -> dict:
    """``{CACHE_ARG: cache}``: the keyword a transformers model's ``forward`` takes its KV cache by."""
    return {CACHE_ARG: cache}


def cache_fields(cache) -> dict:
    """``{"past_key_values": cache, "cache": cache}``: a ccrl model output's cache under both names."""
    return {"past_key_values": cache, "cache": cache}


def take_cache(past_key_values, cache, where: str):
    """The cache a ``forward`` was given under either name (``past_key_values`` or ``cache``).

    Both names given with two different objects is an error naming ``where``.
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise TypeError(f"{where}: got both cache= and past_key_values=; pass the KV cache once")
    return cache if cache is not None else past_key_values


def output_cache(outputs):
    """The KV cache a model output carries, under whichever name its transformers release uses (or None)."""
    for name in _CACHE_NAMES:
        value = outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def keep_last_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """``hidden`` [B, T, d] cut to the positions the output head needs.

    An int n keeps the last n positions (0 keeps all); a 1-D tensor of positions keeps those.
    """
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    if logits_to_keep.dim() != 1:
        raise ValueError(f"logits_to_keep: expected an int or a 1-D tensor of positions, got shape "
                         f"{list(logits_to_keep.shape)}")
    return hidden[:, logits_to_keep, :]
