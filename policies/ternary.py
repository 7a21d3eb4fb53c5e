"""Ternary (1.58-bit) layers: BitNet b1.58 QAT with a straight-through estimator.

The arithmetic (absmean ternary / sign binary weights per group, int8 absmax activations
per block; BitNet b1.58, arXiv 2402.17764) is defined once in ``policies.quantization`` and
re-exported here (``quantize_weight``, ``quantize_activation``, ``quantize_stacked``, ...).
``pack_ternary``, ``unpack_ternary``, ``PackedTernary`` and ``ternary_linear`` are re-exported
from ``policies.packed`` on first access, so importing the QAT layers never builds or loads the
C++ extension (``policies.packed`` imports ``policies.quantization``, never this module).

The training-time layers:

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

from policies.errors import PrecisionError
from policies.quantization import (
    ACT_EPS,
    PRECISIONS,
    WEIGHT_EPS,
    _grouped,
    check_precision,
    dequantize_activation,
    dequantize_weight,
    expand_scale,
    quantize_activation,
    quantize_stacked,
    quantize_weight,
    quantize_weight_binary,
)

__all__ = [
    "ACT_EPS",
    "PRECISIONS",
    "WEIGHT_EPS",
    "BitLinear",
    "PrecisionError",
    "check_precision",
    "dequantize_activation",
    "dequantize_weight",
    "expand_scale",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "frozen_quantization",
    "quantize_activation",
    "quantize_stacked",
    "quantize_weight",
    "quantize_weight_binary",
    "quantized_parameters",
]

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
