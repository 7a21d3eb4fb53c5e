"""The 2-bit "I2-tile" format of packed ternary weights (what the kernel reads).

- ``pack_ternary(weight, group_size=128, act_block_size=64) -> PackedTernary``: the absmean
  ternary weights of ``policies.quantization.quantize_weight`` at 2 bits each (4 per byte) plus
  the float32 scale of each group; ``unpack_ternary`` gives back ``(q, scale)`` exactly.
  ``pack_quantized`` packs integers already quantised (ternary or binary codes).
- ``geometry``: the sub-block size s = min(weight group, activation block) (both multiples of
  16, the larger a multiple of s; per tensor / per token count as infinite), K_pad = ceil(K / s) * s,
  J = K_pad / s, and the maps from sub-block j to its weight group and activation block.

Layout (codes c = w + 1 in {0, 1, 2}): rows in tiles of 16 (the last tile may be shorter,
h rows), each tile K_pad / 16 chunks of 4h bytes; bits 2p+1:2p of byte 4l + t of chunk c hold
row l at k = 16c + 4p + t. ``(v >> 2p) & 3`` of a 64-byte chunk is one ``vpdpbusd`` operand
with one output row per 32-bit lane; the kernel's accumulator starts at -sum(q_x) to undo the
+1 (bitnet.cpp's I2_S correction). ``codes`` has shape [N, K_pad / 4] (its bytes are
tile-interleaved, not row-major): exactly N * K_pad / 4 bytes, plus 4 * N * G bytes of scales.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from policies.errors import PackError
from policies.quantization import quantize_weight

TILE = 16    # output rows per tile of the packed layout
CHUNK = 16   # k values per chunk (4 per byte position, 4 byte positions)
_INF = 1 << 62
_ISA_ENV = "CCRL_TERNARY_ISA"   # scalar | avx2 | avx512 | auto: force a kernel path at import


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
