"""The attention of a Hugging Face policy's decode step: grouped query heads without copying keys
and values, and on CUDA the split-K decode kernel (``ccrl.rollout.decode_kernel``).

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

On CUDA, a one-token step in bf16 / fp16 with a boolean [B, 1, 1, L] mask (or none) goes to the
Triton split-K kernel instead (:func:`ccrl.rollout.decode_kernel.decode_attention`, same layout),
grouped or not, where ``SamplingConfig.decode_kernel`` is ``auto`` (the default) and Triton is
installed; ``sdpa`` keeps SDPA.

:func:`rollout_attention` switches a policy's ``sdpa`` configs to :data:`ATTENTION` (this module's
:func:`decode_sdpa_attention`, registered with transformers' ``AttentionInterface`` and, for the
masks transformers builds, ``AttentionMaskInterface`` with ``sdpa``'s mask), or to
:data:`ATTENTION_KERNEL` where the kernel runs, for the length of a rollout and back after: those
with grouped heads always, the others where the kernel would run.
Every other call (more than one query token, a soft cap, a position bias, attention weights asked
for) goes to transformers' own ``sdpa_attention_forward``.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F

from ccrl.rollout import decode_kernel
from ccrl.rollout.precision import autocast_dtype

_log = logging.getLogger(__name__)

ATTENTION = "ccrl_sdpa"
"""the name :func:`decode_sdpa_attention` is registered under in transformers' attention interfaces"""
ATTENTION_KERNEL = "ccrl_sdpa_kernel"
"""the name :func:`decode_kernel_attention` (the same with the Triton decode kernel) is registered under"""

_registered = False


def decode_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, kernel: bool = False, **kwargs):
    """transformers' attention-function signature: ``query`` [B, H, T, D], ``key``/``value``
    [B, H_kv, L, D] → (output [B, T, H, D], None). One query token: with ``kernel`` the Triton decode
    kernel where it applies, else with H_kv < H the grouped layout of the module docstring; anything
    else: ``sdpa_attention_forward``. The kernel switch is an argument (two registered functions,
    :data:`ATTENTION` and :data:`ATTENTION_KERNEL`), not state read at run time, so ``torch.compile``
    traces the step without a graph break."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, t, d = query.shape
    h_kv = key.shape[1]
    groups = h // h_kv if h_kv and h % h_kv == 0 else 1
    special = (t != 1 or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
               or kwargs.get("s_aux") is not None or kwargs.get("output_attentions", False) or key.shape[-1] != d
               or h % max(h_kv, 1) != 0)
    if not special and kernel and not (module.training and dropout):
        query, key, value = _as_autocast(query, key, value)
        if decode_kernel.applies(query, key, value, attention_mask):
            keep = None if attention_mask is None else attention_mask[:, 0, 0, : key.shape[-2]].expand(b, -1)  # (B, L)
            try:
                out = decode_kernel.decode_attention(query.reshape(b, h_kv, groups, d), key, value, keep,
                                                     scaling if scaling is not None else d ** -0.5)  # (B, H_kv, G, D)
            except Exception as err:  # noqa: BLE001 - a Triton that cannot compile or launch here: SDPA from now on
                if query.is_cuda and torch.cuda.is_current_stream_capturing():
                    raise
                why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                decode_kernel.FAILED[str(query.device)] = why
                _log.warning("rollout: the Triton decode attention failed on %s, decoding with SDPA from now on: %s",
                             query.device, why)
            else:
                return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None              # (B, 1, H, D)
    if special or groups == 1:
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


def decode_kernel_attention(module, query, key, value, attention_mask, **kwargs):
    """:func:`decode_sdpa_attention` with the Triton decode kernel where it applies (registered as
    :data:`ATTENTION_KERNEL`)."""
    return decode_sdpa_attention(module, query, key, value, attention_mask, kernel=True, **kwargs)


def _as_autocast(*tensors):
    """The floating tensors cast to the autocast dtype where autocast is on for their device, as SDPA
    under autocast casts its inputs (a Llama's query and keys leave its rotary embedding in float32
    under autocast), so the kernel sees what SDPA would compute with."""
    dtype = autocast_dtype(tensors[0].device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


SAFE_ATTENTION = frozenset({"sdpa", "eager", "flash_attention_2", "flash_attention_3", ATTENTION, ATTENTION_KERNEL})
"""transformers attention implementations whose score and output products run through operations
autocast casts to its dtype (SDPA, ``matmul``, half-precision flash kernels): for these, keys and
values stored in the autocast dtype give the same bits as float32 ones cast at every call"""


def casts_keys_under_autocast(model) -> bool:
    """Whether every attention of ``model`` casts its keys and values to the autocast dtype under
    autocast, so the rollout's KV cache may store them in it (``ccrl.rollout.cache``): one or more
    transformers modules, each a Quillan model (``F.scaled_dot_product_attention``) or running an
    implementation of :data:`SAFE_ATTENTION`."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    found = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    return bool(found) and all(getattr(m.config, "model_type", None) == "quillan"
                               or getattr(m.config, "_attn_implementation", None) in SAFE_ATTENTION for m in found)


def register() -> None:
    """Register :data:`ATTENTION` and :data:`ATTENTION_KERNEL` with transformers (once per process)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_sdpa_attention)
    AttentionInterface.register(ATTENTION_KERNEL, decode_kernel_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    AttentionMaskInterface.register(ATTENTION_KERNEL, sdpa_mask)
    _registered = True


def _rollout_sdpa_configs(model, kernel: bool) -> list:
    """The distinct configs of ``model``'s transformers modules that run ``sdpa`` and whose decode
    step this module changes: grouped query heads, or any when ``kernel`` (through a PEFT wrapper
    too); Quillan and CouncilHead policies have none."""
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
        if id(config) in seen or config._attn_implementation != "sdpa" or not heads:
            continue
        if not (kernel or (kv and kv < heads)):
            continue
        seen.add(id(config))
        found.append(config)
    return found


def kernel_wanted(model, choice: str) -> bool:
    """Whether a rollout of ``model`` with ``SamplingConfig.decode_kernel`` = ``choice`` may use the
    Triton decode kernel: ``auto``, Triton installed and the model's parameters on CUDA (a CUDA
    model without Triton is told once, at warning level, that SDPA decodes)."""
    first = next(iter(model.parameters()), None)
    if choice != "auto" or first is None or not first.is_cuda:
        return False
    if not decode_kernel.triton_available():
        _warn_no_triton()
        return False
    return True


@functools.cache
def _warn_no_triton() -> None:
    """Warn once per process that a CUDA rollout decodes with SDPA for want of Triton."""
    _log.warning("rollout: Triton is not installed, so the decode steps attend with SDPA "
                 "(decode_kernel: auto; install the triton package that matches torch for the kernel)")


@contextlib.contextmanager
def rollout_attention(model, kernel: str = "auto"):
    """Run ``model``'s ``sdpa`` attention as :func:`decode_sdpa_attention` inside the context (the
    rollout): grouped query heads without repeated key-value heads, and the Triton decode kernel
    (:func:`decode_kernel_attention`) where :func:`kernel_wanted`; the configs get their ``sdpa``
    back after, also on an error."""
    use_kernel = kernel_wanted(model, kernel)
    configs = _rollout_sdpa_configs(model, use_kernel)
    if configs:
        register()
    for config in configs:
        config._attn_implementation = ATTENTION_KERNEL if use_kernel else ATTENTION
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
