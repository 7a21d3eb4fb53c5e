"""Packed ternary weights and the ``ccrl::ternary_linear`` op (C++ kernel, PyTorch reference).

What is here
- ``pack_ternary(weight, group_size=128, act_block_size=64) -> PackedTernary``: the absmean
  ternary weights of ``policies.ternary.quantize_weight`` at 2 bits each (4 per byte) plus the
  float32 scale of each group; ``unpack_ternary`` gives back ``(q, scale)`` exactly.
- ``ternary_linear(x, packed, bias=None)``: a ``torch.library`` op (``ccrl::ternary_linear``)
  defined in C++ (policies/csrc/ternary_op.cpp, compiled against the installed torch on first
  use by ``policies.kernel_build``), with a fake kernel for ``torch.compile`` and a PyTorch reference that gives the same bits; without the
  extension the reference is the op (one warning says so). ``ternary_linear_grouped`` runs E
  stacked matrices (MoE experts) in one call, rows split by ``offs`` as ``torch._grouped_mm``.
- ``PackedBitLinear`` and ``pack_model_(model)``: an eval-mode model's ``BitLinear`` layers
  switched in place to packed weights and the kernel.
- ``pack_rows`` / ``dequantize_rows``: a plain row-major 2-bit table for weights that are
  gathered by row instead of multiplied (the micro-agent tables): row i of ``codes`` holds
  weight k of that row at bits 2(k mod 4) + 1 : 2(k mod 4) of byte k // 4 (code = q + 1);
  ``dequantize_rows`` turns only the requested rows back into q · scale, the exact values of
  ``policies.ternary.fake_quantize_weight``.
- ``pack_stacked_rows`` / ``dequantize_stacked_rows``: the same row codes for a weight (or a
  stack of them) that is used whole, not through the kernel (the micro-agent query nets and the
  persona heads): all rows in order, the scales in ``quantize_stacked``'s shape.

Arithmetic (the C++ paths and ``reference_linear`` agree bit for bit; tests use torch.equal).
Let s = min(weight group, activation block) (both multiples of 16, the larger a multiple of
s; per tensor / per token count as infinite), K_pad = ceil(K / s) * s, J = K_pad / s:

    q_x, step = quantize_activation(x, act_block_size)             # exactly policies.ternary's
    acc[m, n, j] = sum_{k in sub-block j} q_x[m, k] * q_w[n, k]     # int32
    y[m, n] = sum_j (float(acc[m, n, j]) * step[m, b(j)]) * w_scale[n, g(j)]
              # float32, left to right from the j = 0 term, no fused multiply-add
    y = y + bias;  y.to(x.dtype)

This is not the float result of ``BitLinear``'s QAT forward (``F.linear`` of the dequantised
tensors rounds differently); it is the same quantised product computed exactly in integers.

Layout ("I2-tile", codes c = w + 1 in {0, 1, 2}): rows in tiles of 16 (the last tile may be
shorter, h rows), each tile K_pad / 16 chunks of 4h bytes; bits 2p+1:2p of byte 4l + t of
chunk c hold row l at k = 16c + 4p + t. ``(v >> 2p) & 3`` of a 64-byte chunk is one
``vpdpbusd`` operand with one output row per 32-bit lane; the accumulator starts at -sum(q_x)
to undo the +1 (bitnet.cpp's I2_S correction). ``codes`` has shape [N, K_pad / 4] (its bytes
are tile-interleaved, not row-major): exactly N * K_pad / 4 bytes, plus 4 * N * G bytes of scales.

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
At batch 64 the epilogue the default arithmetic requires (a float conversion, two products and a
sum per 16 outputs and sub-block of 64 inputs) is what bounds both GEMM paths: with group 128 /
block 64 they reach 0.6-1.3x of oneDNN's ``torch._int_mm`` (which scales nothing) depending on
the shape and machine, 1.2-1.5x faster than AMX bf16. With BitNet b1.58's scales
(``group_size=None, act_block_size=None``: one epilogue per output) they are 1.1-1.5x faster
than ``_int_mm`` on both ISAs (BENCHMARKS.md).

Kernel variant kept: the int8 dot-product kernel. A lookup-table GEMV on the same 2-bit codes
(T-MAC / bitnet.cpp TL1 style: a 4-bit index of two weights selects one of 9 precomputed int16
pair sums, split in low/high-byte tables for ``vpshufb``; AVX2, kept as the experiment
``ccrl::_ternary_tl_linear``) was timed against it at batch 1 with ``bench/kernels.py --tl``
(median ms, 2 threads, hot = same weights every call / cold = streamed from DRAM; both
machines shared with other work, so expect +-20%):

    out x in      AMD EPYC Zen 3 (AVX2, no VNNI)      Xeon Sapphire Rapids (AVX-512 VNNI)
                  dot-product      lookup table       dot-product      lookup table (AVX2)
    6912 x 2560   0.206 / 0.227    0.233 / 0.259      0.178 / 0.338    0.245 / 0.374
    2560 x 6912   0.233 / 0.282    0.259 / 0.300      0.235 / 0.361    0.398 / 0.428
    4096 x 4096   0.204 / 0.231    0.229 / 0.264      0.242 / 0.370    0.388 / 0.457

The table is 10-15% slower with AVX2 and 10-70% slower than VNNI because with 2-bit codes it
does not save work: per 32 rows x 4 weights it needs 4 ``vpshufb`` + 4 byte unpacks + 4 adds
+ 4 table loads to build int16 sums (a pair sum overflows int8), while ``vpmaddubsw`` covers
8 rows x 4 weights in one instruction plus an int16 add, and ``vpdpbusd`` 16 rows x 4 weights
in one. Tables pay off in T-MAC / TL2 through fewer bits per weight (1.67-bit base-3 packing)
and where int8 dot products are slow (ARM without SDOT); batch > 1 needs the dot product
anyway (a table is rebuilt per token), and one layout then serves GEMV and GEMM.
(The Sapphire Rapids dot-product figures predate the last GEMV tuning, which brought cold
batch-1 to 0.27-0.30 ms there.)

Per-call cost (16 x 64 layer, batch 1, inference mode): through the dispatcher
(``torch.ops.ccrl.ternary_linear``) 4-7 us; ``PackedBitLinear`` and ``ternary_linear`` call
the extension module's ``linear``, a direct entry point to the same kernel for plain CPU tensors,
1.0-1.3 us (fp32 ``F.linear`` of the same shape: 2.5 us). It defers to the op (returns
NotImplemented) under torch.compile, dispatch modes, autograd recording or non-CPU tensors.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import NamedTuple

import torch
from torch import nn

from ccrl.errors import CcrlError
from policies.ternary import quantize_activation, quantize_weight

__all__ = [
    "PackError",
    "PackedBitLinear",
    "PackedTernary",
    "available_isas",
    "cached_stacked_rows",
    "dequantize_rows",
    "dequantize_stacked_rows",
    "extension_available",
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

TILE = 16    # output rows per tile of the packed layout
CHUNK = 16   # k values per chunk (4 per byte position, 4 byte positions)
_INF = 1 << 62
_ISA_ENV = "CCRL_TERNARY_ISA"   # scalar | avx2 | avx512 | auto: force a kernel path at import


class PackError(CcrlError, ValueError):
    """A weight or model that cannot be packed as asked (sizes, mode), or a bad kernel setting."""


# ---------------------------------------------------------------------------------------------
# The format
# ---------------------------------------------------------------------------------------------


class PackedTernary(NamedTuple):
    """2-bit ternary weights in the kernel's layout (see the module docstring)."""

    codes: torch.Tensor          # uint8 [N, K_pad / 4], or [E, N, K_pad / 4] for stacked matrices
    scale: torch.Tensor          # float32 [N, G] (or [1, 1] per tensor); [E, ...] when stacked
    in_features: int             # K
    out_features: int            # N
    group_size: int | None       # weight group along K (None: one scale per tensor)
    act_block_size: int | None   # activation block along K (None: one scale per token)

    @property
    def k_pad(self) -> int:
        return geometry(self.in_features, self.group_size, self.act_block_size)["k_pad"]

    def nbytes(self) -> int:
        """Bytes of codes plus scales."""
        return self.codes.numel() + self.scale.numel() * self.scale.element_size()


def _norm(size: int | None) -> int | None:
    return size if size is not None and size > 0 else None


def geometry(in_features: int, group_size: int | None, act_block_size: int | None) -> dict:
    """Sub-block size ``s``, ``k_pad``, ``J``, ``G`` and the maps j -> group ``gj`` / j -> block ``bj``."""
    k = int(in_features)
    gs, ab = _norm(group_size), _norm(act_block_size)
    eg = gs if gs is not None and gs < k else _INF
    eb = ab if ab is not None and ab < k else _INF
    if eg == _INF and eb == _INF:
        s = (k + 15) // 16 * 16
    else:
        s = min(eg, eb)
        big = max(eg, eb)
        if s % 16:
            raise PackError(
                f"packed ternary: weight group ({group_size}) and activation block ({act_block_size}) "
                "must be multiples of 16"
            )
        if big != _INF and big % s:
            raise PackError(
                f"packed ternary: the larger of weight group ({group_size}) and activation block "
                f"({act_block_size}) must be a multiple of the smaller"
            )
    k_pad = (k + s - 1) // s * s
    nj = k_pad // s
    return {
        "s": s,
        "k_pad": k_pad,
        "J": nj,
        "G": 1 if eg == _INF else (k + eg - 1) // eg,
        "gj": [0 if eg == _INF else j * s // eg for j in range(nj)],
        "bj": [0 if eb == _INF else j * s // eb for j in range(nj)],
    }


def _tile_rows(n: int):
    """(row start, rows) of each run of equal-height tiles: the full tiles, then the short one."""
    full = n // TILE * TILE
    runs = [(0, full)] if full else []
    if n - full:
        runs.append((full, n - full))
    return runs


def _pack_codes(q: torch.Tensor, k_pad: int) -> torch.Tensor:
    """int8 ternary [N, K] -> uint8 [N, K_pad / 4] in the I2-tile layout."""
    n, k = q.shape
    c = (q.to(torch.int16) + 1).to(torch.uint8)                                  # (N, K) in {0,1,2}
    if k_pad > k:
        c = torch.nn.functional.pad(c, (0, k_pad - k), value=1)                   # code 1 = weight 0
    parts = []
    for r0, rows in _tile_rows(n):
        h = min(rows, TILE)
        v = c[r0:r0 + rows].reshape(rows // h, h, k_pad // CHUNK, 4, 4)          # (T, l, c, p, t)
        v = v.permute(0, 2, 1, 4, 3)                                              # (T, c, l, t, p)
        b = v[..., 0] | (v[..., 1] << 2) | (v[..., 2] << 4) | (v[..., 3] << 6)   # (T, c, l, t)
        parts.append(b.reshape(-1))
    return torch.cat(parts).view(n, k_pad // 4)


def _unpack_codes(codes: torch.Tensor, n: int, k: int, k_pad: int) -> torch.Tensor:
    """Inverse of ``_pack_codes``: int8 [N, K] in {-1, 0, 1}."""
    flat = codes.reshape(-1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=codes.device)
    rows_out = []
    for r0, rows in _tile_rows(n):
        h = min(rows, TILE)
        b = flat[r0 * k_pad // 4:(r0 + rows) * k_pad // 4].view(rows // h, k_pad // CHUNK, h, 4)  # (T,c,l,t)
        v = (b.unsqueeze(-1) >> shifts) & 3                                       # (T, c, l, t, p)
        v = v.permute(0, 2, 1, 4, 3).reshape(rows, k_pad)                         # (rows, K_pad)
        rows_out.append(v)
    return (torch.cat(rows_out)[:, :k].to(torch.int8) - 1)


def pack_quantized(
    q: torch.Tensor,
    scale: torch.Tensor,
    group_size: int | None = 128,
    act_block_size: int | None = 64,
) -> PackedTernary:
    """Pack already-quantised weights: ``q`` int8 [N, K] (or [E, N, K]) in {-1, 0, 1} with ``scale``.

    Ternary (``quantize_weight``) and binary (``quantize_weight_binary``, codes {-1, 1}) weights
    share the format.
    """
    *lead, n, k = q.shape
    geo = geometry(k, group_size, act_block_size)
    if lead:
        codes = torch.stack([_pack_codes(qe, geo["k_pad"]) for qe in q.reshape(-1, n, k)])
        codes = codes.view(*lead, n, geo["k_pad"] // 4)
    else:
        codes = _pack_codes(q, geo["k_pad"])
    g = geo["G"]
    scale = scale.detach().to(torch.float32).contiguous()
    if tuple(scale.shape[-2:]) not in ((n, g), (1, 1)):
        raise PackError(f"packed ternary: scale of shape {tuple(scale.shape)} does not fit [{n}, {g}] or [1, 1]")
    return PackedTernary(codes, scale, k, n, _norm(group_size), _norm(act_block_size))


def pack_ternary(
    weight: torch.Tensor,
    group_size: int | None = 128,
    act_block_size: int | None = 64,
) -> PackedTernary:
    """Quantise ``weight`` [N, K] (or stacked [E, N, K]) with ``quantize_weight`` and pack it to 2 bits."""
    if weight.dim() == 2:
        q, scale = quantize_weight(weight, group_size)
    elif weight.dim() == 3:
        pairs = [quantize_weight(w, group_size) for w in weight]
        q, scale = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    else:
        raise PackError(f"pack_ternary: expected a [N, K] or [E, N, K] weight, got shape {tuple(weight.shape)}")
    return pack_quantized(q, scale, group_size, act_block_size)


def unpack_ternary(packed: PackedTernary) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [N, K] in {-1, 0, 1}, scale float32)`` from a ``PackedTernary`` (stacked: [E, N, K])."""
    n, k, k_pad = packed.out_features, packed.in_features, packed.k_pad
    if packed.codes.dim() == 3:
        q = torch.stack([_unpack_codes(c, n, k, k_pad) for c in packed.codes])
    else:
        q = _unpack_codes(packed.codes, n, k, k_pad)
    return q, packed.scale


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """int8 [R, K] in {-1, 0, 1} -> uint8 [R, ceil(K / 4)], row-major, 4 weights per byte.

    Weight k of a row sits at bits 2(k mod 4) + 1 : 2(k mod 4) of byte k // 4 as the code q + 1;
    a ragged tail is padded with code 1 (weight 0). Exactly R * ceil(K / 4) bytes.
    """
    r, k = q.shape
    c = (q.to(torch.int16) + 1).to(torch.uint8)                                   # (R, K) in {0,1,2}
    pad = (-k) % 4
    if pad:
        c = torch.nn.functional.pad(c, (0, pad), value=1)
    c = c.view(r, -1, 4)                                                          # (R, K4, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).contiguous()


_ROW_LUTS: dict = {}


def _row_lut(width: int, device: torch.device) -> torch.Tensor:
    """Entry c of the table holds, as its raw bytes, the int8 weights (code - 1) of the ``width``
    code bytes whose little-endian value is c: int32 [256] for one byte, int64 [65536] for two."""
    key = (width, device)
    lut = _ROW_LUTS.get(key)
    if lut is None:
        c = torch.arange(256 ** width, dtype=torch.int64)
        vals = torch.stack([((c >> (2 * p)) & 3) - 1 for p in range(4 * width)], -1).to(torch.int8)
        dtype = torch.int32 if width == 1 else torch.int64
        lut = _ROW_LUTS[key] = vals.contiguous().view(dtype).view(-1).to(device)
    return lut


def unpack_rows(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``pack_rows`` for codes [..., ceil(K / 4)]: int8 [..., K] in {-1, 0, 1}.

    One table lookup per two code bytes (8 weights; per byte when a row has an odd number of
    bytes), far cheaper than shifting and masking every weight.
    """
    lead, nbytes = codes.shape[:-1], codes.shape[-1]
    codes = codes.contiguous()
    if nbytes % 2 == 0 and sys.byteorder == "little":             # two code bytes read as one int16
        idx = codes.view(torch.int16).reshape(-1).to(torch.int32) & 0xFFFF
        lut = _row_lut(2, codes.device)
    else:
        idx, lut = codes.reshape(-1).to(torch.int32), _row_lut(1, codes.device)
    q = torch.index_select(lut, 0, idx).view(torch.int8)                        # (n · bytes · 4)
    return q.view(*lead, nbytes * 4)[..., :k]


def dequantize_rows(
    codes: torch.Tensor,
    scale: torch.Tensor,
    k: int,
    group_size: int | None,
    dtype: torch.dtype = torch.float32,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """q · scale of rows of a ``pack_rows`` table -> [..., K] in ``dtype``.

    ``codes`` uint8 [R, ceil(K / 4)] and ``scale`` float32 [R, G] (G = ceil(K / group_size),
    or 1); with ``rows`` (any shape of row ids) only those rows are read and dequantised and the
    result is [*rows.shape, K], else every row. The product is taken in float32 and then cast,
    as ``fake_quantize_weight`` computes it, so the values are bit-identical to the QAT
    forward's for the same rows.
    """
    from policies.ternary import expand_scale

    lead = codes.shape[:-1] if rows is None else rows.shape
    if rows is not None:
        flat = rows.reshape(-1)
        codes, scale = codes.index_select(0, flat), scale.index_select(0, flat)
    q = unpack_rows(codes.reshape(-1, codes.shape[-1]), k)                        # (n, K) int8, n rows
    n, g = q.shape[0], scale.shape[-1]
    scale = scale.reshape(n, g).to(torch.float32)                                 # (n, G)
    out = q.to(torch.float32)                                                     # (n, K) in {-1, 0, 1}
    if g == 1:
        out.mul_(scale)
    elif k % g == 0 and k // g == group_size:                                     # whole groups: broadcast
        out.view(n, g, group_size).mul_(scale.unsqueeze(-1))
    else:
        out.mul_(expand_scale(scale, k, group_size))
    return out.to(dtype).view(*lead, k)


def stacked_rows_shapes(shape, group_size: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(codes shape, scale shape)`` that ``pack_stacked_rows`` gives for a weight of ``shape`` [..., N, K]:
    codes [R, ceil(K / 4)] with R the product of the other dims, scales as ``quantize_stacked``
    returns them: [..., N, G] (G = ceil(K / group_size), 1 when a group spans the row), or
    [..., 1, 1] (one per matrix) for ``group_size=None``."""
    *lead, n, k = (int(x) for x in shape)
    rows = n
    for x in lead:
        rows *= x
    if group_size is None or group_size <= 0:
        scale = (*lead, 1, 1)
    else:
        scale = (*lead, n, 1 if group_size >= k else -(-k // group_size))
    return (rows, -(-k // 4)), scale


def pack_stacked_rows(
    weight: torch.Tensor, precision: str = "ternary", group_size: int | None = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight or a stack [..., N, K] that is used whole (not through the kernel) as 2-bit row codes.

    Returns ``(codes, scale)``: ``pack_rows`` of the ``quantize_stacked`` integers, all rows in
    order (uint8 [R, ceil(K / 4)]), and their float32 scales in ``quantize_stacked``'s shape
    (see ``stacked_rows_shapes``). ``dequantize_stacked_rows`` gives back the values of
    ``policies.ternary.fake_quantize_weight(weight, precision, group_size)`` bit for bit.
    """
    from policies.ternary import check_precision, quantize_stacked

    if check_precision(precision, "pack_stacked_rows.precision") == "fp":
        raise PackError("pack_stacked_rows: a full-precision weight has no 2-bit codes")
    q, scale = quantize_stacked(weight, precision, group_size)                   # (..., N, K), (..., N|1, G|1)
    return pack_rows(q.reshape(-1, q.shape[-1])), scale.to(torch.float32).contiguous()


def dequantize_stacked_rows(
    codes: torch.Tensor,
    scale: torch.Tensor,
    shape,
    group_size: int | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """q · scale of a ``pack_stacked_rows`` weight, as a tensor of ``shape`` [..., N, K] in ``dtype``.

    The product is taken in float32 and then cast, as ``fake_quantize_weight`` computes it.
    """
    from policies.ternary import expand_scale

    shape = tuple(int(x) for x in shape)
    want_codes, want_scale = stacked_rows_shapes(shape, group_size)
    if tuple(codes.shape) != want_codes or tuple(scale.shape) != want_scale:
        raise PackError(
            f"dequantize_stacked_rows: codes {tuple(codes.shape)} and scale {tuple(scale.shape)} do not fit a "
            f"weight of shape {shape} with weight groups of {group_size} (expected {want_codes} and {want_scale})"
        )
    k = shape[-1]
    q = unpack_rows(codes, k).view(shape)                                         # (..., N, K) int8
    out = q.to(torch.float32) * expand_scale(scale.to(torch.float32), k, group_size)
    return out.to(dtype)


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


def cached_stacked_rows(
    cache: dict,
    name: str,
    codes: torch.Tensor,
    scale: torch.Tensor,
    shape,
    group_size: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``dequantize_stacked_rows`` of the buffers ``codes`` / ``scale``, kept in ``cache[name]`` until they change.

    A packed module dequantises such a weight once instead of at every forward (a decoding step
    is one forward). The entry is recomputed when either buffer is replaced, moved or written in
    place (``load_state_dict`` copies into it), or when the dtype or inference mode differs.
    """
    key = (codes.data_ptr(), codes._version, scale.data_ptr(), scale._version, codes.device, dtype,
           torch.is_inference_mode_enabled())
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        value = dequantize_stacked_rows(codes, scale, shape, group_size, dtype)
    cache[name] = (key, value)
    return value


def keep_float32_scales(module: nn.Module, names, fn, recurse: bool = True):
    """``nn.Module._apply`` for a module with packed scale buffers ``names``: ``module.to(dtype)``
    moves them but keeps them float32 (the exact scales of the codes). Returns the module."""
    scales = {n: getattr(module, n) for n in names if isinstance(getattr(module, n, None), torch.Tensor)}
    out = nn.Module._apply(module, fn, recurse)
    for n, scale in scales.items():
        if getattr(module, n).dtype != torch.float32:
            setattr(module, n, scale.to(device=getattr(module, n).device))
    return out


# ---------------------------------------------------------------------------------------------
# The PyTorch reference (same integers, same float ops in the same order)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The op: C++ when built, the reference otherwise
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


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
