"""The ``ccrl::ternary_linear`` op: its PyTorch reference, the C++ extension and the choice of kernel path.

- ``ternary_linear(x, packed, bias=None)``: a ``torch.library`` op (``ccrl::ternary_linear``)
  defined in C++ (policies/csrc/ternary_op.cpp, compiled against the installed torch on first
  use by ``policies.kernel_build``), with a fake kernel for ``torch.compile`` and a PyTorch
  reference that gives the same bits; without the extension the reference is the op (one
  warning says so). ``ternary_linear_grouped`` runs E stacked matrices (MoE experts) in one
  call, rows split by ``offs`` as ``torch._grouped_mm``.
- Eager calls on plain CPU tensors go through the extension module's ``linear``, a direct
  entry point to the same kernel that skips the dispatcher's boxed argument handling; it
  defers to the op (returns NotImplemented) under torch.compile, dispatch modes, autograd
  recording or non-CPU tensors.

Arithmetic (the C++ paths and ``reference_linear`` agree bit for bit; tests use torch.equal),
with s, K_pad, J from ``policies.packed_codec.geometry``:

    q_x, step = quantize_activation(x, act_block_size)             # exactly policies.quantization's
    acc[m, n, j] = sum_{k in sub-block j} q_x[m, k] * q_w[n, k]     # int32
    y[m, n] = sum_j (float(acc[m, n, j]) * step[m, b(j)]) * w_scale[n, g(j)]
              # float32, left to right from the j = 0 term, no fused multiply-add
    y = y + bias;  y.to(x.dtype)

This is not the float result of ``BitLinear``'s QAT forward (``F.linear`` of the dequantised
tensors rounds differently); it is the same quantised product computed exactly in integers.

Paths (``kernel_isa()``; chosen from cpuid at run time, ``set_kernel_isa`` / the environment
variable ``CCRL_TERNARY_ISA`` force one; every path gives the same bits):
- ``scalar``: portable C++.
- ``avx2``: ``vpmaddubsw`` into int16 windows of 64 inputs, then ``vpmaddwd`` to int32.
- ``avx512`` (AVX-512 VNNI): up to 8 tokens stream the 2-bit codes (decoding is bound by memory);
  more tokens unpack the codes to bytes one chunk of 512 inputs at a time and run register
  blocks of in-place ``vpdpbusd`` over an interleaved copy of the activations (64 consecutive
  bytes per 4 inputs): 32 rows (two tiles) x 8 tokens, each activation broadcast feeding two
  products (16 rows x 16 tokens for a lone last tile), float partial sums in a contiguous buffer.
  A sub-block longer than a chunk (one scale per token and per tensor) is cut at the chunk
  boundaries and its exact int32 sums carried from chunk to chunk.
- ``amx`` (AVX-512 + AMX-INT8, Sapphire Rapids and later; needs the kernel to grant this
  process the tile state): the same streaming for up to 8 tokens; more tokens go through
  ``tdpbssd`` (16 tokens x 64 inputs of activations, copied so that each is one contiguous tile
  and the tiles of all token blocks at one k are adjacent, times 64 inputs x 16 rows of signed
  weights c - 1, so no activation-sum correction is needed), four token blocks sharing one tile
  of weights, the sums staying in the tile registers across chunks, then the same float epilogue.

The int8 dot-product kernel is the one kept; a lookup-table GEMV on the same codes (T-MAC /
bitnet.cpp TL1 style) stays as the experiment ``ccrl::_ternary_tl_linear``. Measurements and
the reasoning behind both choices: docs/policies-notes.md.
"""

from __future__ import annotations

import os
import warnings

import torch

from policies.errors import PackError
from policies.packed_codec import PackedTernary, _unpack_codes, geometry
from policies.quantization import quantize_activation

_ISA_ENV = "CCRL_TERNARY_ISA"   # scalar | avx2 | avx512 | auto: force a kernel path at import


def _reference(x, codes, scale, bias, in_features, group_size, act_block_size):
    geo = geometry(in_features, group_size, act_block_size)
    s, k_pad, nj = geo["s"], geo["k_pad"], geo["J"]
    n = codes.shape[0]
    q_w = _unpack_codes(codes, n, in_features, k_pad)                             # (N, K)
    x2 = x.reshape(-1, in_features)
    q_x, step = quantize_activation(x2, act_block_size)                           # (M, K), (M, B)
    m = q_x.shape[0]
    # Exact integer sums through a float matmul: |partial sums| <= s * 127 < 2^24 (float32),
    # else float64 (< 2^53), then rounded to float32 as the kernel's int32 -> float conversion.
    ftype = torch.float32 if s * 127 < 2**24 else torch.float64
    pad = k_pad - in_features
    qx = torch.nn.functional.pad(q_x, (0, pad)).to(ftype).view(m, nj, s).transpose(0, 1)    # (J, M, s)
    qw = torch.nn.functional.pad(q_w, (0, pad)).to(ftype).view(n, nj, s).permute(1, 2, 0)   # (J, s, N)
    acc = torch.bmm(qx, qw)                                                       # (J, M, N)
    if ftype is torch.float64:
        acc = acc.to(torch.int64)
    acc = acc.to(torch.float32)
    stepj = step[:, geo["bj"]]                                                    # (M, J)
    wsj = scale.float()[:, geo["gj"]].expand(n, nj)                               # (N, J)
    y = (acc[0] * stepj[:, 0:1]) * wsj[:, 0]                                      # (M, N)
    for j in range(1, nj):
        y = y + (acc[j] * stepj[:, j:j + 1]) * wsj[:, j]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).view(*x.shape[:-1], n)


def _reference_grouped(x, codes, scale, bias, offs, in_features, group_size, act_block_size):
    ends = [int(e) for e in offs.tolist()]
    outs, start = [], 0
    for e, end in enumerate(ends):
        b = None if bias is None else bias[e]
        outs.append(_reference(x[start:end], codes[e], scale[e], b, in_features, group_size, act_block_size))
        start = end
    n = codes.shape[-2]
    return torch.cat(outs) if outs else x.new_empty((0, n))


def reference_linear(x: torch.Tensor, packed: PackedTernary, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch statement of ``ternary_linear`` (always pure PyTorch; for tests and other devices)."""
    return _reference(x, packed.codes, packed.scale, bias, packed.in_features, packed.group_size,
                      packed.act_block_size)


_SCHEMA = (
    "(Tensor x, Tensor packed_weight, Tensor weight_scale, Tensor? bias, int in_features, "
    "int? group_size, int? act_block_size) -> Tensor"
)
_SCHEMA_GROUPED = (
    "(Tensor x, Tensor packed_weight, Tensor weight_scale, Tensor? bias, Tensor offs, int in_features, "
    "int? group_size, int? act_block_size) -> Tensor"
)


def _load_extension():
    """The compiled kernels for the running torch (built on first use, ``policies.kernel_build``), or None."""
    from policies.kernel_build import KernelBuildError, load

    try:
        return load()
    except KernelBuildError as err:
        warnings.warn(
            f"ccrl: the ternary C++ kernels are not available ({err}); ternary_linear runs the PyTorch "
            "reference (same results, much slower). `ccrl kernels build` retries and shows the compiler's output.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


_EXT = _load_extension()
_HAS_EXT = _EXT is not None
# Eager CPU calls skip the dispatcher's boxed argument handling (see policies/csrc/ternary_op.cpp);
# it answers NotImplemented whenever the dispatcher must decide, and the op runs instead.
_FAST = _EXT.linear if _HAS_EXT else None

if not _HAS_EXT:
    torch.library.define("ccrl::ternary_linear", _SCHEMA)
    torch.library.define("ccrl::ternary_linear_grouped", _SCHEMA_GROUPED)
    torch.library.impl("ccrl::ternary_linear", "CompositeExplicitAutograd", func=_reference)
    torch.library.impl("ccrl::ternary_linear_grouped", "CompositeExplicitAutograd", func=_reference_grouped)
else:
    # The C++ library implements CPU; other devices run the reference.
    for _key in ("CUDA", "XPU", "MPS"):
        try:
            torch.library.impl("ccrl::ternary_linear", _key, func=_reference)
            torch.library.impl("ccrl::ternary_linear_grouped", _key, func=_reference_grouped)
        except Exception:  # noqa: BLE001 - a backend this torch build does not know
            pass


@torch.library.register_fake("ccrl::ternary_linear")
def _fake(x, packed_weight, weight_scale, bias, in_features, group_size, act_block_size):
    return x.new_empty((*x.shape[:-1], packed_weight.shape[0]))


@torch.library.register_fake("ccrl::ternary_linear_grouped")
def _fake_grouped(x, packed_weight, weight_scale, bias, offs, in_features, group_size, act_block_size):
    return x.new_empty((x.shape[0], packed_weight.shape[-2]))


_OP = torch.ops.ccrl.ternary_linear.default
_OP_GROUPED = torch.ops.ccrl.ternary_linear_grouped.default


def extension_available() -> bool:
    """True when the C++ kernels are loaded."""
    return _HAS_EXT


def kernel_isa() -> str:
    """The kernel path in use: ``"amx"``, ``"avx512"``, ``"avx2"``, ``"scalar"``, or ``"reference"`` without the extension."""
    if not _HAS_EXT:
        return "reference"
    return torch.ops.ccrl._ternary_kernel_isa("").split(" ")[0]


def available_isas() -> list[str]:
    """Kernel paths this CPU can run (empty without the extension)."""
    if not _HAS_EXT:
        return []
    info = torch.ops.ccrl._ternary_kernel_isa("")
    return info.split("available: ")[1].rstrip(")").split(",")


def set_kernel_isa(isa: str) -> str:
    """Force a kernel path (``"scalar"``, ``"avx2"``, ``"avx512"``, ``"amx"``) or go back to the best (``"auto"``).

    Returns the path now in use. Every path gives the same bits; this exists to test and time
    them. The environment variable ``CCRL_TERNARY_ISA`` does the same at import.
    """
    if not _HAS_EXT:
        if isa not in ("auto", "reference"):
            raise PackError(f"set_kernel_isa({isa!r}): the C++ kernels are not built; only the reference runs")
        return "reference"
    try:
        torch.ops.ccrl._ternary_kernel_isa(isa)
    except RuntimeError as err:
        raise PackError(f"set_kernel_isa({isa!r}): {str(err).splitlines()[0]}") from None
    return kernel_isa()


if _HAS_EXT and os.environ.get(_ISA_ENV):
    set_kernel_isa(os.environ[_ISA_ENV])


def ternary_linear(x: torch.Tensor, packed: PackedTernary, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T (+ bias)`` with W the packed ternary weight, activations quantised as ``quantize_activation``.

    ``x`` [..., K] float32 / bfloat16 / float16 -> [..., N] in x's dtype. The C++ kernel when
    built (CPU tensors), else the bit-identical PyTorch reference.
    """
    if packed.codes.dim() != 2:
        raise PackError("ternary_linear: stacked weights need ternary_linear_grouped(x, packed, offs)")
    args = (x, packed.codes, packed.scale, bias, packed.in_features, packed.group_size, packed.act_block_size)
    if _FAST is not None and not torch.compiler.is_compiling():
        y = _FAST(*args)
        if y is not NotImplemented:
            return y
    return _OP(*args)


def ternary_linear_grouped(
    x: torch.Tensor, packed: PackedTernary, offs: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """E stacked matrices in one call: rows ``offs[e-1]:offs[e]`` of ``x`` [T, K] use matrix e.

    ``offs`` [E] are cumulative row ends (as ``torch._grouped_mm``), e.g. ``counts.cumsum(0)``
    of tokens already sorted by expert. Returns [T, N].
    """
    if packed.codes.dim() != 3:
        raise PackError("ternary_linear_grouped: expects stacked [E, N, K] weights (pack_ternary of a 3-D tensor)")
    return _OP_GROUPED(x, packed.codes, packed.scale, bias, offs, packed.in_features, packed.group_size,
                       packed.act_block_size)
