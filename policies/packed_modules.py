"""Packed inference modules: ``PackedBitLinear`` and the in-place swap of a model's quantised layers.

- ``PackedBitLinear`` and ``pack_model_(model)``: an eval-mode model's ``BitLinear`` layers
  switched in place to packed weights and the kernel (``policies.packed_op``).
- ``pack_stacked_param_``: a quantised parameter replaced by row-code buffers
  (``policies.packed_rows``); ``keep_float32_scales``: ``module.to(dtype)`` for modules holding
  packed scales, which stay float32 (the exact scales of the codes).
"""

from __future__ import annotations

import torch
from torch import nn

from policies.errors import PackError
from policies.packed_codec import PackedTernary, _norm, geometry, pack_quantized
from policies.packed_op import _FAST, _OP
from policies.packed_rows import pack_stacked_rows, stacked_rows_shapes
from policies.quantization import quantize_weight


class PackedBitLinear(nn.Module):
    """Inference twin of ``BitLinear``: 2-bit packed weights, forward = ``ccrl::ternary_linear``.

    Buffers ``packed_weight`` (uint8 [N, K_pad / 4]) and ``weight_scale`` (float32 [N, G] or
    [1, 1]) and an optional frozen ``bias``, so a packed checkpoint loads with ``load_state_dict``.
    ``weight_scale`` stays float32 under ``module.to(dtype)`` (the kernel's arithmetic is float32).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        group_size: int | None = 128,
        act_block_size: int | None = 64,
        per_tensor_scale: bool | None = None,
        precision: str = "ternary",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.group_size, self.act_block_size = _norm(group_size), _norm(act_block_size)
        self.precision = precision
        geo = geometry(self.in_features, self.group_size, self.act_block_size)
        if per_tensor_scale is None:
            per_tensor_scale = self.group_size is None
        scale_shape = (1, 1) if per_tensor_scale else (self.out_features, geo["G"])
        # Structure only (for load_state_dict): code 0x55 = four zero weights.
        self.register_buffer(
            "packed_weight",
            torch.full((self.out_features, geo["k_pad"] // 4), 0x55, dtype=torch.uint8, device=device),
        )
        self.register_buffer("weight_scale", torch.zeros(scale_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> PackedBitLinear:
        """Pack a ``BitLinear`` (or any ``nn.Linear`` with ``group_size`` / ``act_block_size`` attributes)."""
        group_size = getattr(layer, "group_size", 128)
        act_block_size = getattr(layer, "act_block_size", 64)
        precision = getattr(layer, "precision", "ternary")
        if hasattr(layer, "quantized_weight"):
            q, scale = layer.quantized_weight()
        else:
            q, scale = quantize_weight(layer.weight, group_size)
        packed = pack_quantized(q, scale, group_size, act_block_size)
        dev = layer.weight.device
        mod = cls(
            layer.in_features, layer.out_features, bias=layer.bias is not None, group_size=group_size,
            act_block_size=act_block_size, per_tensor_scale=tuple(scale.shape) == (1, 1), precision=precision,
            device=dev, dtype=None if layer.bias is None else layer.bias.dtype,
        )
        mod.packed_weight.copy_(packed.codes)
        mod.weight_scale.copy_(packed.scale)
        if layer.bias is not None:
            mod.bias.data.copy_(layer.bias.detach())
        return mod

    @property
    def packed(self) -> PackedTernary:
        return PackedTernary(self.packed_weight, self.weight_scale, self.in_features, self.out_features,
                             self.group_size, self.act_block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FAST is not None and not torch.compiler.is_compiling():
            y = _FAST(x, self.packed_weight, self.weight_scale, self.bias, self.in_features, self.group_size,
                      self.act_block_size)
            if y is not NotImplemented:
                return y
        return _OP(x, self.packed_weight, self.weight_scale, self.bias, self.in_features, self.group_size,
                   self.act_block_size)

    def _apply(self, fn, recurse=True):
        scale = self.weight_scale
        out = super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:   # keep the exact float32 scales on .to(dtype)
            self.weight_scale = scale.to(device=self.weight_scale.device)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"precision={self.precision}, group_size={self.group_size}, act_block_size={self.act_block_size}"
        )


def _packable(module: nn.Module) -> bool:
    """A quantised linear layer: ``policies.ternary.BitLinear`` (ternary or binary precision)."""
    if not isinstance(module, nn.Linear) or not hasattr(module, "act_block_size"):
        return False
    return getattr(module, "precision", "ternary") in ("ternary", "binary")


def pack_model_(model: nn.Module, structure_only: bool | None = None) -> nn.Module:
    """Replace every ternary/binary ``BitLinear`` of ``model`` by a ``PackedBitLinear``, in place.

    The model must be in eval mode (packing freezes the quantised weights; training continues
    on the latent weights of the unpacked model). With ``structure_only`` (the default when
    ``model.config.ternary_packed`` is already set, as when ``from_pretrained`` builds a packed
    checkpoint) the layers get empty buffers of the right shapes for ``load_state_dict``.
    Sets ``model.config.ternary_packed = True`` when the model has a config. Returns ``model``.
    """
    config = getattr(model, "config", None)
    if structure_only is None:
        structure_only = bool(getattr(config, "ternary_packed", False))
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if _packable(child)]
    if not structure_only and (model.training or any(child.training for _, _, child in targets)):
        raise PackError(
            "pack_model_: the model is in training mode; call model.eval() first. Packed layers are for "
            "inference only (their weights are frozen 2-bit codes); keep training the unpacked model."
        )
    for parent, name, child in targets:
        if structure_only:
            gs, ab = child.group_size, child.act_block_size
            packed = PackedBitLinear(
                child.in_features, child.out_features, bias=child.bias is not None, group_size=gs,
                act_block_size=ab, precision=getattr(child, "precision", "ternary"),
                device=child.weight.device, dtype=None if child.bias is None else child.bias.dtype,
            )
        else:
            with torch.no_grad():
                packed = PackedBitLinear.from_linear(child)
        packed.train(child.training)
        setattr(parent, name, packed)
    if config is not None:
        config.ternary_packed = True
    return model


@torch.no_grad()
def pack_stacked_param_(
    module: nn.Module,
    name: str,
    rows: torch.Tensor,
    shape,
    precision: str,
    group_size: int | None,
    structure_only: bool = False,
) -> None:
    """Replace parameter ``module.<name>`` by buffers ``<name>_codes`` / ``<name>_scale``:
    ``pack_stacked_rows(rows, precision, group_size)``, where ``rows`` is the [..., N, K] view of
    the parameter that is quantised (``shape`` its shape). ``structure_only``: empty buffers of
    the right shapes, for ``load_state_dict`` of a packed checkpoint."""
    dev = rows.device
    if structure_only:
        codes_shape, scale_shape = stacked_rows_shapes(shape, group_size)
        codes = torch.full(codes_shape, 0x55, dtype=torch.uint8, device=dev)       # 0x55: four zero weights
        scale = torch.zeros(scale_shape, dtype=torch.float32, device=dev)
    else:
        codes, scale = pack_stacked_rows(rows, precision, group_size)
    delattr(module, name)
    module.register_buffer(f"{name}_codes", codes)
    module.register_buffer(f"{name}_scale", scale)


def keep_float32_scales(module: nn.Module, names, fn, recurse: bool = True):
    """``nn.Module._apply`` for a module with packed scale buffers ``names``: ``module.to(dtype)``
    moves them but keeps them float32 (the exact scales of the codes). Returns the module."""
    scales = {n: getattr(module, n) for n in names if isinstance(getattr(module, n, None), torch.Tensor)}
    out = nn.Module._apply(module, fn, recurse)
    for n, scale in scales.items():
        if getattr(module, n).dtype != torch.float32:
            setattr(module, n, scale.to(device=getattr(module, n).device))
    return out
