"""Packed ternary weights and the ``ccrl::ternary_linear`` op (C++ kernel, PyTorch reference).

The public face of the packed inference path; each idea lives in its own module:

- ``policies.packed_codec``: the 2-bit I2-tile format the kernel reads: ``PackedTernary``,
  ``pack_ternary`` / ``pack_quantized`` / ``unpack_ternary``, ``geometry``.
- ``policies.packed_rows``: row-major 2-bit tables for weights gathered by row or used whole
  (micro-agent tables, query nets, persona heads): ``pack_rows``, ``dequantize_rows``,
  ``pack_stacked_rows``, ``dequantize_stacked_rows``, ``cached_stacked_rows``.
- ``policies.packed_op``: the ``torch.library`` op ``ternary_linear`` (and
  ``ternary_linear_grouped``), its bit-identical PyTorch reference ``reference_linear``, the
  C++ extension (``extension_available``) and the kernel path (``kernel_isa``,
  ``available_isas``, ``set_kernel_isa``).
- ``policies.packed_modules``: ``PackedBitLinear`` and ``pack_model_`` (a model's ``BitLinear``
  layers swapped in place), ``pack_stacked_param_``, ``keep_float32_scales``.

The integers and scales all come from ``policies.quantization`` (BitNet b1.58, arXiv
2402.17764), the same functions the QAT layers use, so a packed model decodes the tokens of
the QAT model. Importing this module loads (or builds) the C++ extension.
"""

from __future__ import annotations

from policies.errors import PackError
from policies.packed_codec import (
    PackedTernary,
    geometry,
    pack_quantized,
    pack_ternary,
    unpack_ternary,
)
from policies.packed_modules import (
    PackedBitLinear,
    keep_float32_scales,
    pack_model_,
    pack_stacked_param_,
)
from policies.packed_op import (
    _FAST,  # noqa: F401  the extension's direct entry point (None without it), read by tests and bench/
    available_isas,
    extension_available,
    kernel_isa,
    reference_linear,
    set_kernel_isa,
    ternary_linear,
    ternary_linear_grouped,
)
from policies.packed_rows import (
    cached_stacked_rows,
    dequantize_rows,
    dequantize_stacked_rows,
    pack_rows,
    pack_stacked_rows,
    stacked_rows_shapes,
    unpack_rows,
)

__all__ = [
    "PackError",
    "PackedBitLinear",
    "PackedTernary",
    "available_isas",
    "cached_stacked_rows",
    "dequantize_rows",
    "dequantize_stacked_rows",
    "extension_available",
    "geometry",
    "kernel_isa",
    "keep_float32_scales",
    "pack_model_",
    "pack_quantized",
    "pack_rows",
    "pack_stacked_param_",
    "pack_stacked_rows",
    "pack_ternary",
    "reference_linear",
    "set_kernel_isa",
    "stacked_rows_shapes",
    "ternary_linear",
    "ternary_linear_grouped",
    "unpack_rows",
    "unpack_ternary",
]
