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

Below the arithmetic, the training-time layers:

- ``quantize_weight_binary``: 1-bit weights, sign(W) ∈ {−1, +1} (sign(0) = +1) times the
  absmean scale per group (BitNet, arXiv 2310.11453, without its mean-centring), offered for
  micro-agents as the seeds' lowest bit-width.
- ``quantize_stacked``: the integers and scales of a weight or of a stack [..., N, K] of them
  (stacked persona experts), matrix by matrix; what a packer stores for a stack.
- ``fake_quantize_weight`` / ``fake_quantize_activation``: quantise-then-dequantise with the
  straight-through estimator (Bengio et al., arXiv 1308.3432; as BitNet trains): the forward
  sees exactly deq(q(w)) and the backward passes the gradient to w unchanged. They accept
  weights of shape [..., N, K] (stacked experts, micro-agent tables): groups never cross a row,
  and ``group_size=None`` means one scale per matrix.
- ``BitLinear(nn.Linear)``: ``y = deq(q(x)) · deq(q(W))ᵀ + b`` in the forward, the STE in the
  backward, precision ``"ternary"``, ``"binary"`` or ``"fp"`` (a plain linear layer). Being an
  ``nn.Linear`` subclass, PEFT's LoRA wraps it through ``target_modules`` like any linear layer.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ccrl.errors import CcrlError

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


class PrecisionError(CcrlError, ValueError):
    """An unknown precision name or an invalid quantisation size for a layer."""


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


@torch.no_grad()
def _fake_values(w: torch.Tensor, precision: str, group: int | None) -> torch.Tensor:
    """deq(q(w)) of a float32 weight [..., N, K], fused: the values of
    ``dequantize_weight(*quantize_stacked(w, precision, group), group)`` without the int8 round
    trip and the repeated scales. Groups run along each row; ``group=None`` takes one scale per
    matrix (the last two dims)."""
    k = w.shape[-1]
    if group is None or group <= 0:
        if w.dim() == 2:
            absmean = w.abs().mean().reshape(1, 1)                             # (1, 1)
        else:
            absmean = w.abs().flatten(-2).mean(-1)[..., None, None]            # (..., 1, 1)
        if precision == "ternary":
            gamma = absmean + WEIGHT_EPS
            return (w / gamma).clamp_(-1, 1).round_().mul_(gamma)              # (..., N, K)
        return torch.where(w >= 0, 1.0, -1.0).mul_(absmean)
    wg, pad = _grouped(w.reshape(-1, k), group)                            # (R, G, g)
    count = torch.full((wg.shape[-2],), float(wg.shape[-1]), device=w.device)
    if pad:
        count[-1] -= pad
    if precision == "ternary":
        gamma = (wg.abs().sum(-1) / count + WEIGHT_EPS).unsqueeze(-1)          # (R, G, 1)
        q = (wg / gamma).clamp_(-1, 1).round_()                                # (R, G, g)
    else:
        gamma = (wg.abs().sum(-1) / count).unsqueeze(-1)                       # (R, G, 1)
        q = torch.where(wg >= 0, 1.0, -1.0)
    return q.mul_(gamma).flatten(-2)[..., :k].reshape(w.shape).contiguous()   # (..., N, K)


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


# While ``frozen_quantization()`` is active: {key: dequantised weight}, so each weight is
# quantised once per block instead of once per forward (decoding calls the model per token).
_FROZEN: dict | None = None


@contextlib.contextmanager
def frozen_quantization():
    """Quantise each ternary/binary weight once inside this block and reuse it (``generate`` uses it).

    One entry per weight (its storage, shape and quantisation settings), recomputed whenever the
    weight's version counter moves, so in-place updates (optimizer steps, ``load_state_dict``)
    are seen and a trainer may keep a whole run inside the block (micro-batches of one step and
    gradient-checkpoint recomputes then share one quantisation). Edits through ``tensor.data``
    bypass the version counter: do not make them inside the block.
    """
    global _FROZEN
    outer = _FROZEN
    if outer is None:
        _FROZEN = {}
    try:
        yield
    finally:
        if outer is None:
            _FROZEN = None


def _dequantized(weight: torch.Tensor, precision: str, group_size: int | None) -> torch.Tensor:
    """deq(q(W)) for a weight of shape [..., N, K], in the weight's dtype (cached inside ``frozen_quantization``)."""
    key = None
    if _FROZEN is not None:
        key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight.dtype, weight.device,
               precision, group_size, torch.is_inference_mode_enabled())
        hit = _FROZEN.get(key)
        if hit is not None and hit[0] == weight._version:
            return hit[1]
    deq = _fake_values(weight.detach().float(), precision, group_size).to(weight.dtype)
    if key is not None:
        _FROZEN[key] = (weight._version, deq)                                 # one entry per weight
    return deq


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantised values, exactly. Backward: the gradient to the latent tensor, unchanged.

    (``x + (x_q − x).detach()`` gives the same gradient but rounds the forward values, which would
    break bit-exactness with the packed kernel.)
    """

    @staticmethod
    def forward(ctx, latent, quantized):
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize_weight(weight: torch.Tensor, precision: str = "ternary", group_size: int | None = 128) -> torch.Tensor:
    """Quantise-dequantise ``weight[..., N, K]`` with the straight-through estimator (identity for ``fp``)."""
    if precision == "fp":
        return weight
    return _StraightThrough.apply(weight, _dequantized(weight, precision, group_size))


@torch.no_grad()
def _dequantized_activation(x: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """deq(q(x)), fused: the values of ``dequantize_activation(*quantize_activation(x, b), b)``."""
    xf = x.float()
    k = xf.shape[-1]
    xb, _ = _grouped(xf, block_size)                                       # (..., B, b)
    step = (xb.abs().amax(-1).clamp_min(ACT_EPS) / 127.0).unsqueeze(-1)    # (..., B, 1)
    q = (xb / step).round_().clamp_(-127, 127)                             # (..., B, b)
    return q.mul_(step).flatten(-2)[..., :k].to(x.dtype).contiguous()      # (..., K)


def fake_quantize_activation(x: torch.Tensor, block_size: int | None = 64) -> torch.Tensor:
    """Int8 absmax quantise-dequantise of ``x[..., K]`` per block, with the straight-through estimator."""
    return _StraightThrough.apply(x, _dequantized_activation(x, block_size))


class BitLinear(nn.Linear):
    """A linear layer trained quantisation-aware (BitNet b1.58, arXiv 2402.17764).

    ``precision="ternary"``: absmean ternary weights per group of ``group_size`` inputs of each
    output row, int8 absmax activations per block of ``act_block_size``; ``"binary"``: sign
    weights with the same activations; ``"fp"``: an ordinary ``nn.Linear``. The latent weight
    stays in full precision and receives the straight-through gradient. There is no extra
    normalisation inside the layer (the model's RMSNorms precede every BitLinear input).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        precision: str = "ternary",
        group_size: int | None = 128,
        act_block_size: int | None = 64,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.precision = check_precision(precision, "BitLinear.precision")
        for name, size in (("group_size", group_size), ("act_block_size", act_block_size)):
            if size is not None and (not isinstance(size, int) or size <= 0):
                raise PrecisionError(f"BitLinear.{name}: expected a positive int or None, got {size!r}")
        self.group_size = group_size
        self.act_block_size = act_block_size

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q int8 [N, K], scale float32 [N, G])`` of the current latent weight (for packing)."""
        quant = quantize_weight_binary if self.precision == "binary" else quantize_weight
        return quant(self.weight, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "fp":
            return F.linear(x, self.weight, self.bias)
        w = fake_quantize_weight(self.weight, self.precision, self.group_size)   # (N, K)
        x = fake_quantize_activation(x, self.act_block_size)                       # (..., K)
        return F.linear(x, w, self.bias)                                           # (..., N)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, precision={self.precision}, group_size={self.group_size}, "
            f"act_block_size={self.act_block_size}"
        )


_PACKED_NAMES = ("PackedTernary", "pack_ternary", "unpack_ternary", "ternary_linear")


def quantized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The latent full-precision weights that a forward of ``model`` quantises (ternary or binary).

    A :class:`BitLinear` of precision ``"ternary"``/``"binary"`` contributes its ``weight``; a
    module with ``QUANTIZED_WEIGHTS`` contributes the weights named there (parameters, or
    submodules whose ``weight`` it quantises) whose precision is ternary or binary: a tuple of
    names shares the module's ``precision``, a dict maps each name to the attribute holding its
    precision. Packed (inference) weights are buffers of codes, not latent parameters, and
    contribute nothing."""
    out, seen = [], set()
    for mod in model.modules():
        if isinstance(mod, BitLinear):
            pairs = (("weight", "precision"),)
        else:
            names = getattr(mod, "QUANTIZED_WEIGHTS", ())
            pairs = names.items() if isinstance(names, dict) else ((name, "precision") for name in names)
        for name, precision_attr in pairs:
            if getattr(mod, precision_attr, "fp") not in ("ternary", "binary"):
                continue
            p = getattr(mod, name, None)
            p = p.weight if isinstance(p, nn.Module) else p
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def __getattr__(name: str):
    # The packed format and the kernel op live in ``policies.packed``; loaded lazily so that
    # importing the QAT layers never builds or loads the C++ extension.
    if name in _PACKED_NAMES:
        from policies import packed

        return getattr(packed, name)
    raise AttributeError(f"module 'policies.ternary' has no attribute {name!r}")
