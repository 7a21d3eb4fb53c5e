"""Row-major 2-bit tables: ternary weights that are gathered by row or used whole, not multiplied by the kernel.

- ``pack_rows`` / ``unpack_rows`` / ``dequantize_rows``: a plain row-major table (the
  micro-agent tables): row i of ``codes`` holds weight k of that row at bits
  2(k mod 4) + 1 : 2(k mod 4) of byte k // 4 (code = q + 1); ``dequantize_rows`` turns only the
  requested rows back into q · scale, the exact values of
  ``policies.ternary.fake_quantize_weight``.
- ``pack_stacked_rows`` / ``dequantize_stacked_rows`` / ``stacked_rows_shapes``: the same row
  codes for a weight (or a stack of them) that is used whole (the micro-agent query nets and
  the persona heads): all rows in order, the scales in ``quantize_stacked``'s shape.
- ``cached_stacked_rows``: such a weight dequantised once and kept until its buffers change.
"""

from __future__ import annotations

import sys

import torch

from policies.errors import PackError
from policies.quantization import check_precision, expand_scale, quantize_stacked


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
