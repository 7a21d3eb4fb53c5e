"""Split-K decode attention in Triton: one query token per row against a KV cache, with a key mask.

A rollout's decode step attends one new token per row over the row's whole context, so it reads
the KV cache once per token: at 128 rows, 1,024 tokens of context and the 0.5B Llama's 24 layers
of 16 × 64-wide heads that is 13.4 GB a step, most of the step's memory traffic. Given a mask
(left padding, and a static cache's columns not written yet), torch's
``scaled_dot_product_attention`` runs it with its memory-efficient kernel; its flash kernel takes
no mask, ``flex_attention`` wants ``torch.compile`` and a block mask per shape, and the
``flash-attn`` package is built against one torch build. So ccrl has this small kernel, in Triton
(which ships with torch's CUDA wheels), of the flash-decoding scheme (Dao et al., "Flash-Decoding
for long-context inference", 2023):

- the keys of each (row b, key-value head j) are split into S chunks; program (b, j, s) walks its
  chunk in blocks of :data:`BLOCK_N` keys and keeps, for the G query heads that share head j
  (grouped-query attention reads each key and value once for all G), the running maximum m, the
  running sum l = Σ exp(x − m) and the unnormalised output acc = Σ exp(x − m) v, in float32, with
  x = scale · q·k over the keys the mask keeps (online softmax);
- with S = 1 it writes acc / l; else a second kernel combines the chunks:
  out = Σ_s exp(m_s − M) acc_s / Σ_s exp(m_s − M) l_s, M = max_s m_s.

S is chosen so that B · H_kv · S programs fill the GPU (:func:`num_splits`); a chunk is at least
:data:`MIN_CHUNK` keys. The products q·k and p·v run on the tensor cores in the inputs' precision
(bf16 or fp16, p rounded to it as flash attention does) with float32 accumulation.
A row whose mask keeps no key gets NaN, as SDPA's math kernel gives; a decode step always keeps
the row's own new key.

:func:`applies` says when the kernel runs (``ccrl.rollout.attention`` dispatches): Triton
importable, CUDA bf16/fp16 tensors, a head dim that is a power of two from 16 to 256, a boolean
mask of shape [B, 1, 1, L] or none; bf16 wants compute capability 8.0 or newer. Everything else
goes to SDPA, and so does every later step on a device where the kernel failed to compile or
launch (:data:`FAILED`; the dispatcher warns once). ``TRITON_INTERPRET=1`` runs the kernels on
CPU tensors (the tests compare them there with the float64 reference).
"""

from __future__ import annotations

import functools
import math

import torch

BLOCK_N = 64
"""keys per block of the online softmax"""
MIN_CHUNK = 256
"""fewest keys a split of the key axis gets"""
PROGRAMS_PER_SM = 4
"""programs of the first kernel to aim for per streaming multiprocessor when choosing S"""


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (torch's CUDA wheels ship it; CPU wheels do not)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


FAILED: dict[str, str] = {}
"""device (``str(torch.device)``) → why the kernel failed there (compilation or launch); the decode
steps on that device then run SDPA (``ccrl.rollout.attention`` records it and warns once)"""


@functools.cache
def _bf16_capable(device_index: int) -> bool:
    """bf16 tensor-core matmuls (compute capability 8.0 or newer)."""
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


@torch.compiler.assume_constant_result
def device_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel can run on ``device`` in ``dtype``: CUDA, Triton importable, and bf16 only
    at compute capability 8.0 or newer. Fixed for a process, so ``torch.compile`` folds it into a
    constant at trace time instead of tracing the device queries (which would break the graph)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not triton_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return dtype != torch.bfloat16 or _bf16_capable(index)


def applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether :func:`decode_attention` takes this one-token step: ``query`` [B, H, 1, D], ``key``
    and ``value`` [B, H_kv, L, D] on CUDA in bf16 (compute capability 8.0 or newer) or fp16 (one
    dtype), D a power of two in 16..256 with unit stride, and ``mask`` None or boolean
    [B or 1, 1, 1, ≥ L]; not on a device where the kernel has failed (:data:`FAILED`).

    Traceable by ``torch.compile`` without a graph break: the device part is
    :func:`device_supports` (a constant at trace time); :data:`FAILED` is read in the traced code,
    so Dynamo guards on it and a failure recorded later recompiles the step onto SDPA."""
    if not (query.dim() == 4 and query.shape[2] == 1 and device_supports(query.device, query.dtype)):
        return False
    if str(query.device) in FAILED:
        return False
    d = query.shape[-1]
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if d < 16 or d > 256 or d & (d - 1) or key.shape[-1] != d or value.shape[-1] != d:
        return False
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1
                             or mask.shape[-1] < key.shape[-2] or mask.shape[0] not in (1, query.shape[0])):
        return False
    return True


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(programs: int, keys: int, device: torch.device) -> int:
    """S for ``programs`` = B · H_kv and ``keys`` = L: enough splits that B · H_kv · S reaches
    :data:`PROGRAMS_PER_SM` programs per multiprocessor, none shorter than :data:`MIN_CHUNK` keys
    (1 off CUDA)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = math.ceil(PROGRAMS_PER_SM * _sm_count(index) / max(programs, 1))
    return max(1, min(want, keys // MIN_CHUNK))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None,
                     scale: float, splits: int | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ over the kept keys) v for one query token per row.

    query [B, H_kv, G, D] (the G query heads sharing key-value head j at [:, j]), key and value
    [B, H_kv, L, D] (any strides but the last), keep [B, L] boolean (a row may broadcast: stride 0)
    or None (every key) → [B, H_kv, G, D] in the query's dtype. ``splits`` overrides S
    (:func:`num_splits`).

    Under ``torch.compile`` the launch goes through the custom op ``ccrl::decode_attention``, which
    Dynamo traces by its output's shape and Inductor leaves opaque: Inductor cannot lower the
    kernel's arguments (the boolean mask viewed as bytes) itself."""
    if torch.compiler.is_compiling():
        return _decode_attention_op(query, key, value, keep, float(scale), int(splits or 0))
    return _launch(query, key, value, keep, scale, splits)


@torch.library.custom_op("ccrl::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None,
                         scale: float, splits: int) -> torch.Tensor:
    """:func:`decode_attention` as an opaque op (``splits`` 0: :func:`num_splits` chooses)."""
    return _launch(query, key, value, keep, scale, splits or None)


@_decode_attention_op.register_fake
def _(query, key, value, keep, scale, splits):
    return query.new_empty(query.shape)


def _launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor | None,
            scale: float, splits: int | None = None) -> torch.Tensor:
    """Launch the two kernels (:func:`decode_attention`)."""
    import triton

    partial, combine = _kernels()
    B, H, G, D = query.shape
    L = key.shape[2]
    block_g = max(16, triton.next_power_of_2(G))
    s = splits or num_splits(B * H, L, query.device)
    chunk = BLOCK_N * math.ceil(math.ceil(L / max(s, 1)) / BLOCK_N)
    s = math.ceil(L / chunk)
    out = torch.empty((B, H, G, D), dtype=query.dtype, device=query.device)
    if s > 1:
        mx = torch.empty((B, H, s, block_g), dtype=torch.float32, device=query.device)
        sm = torch.empty_like(mx)
        acc = torch.empty((B, H, s, block_g, D), dtype=torch.float32, device=query.device)
    else:
        mx = sm = acc = out                                      # unused
    keep_arg = query if keep is None else keep.view(torch.uint8)
    keep_strides = (0, 0) if keep is None else (keep.stride(0), keep.stride(1))
    partial[(B, H, s)](
        query, key, value, keep_arg, out, mx, sm, acc,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        *keep_strides, out.stride(0), out.stride(1), out.stride(2),
        G, L, chunk, scale,
        HAS_KEEP=keep is not None, SPLIT=s > 1, BLOCK_G=block_g, BLOCK_N=BLOCK_N, D=D,
    )
    if s > 1:
        combine[(B, H)](mx, sm, acc, out, out.stride(0), out.stride(1), out.stride(2), G, s, BLOCK_G=block_g, D=D)
    return out


@functools.cache
def _kernels():
    """The two Triton kernels, defined on first use (importing this module needs no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def partial(Q, K, V, Keep, Out, Mx, Sm, Acc,
                sqb, sqh, sqg, skb, skh, skn, svb, svh, svn, smb, smn, sob, soh, sog,
                G, L, chunk, scale,
                HAS_KEEP: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1).to(tl.int64)
        s = tl.program_id(2)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        n = tl.arange(0, BLOCK_N)
        q = tl.load(Q + b * sqb + j * sqh + g[:, None] * sqg + d[None, :], mask=g[:, None] < G, other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        start = s * chunk
        end = tl.minimum(start + chunk, L)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + n
            live = cols < end
            if HAS_KEEP:
                live = live & (tl.load(Keep + b * smb + cols * smn, mask=live, other=0) != 0)
            k = tl.load(K + b * skb + j * skh + cols[:, None] * skn + d[None, :], mask=live[:, None], other=0.0)
            v = tl.load(V + b * svb + j * svh + cols[:, None] * svn + d[None, :], mask=live[:, None], other=0.0)
            x = tl.dot(q, tl.trans(k)) * scale                                   # (BLOCK_G, BLOCK_N) float32
            x = tl.where(live[None, :], x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)                 # no key kept yet: exp(-inf) = 0
            p = tl.exp(x - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if SPLIT:
            row = ((b * tl.num_programs(1) + j) * tl.num_programs(2) + s) * BLOCK_G
            tl.store(Mx + row + g, m_i)
            tl.store(Sm + row + g, l_i)
            tl.store(Acc + (row + g[:, None]) * D + d[None, :], acc)
        else:
            o = acc / l_i[:, None]
            tl.store(Out + b * sob + j * soh + g[:, None] * sog + d[None, :], o.to(Out.dtype.element_ty),
                     mask=g[:, None] < G)

    @triton.jit
    def combine(Mx, Sm, Acc, Out, sob, soh, sog, G, S, BLOCK_G: tl.constexpr, D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        first = (b * tl.num_programs(1) + j) * S
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        for s in range(0, S):
            m = tl.maximum(m, tl.load(Mx + (first + s) * BLOCK_G + g))
        m = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for s in range(0, S):
            row = (first + s) * BLOCK_G
            w = tl.exp(tl.load(Mx + row + g) - m)
            total += w * tl.load(Sm + row + g)
            acc += w[:, None] * tl.load(Acc + (row + g[:, None]) * D + d[None, :])
        o = acc / total[:, None]
        tl.store(Out + b * sob + j * soh + g[:, None] * sog + d[None, :], o.to(Out.dtype.element_ty),
                 mask=g[:, None] < G)

    return partial, combine
