"""The ternary arithmetic: BitNet b1.58 quantisation of weights and activations, as pure functions.

Quantisation (BitNet b1.58, arXiv 2402.17764; the per-group variant follows BitNet,
arXiv 2310.11453, and llama.cpp's TQ types):

- weights: absmean per group of ``group_size`` consecutive weights along the input
  dimension of each output row, γ = mean|W_g|; W_q = round(clamp(W / (γ + ε), −1, 1)) ∈ {−1, 0, 1};
  dequantised W ≈ W_q · (γ + ε). ``group_size=None`` gives one scale per tensor (the b1.58 recipe).
- activations: int8 absmax per block of ``block_size`` along the hidden dimension of each
  token, step = max(|x_b|, ε) / 127; x_q = round(x / step) ∈ [−127, 127]; dequantised x ≈ x_q · step.
  ``block_size=None`` gives one scale per token (the b1.58 recipe).
- ``quantize_weight_binary``: 1-bit weights, sign(W) ∈ {−1, +1} (sign(0) = +1) times the
  absmean scale per group (BitNet, arXiv 2310.11453, without its mean-centring).
- ``quantize_stacked``: the integers and scales of a weight or of a stack [..., N, K] of them
  (stacked persona experts), matrix by matrix; what a packer stores for a stack.

These functions are the single definition of the arithmetic: the QAT layers
(``policies.ternary``) and the packed format, the C++ kernel and its PyTorch reference
(``policies.packed``) all take their integers and scales from here, so a packed model decodes
the same tokens as the QAT model. Rounding is round-half-to-even (``torch.round``), divisions
are in float32. Both ``policies.ternary`` and ``policies.packed`` import this module; it
imports neither.
"""

from __future__ import annotations

import torch

from policies.errors import PrecisionError

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


PRECISIONS = ("ternary", "binary", "fp")


def check_precision(precision: str, where: str = "precision") -> str:
    """Return ``precision`` if it is one of ``PRECISIONS``, else raise ``PrecisionError`` naming ``where``."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"{where}: unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    return precision


def quantize_weight_binary(weight: torch.Tensor, group_size: int | None = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary (1-bit) quantisation of a [N, K] weight: ``q = sign(W)`` with sign(0) = +1, absmean scale.

    Same layout as ``quantize_weight``: ``q`` int8 [N, K] in {−1, +1}, ``scale`` float32 [N, G]
    (G = ceil(K / group_size), or [1, 1] per tensor), ``dequantize_weight(q, scale)`` the weight.
    """
    w = weight.detach().float()
    n, k = w.shape
    q = torch.where(w >= 0, 1.0, -1.0)                                     # (N, K)
    if group_size is None or group_size <= 0:
        return q.to(torch.int8), w.abs().mean().reshape(1, 1)              # (N, K), (1, 1)
    wg, pad = _grouped(w, group_size)                                      # (N, G, g)
    count = torch.full((wg.shape[-2],), float(wg.shape[-1]), device=w.device)
    if pad:
        count[-1] -= pad
    return q.to(torch.int8), wg.abs().sum(-1) / count                      # (N, K), (N, G)


def quantize_stacked(
    weight: torch.Tensor, precision: str = "ternary", group_size: int | None = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [..., N, K], scale float32 [..., N, G] or [..., 1, 1])`` of a weight or a stack of them.

    A 2-D weight gives exactly ``quantize_weight`` (or ``quantize_weight_binary``); a stack
    [..., N, K] is quantised matrix by matrix (groups along each row; ``group_size=None``: one
    scale per matrix). ``q * scale`` is the value ``fake_quantize_weight`` uses, so packing
    these integers reproduces the QAT weights.
    """
    quant = quantize_weight if precision == "ternary" else quantize_weight_binary
    if weight.dim() == 2:
        return quant(weight, group_size)
    w = weight.detach().float()
    *lead, n, k = w.shape
    if group_size is None or group_size <= 0:
        absmean = w.abs().flatten(-2).mean(-1)[..., None, None]                # (..., 1, 1)
        if precision == "ternary":
            gamma = absmean + WEIGHT_EPS
            return (w / gamma).clamp(-1, 1).round().to(torch.int8), gamma
        return torch.where(w >= 0, 1, -1).to(torch.int8), absmean
    q, scale = quant(w.reshape(-1, k), group_size)                         # (R, K), (R, G)
    return q.view(*lead, n, k), scale.view(*lead, n, scale.shape[-1])
