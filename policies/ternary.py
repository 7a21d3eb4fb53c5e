"""Ternary (1.58-bit) layers: BitNet b1.58 quantisation, QAT with a straight-through estimator.

Quantisation (BitNet b1.58, arXiv 2402.17764; the per-group variant follows BitNet,
arXiv 2310.11453, and llama.cpp's TQ types):

- weights: absmean per group of ``group_size`` consecutive weights along the input
  dimension of each output row, γ = mean|W_g|; W_q = round(clamp(W / (γ + ε), −1, 1)) ∈ {−1, 0, 1};
  dequantised W ≈ W_q · (γ + ε). ``group_size=None`` gives one scale per tensor (the b1.58 recipe).
- activations: int8 absmax per block of ``block_size`` along the hidden dimension of each
  token, step = max(|x_b|, ε) / 127; x_q = round(x / step) ∈ [−127, 127]; dequantised x ≈ x_q · step.
  ``block_size=None`` gives one scale per token (the b1.58 recipe).

Both functions are the single definition of the arithmetic: the packed C++ kernel and its
PyTorch reference (``policies.packed``) reproduce exactly these integers and scales, so a
packed model decodes the same tokens as the QAT model. Rounding is round-half-to-even
(``torch.round``), divisions are in float32.
"""

from __future__ import annotations

import torch

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5


def _grouped(t: torch.Tensor, group: int | None) -> tuple[torch.Tensor, int]:
    """View the last dim of ``t`` as (n_groups, group), zero-padding a ragged tail. Returns (view, pad)."""
    k = t.shape[-1]
    if group is None or group <= 0 or group >= k:
        return t.unsqueeze(-2), 0
    pad = (-k) % group
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.unflatten(-1, (t.shape[-1] // group, group)), pad


def quantize_weight(weight: torch.Tensor, group_size: int | None = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantisation of a [N, K] weight.

    Returns ``(q, scale)``: ``q`` int8 [N, K] in {−1, 0, 1}; ``scale`` float32 [N, G] with
    G = ceil(K / group_size) (or [1, 1] for ``group_size=None``: one scale per tensor), so that
    ``q * scale`` (scale repeated over each group) is the dequantised weight.
    """
    w = weight.detach().float()
    n, k = w.shape
    if group_size is None or group_size <= 0:
        gamma = w.abs().mean().reshape(1, 1) + WEIGHT_EPS                  # (1, 1)
        q = (w / gamma).clamp(-1, 1).round().to(torch.int8)                # (N, K)
        return q, gamma
    wg, pad = _grouped(w, group_size)                                      # (N, G, g)
    count = torch.full((wg.shape[-2],), float(wg.shape[-1]), device=w.device)
    if pad:
        count[-1] -= pad
    gamma = wg.abs().sum(-1) / count + WEIGHT_EPS                          # (N, G)
    q = (wg / gamma.unsqueeze(-1)).clamp(-1, 1).round()                    # (N, G, g)
    q = q.flatten(-2)[..., :k].to(torch.int8)                              # (N, K)
    return q, gamma


def quantize_activation(x: torch.Tensor, block_size: int | None = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 absmax quantisation of ``x[..., K]`` per block of ``block_size`` along K.

    Returns ``(q, step)``: ``q`` int8 [..., K] in [−127, 127]; ``step`` float32 [..., B] with
    B = ceil(K / block_size) (B = 1 for ``block_size=None``: one scale per token).
    """
    xf = x.detach().float()
    k = xf.shape[-1]
    xb, pad = _grouped(xf, block_size)                                     # (..., B, b)
    step = xb.abs().amax(-1).clamp_min(ACT_EPS) / 127.0                    # (..., B)
    q = (xb / step.unsqueeze(-1)).round().clamp(-127, 127)                 # (..., B, b)
    q = q.flatten(-2)[..., :k].to(torch.int8)                              # (..., K)
    return q, step


def expand_scale(scale: torch.Tensor, k: int, group: int | None) -> torch.Tensor:
    """Repeat per-group scales [..., G] to per-element [..., K]."""
    if group is None or group <= 0 or scale.shape[-1] == 1:
        return scale.expand(*scale.shape[:-1], k) if scale.shape[-1] == 1 else scale
    return scale.repeat_interleave(group, dim=-1)[..., :k]


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = 128) -> torch.Tensor:
    """float32 [N, K] from ``quantize_weight``'s output."""
    return q.float() * expand_scale(scale, q.shape[-1], group_size)


def dequantize_activation(q: torch.Tensor, step: torch.Tensor, block_size: int | None = 64) -> torch.Tensor:
    """float32 [..., K] from ``quantize_activation``'s output."""
    return q.float() * expand_scale(step, q.shape[-1], block_size)


_PACKED_NAMES = ("PackedTernary", "pack_ternary", "unpack_ternary", "ternary_linear")


def __getattr__(name: str):
    # The packed format and the kernel op live in ``policies.packed``; loaded lazily so that
    # importing the QAT layers never builds or loads the C++ extension.
    if name in _PACKED_NAMES:
        from policies import packed

        return getattr(packed, name)
    raise AttributeError(f"module 'policies.ternary' has no attribute {name!r}")
