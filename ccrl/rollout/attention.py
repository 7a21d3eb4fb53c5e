"""Grouped-query attention of a Hugging Face policy's decode step without copying keys and values.

A model with grouped-query attention (G = query heads / key-value heads > 1) runs transformers'
``sdpa`` attention. Given an attention mask, which a rollout always passes (left padding, and the
static cache's unwritten columns), transformers up to 5.24 repeats every key and value head G
times (``repeat_kv``) before calling ``scaled_dot_product_attention``: on every decode step it
writes and reads G copies of the whole KV cache. For a Qwen2-1.5B-shaped model (12 query heads, 2
key-value heads) at 128 rows and 1,024 tokens of context that is 6 × 4.1 GB per step, against
the 4.1 GB the step must read.

With one query token per row the G query heads that share a key-value head can be laid out as G
query rows of that head instead: q [B, H_kv, G, D] against k, v [B, H_kv, L, D], one SDPA call on
the cache as it is, the mask [B, 1, 1, L] broadcast over the G rows (a per-head mask
[B, H, 1, L] is viewed as [B, H_kv, G, L]). Query head h = j·G + g belongs to key-value head j,
as in ``repeat_kv``, so the result is the same attention (up to the kernels' float rounding).
transformers 5.25 does the same in its own ``sdpa`` (``pack_gqa``); this module gives every
supported transformers version that decode step.

:func:`grouped_decode_attention` switches a policy's ``sdpa`` configs to :data:`ATTENTION` (this
function, registered with transformers' ``AttentionInterface`` and, for the masks transformers
builds, ``AttentionMaskInterface`` with ``sdpa``'s mask) for the length of a rollout and back
after. Every other call (more than one query token, no grouping, a soft cap) goes to
transformers' own ``sdpa_attention_forward``.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F

ATTENTION = "ccrl_sdpa"
"""the name :func:`decode_sdpa_attention` is registered under in transformers' attention interfaces"""

_registered = False


def decode_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers' attention-function signature: ``query`` [B, H, T, D], ``key``/``value``
    [B, H_kv, L, D] → (output [B, T, H, D], None). One query token with H_kv < H: the grouped layout
    of the module docstring; anything else: ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, t, d = query.shape
    h_kv = key.shape[1]
    groups = h // h_kv if h_kv and h % h_kv == 0 else 1
    plain = (groups == 1 or t != 1 or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
             or kwargs.get("output_attentions", False) or key.shape[-1] != d)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q = query.reshape(b, h_kv, groups, d)                                         # (B, H_kv, G, D)
    mask = attention_mask
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
        if mask.shape[1] != 1:                                                    # one mask per query head
            mask = mask.reshape(mask.shape[0], h_kv, groups, mask.shape[-1])      # (B, H_kv, G, L)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask,
                                         dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None             # (B, 1, H, D)


def register() -> None:
    """Register :data:`ATTENTION` with transformers (once per process)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    _registered = True


def _grouped_sdpa_configs(model) -> list:
    """The distinct configs of ``model``'s transformers modules that run ``sdpa`` with grouped
    query heads (through a PEFT wrapper too); Quillan and CouncilHead policies have none."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    seen, found = set(), []
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or getattr(module.config, "model_type", None) == "quillan":
            continue
        config = module.config
        heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
        if id(config) in seen or config._attn_implementation != "sdpa" or not heads or not kv or kv >= heads:
            continue
        seen.add(id(config))
        found.append(config)
    return found


@contextlib.contextmanager
def grouped_decode_attention(model):
    """Run ``model``'s grouped-query ``sdpa`` attention as :func:`decode_sdpa_attention` inside the
    context (the rollout), and give its configs back their ``sdpa`` after, also on an error."""
    configs = _grouped_sdpa_configs(model)
    if configs:
        register()
    for config in configs:
        config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
