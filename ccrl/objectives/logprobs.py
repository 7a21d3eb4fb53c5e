"""Per-token log-probabilities and entropies without a float32 (B, T, V) tensor.

``token_logprobs`` is the "gather minus logsumexp" identity

    log softmax(z)_a = z_a − log Σ_v exp(z_v)

evaluated over chunks of rows, so the only (rows, V) temporaries are one chunk's (the
same trick as TRL's ``selective_log_softmax``, which loops row by row). Low-precision
logits (bf16/fp16) are upcast one chunk at a time: logsumexp in bf16 loses ~2 digits,
which is why TRL falls back to a per-row ``log_softmax`` there. The result has the dtype
of the logits for fp32/fp64 inputs and float32 otherwise.

``token_entropy`` is H = logsumexp(z) − Σ_v softmax(z)_v z_v (nats), chunked the same way;
it equals TRL's ``entropy_from_logits`` (−Σ p log p).

``chunked_token_logprobs`` starts one step earlier, from the final hidden states h and the
output head's weight W: the logits z = h Wᵀ (+ b) of one chunk of tokens are formed, folded
into the chosen token's log-probability (and entropy) in float32, and dropped, so neither
the (N, V) logits nor their float32 copy exist at once, in the forward or in the backward
(a custom autograd Function that recomputes each chunk's logits; it forms them in tiles of
vocabulary columns of at most ``TILE_BYTES`` of float32, as TRL 1.16's fused LM head works in tiles
of tokens × vocabulary). Its gradient, per token, with p = softmax(z / τ):

    ∂ log p_a / ∂z_v = (1[v = a] − p_v) / τ
    ∂ H / ∂z_v       = −p_v (log p_v + H) / τ
"""

from __future__ import annotations

import torch

from ccrl.objectives._checks import ObjectiveInputError

DEFAULT_CHUNK_ROWS = 256
"""rows (flattened leading positions) processed per chunk; peak extra memory ≈ chunk·V floats"""

AUTO_CHUNK_BYTES = 256 * 2**20
"""``chunked_token_logprobs`` with ``chunk_size="auto"``: the float32 logits of one chunk take at
most this many bytes (256 MiB: 441 tokens at a vocabulary of 151,936, 2,097 at 32,000)"""
MIN_AUTO_CHUNK = 64
"""the smallest automatic chunk (tokens), whatever the vocabulary: a chunk's matmul stays a real GEMM"""

TILE_BYTES = 64 * 2**20
"""the float32 bytes of one tile of a chunk's logits: more chunks than one run through
``_ChunkedHead``, which forms each chunk's logits in tiles of vocabulary columns of at most this many
bytes (the whole vocabulary when it fits). Its backward holds 1.5 tiles at a time under bf16
autocast (∂/∂z in float32 and its bf16 copy for the matmuls), 96 MiB, plus the bf16 copy of the
tile's rows of the weight (never the whole weight's), and runs when the training
pass's saved activations are all alive, so what it holds adds to the step's peak memory: with whole
256 MiB chunks (and p in a buffer of its own, 640 MiB) a 0.5B model's GRPO step at a vocabulary of
32,000 peaked above TRL 1.16's, whose fused head holds one 256 MiB bf16 tile."""
MIN_TILE = 1024
"""the narrowest tile (vocabulary columns), whatever the chunk: a tile's matmul stays a real GEMM"""


def _check_temperature(temperature: float, where: str) -> None:
    if temperature <= 0:
        raise ObjectiveInputError(f"{where}: temperature must be > 0, got {temperature}")


def _blocks(chunk_rows: int, logits: torch.Tensor, ids: torch.Tensor | None = None):
    """Yield ((n, V) logits, (n, 1) ids or None) blocks covering the rows in order.

    Splitting happens along the first dim before any reshape, so a non-contiguous input
    (e.g. ``logits[:, :-1]``) is copied one block at a time, never as a whole.
    """
    if logits.dim() == 1:
        logits = logits[None]
        ids = None if ids is None else ids.reshape(1)
    per_row = 1
    for size in logits.shape[1:-1]:
        per_row *= size
    step = max(1, chunk_rows // max(per_row, 1))
    id_blocks = ids.split(step, dim=0) if ids is not None else [None] * len(range(0, logits.shape[0], step))
    for block, idx in zip(logits.split(step, dim=0), id_blocks):
        flat = block.reshape(-1, block.shape[-1])  # (n, V); copies only this block if non-contiguous
        flat_idx = None if idx is None else idx.reshape(-1, 1).long()  # (n, 1)
        if flat.shape[0] <= chunk_rows:
            yield flat, flat_idx
            continue
        for j in range(0, flat.shape[0], chunk_rows):
            yield flat[j : j + chunk_rows], None if flat_idx is None else flat_idx[j : j + chunk_rows]


def _chunk_float(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    if chunk.dtype not in (torch.float32, torch.float64):
        chunk = chunk.float()  # upcast one chunk only
    return chunk / temperature if temperature != 1.0 else chunk


def token_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """log π(ids | ·) = gather(z, ids) − logsumexp(z), computed chunk by chunk.

    Args:
        logits: (..., V) unnormalised scores (for the Quillan policy these are already
            log π_Ω, and the identity still holds since logsumexp(log π) = 0).
        ids: (...) token ids to score, same leading shape as ``logits``.
        temperature: the sampling temperature; logits are divided by it (as TRL does)
            so the log-probs match the distribution the tokens were sampled from.
        chunk_rows: rows per chunk (memory/speed trade-off; the result does not depend on it).

    Returns:
        (...) log-probabilities, differentiable with respect to ``logits``.
    """
    if logits.shape[:-1] != ids.shape:
        raise ObjectiveInputError(
            f"token_logprobs: ids{list(ids.shape)} must match logits{list(logits.shape)} without the last dim"
        )
    _check_temperature(temperature, "token_logprobs")
    out = []
    for rows, idx in _blocks(chunk_rows, logits, ids):
        z = _chunk_float(rows, temperature)  # (n, V)
        out.append(z.gather(-1, idx).squeeze(-1) - torch.logsumexp(z, dim=-1))  # (n,)
    if not out:
        dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
        return logits.new_zeros(ids.shape, dtype=dtype)
    return torch.cat(out).reshape(ids.shape)  # (...)


def entropy_of_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v p_v log p_v of normalised log-probabilities ``logp`` (..., V) → (...): the one home
    of the token-entropy formula (``token_entropy``, ``token_logprobs_and_entropy`` and the rollout use it)."""
    return -(logp.exp() * logp).sum(-1)


def token_entropy(
    logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    *,
    normalized: bool = False,
) -> torch.Tensor:
    """Shannon entropy H = −Σ_v p_v log p_v of softmax(logits / temperature), in nats.

    Args:
        logits: (..., V).
        normalized: ``logits`` are already log-probabilities (log_softmax applied, at the
            temperature wanted), so no softmax is taken again: the rollout's sampler has them
            for its token log-probs. ``temperature`` must then be 1.
    Returns:
        (...) entropies, differentiable with respect to ``logits``.
    """
    _check_temperature(temperature, "token_entropy")
    if normalized and temperature != 1.0:
        raise ObjectiveInputError(f"token_entropy: normalized log-probs take temperature 1, got {temperature}")
    out = []
    for rows, _ in _blocks(chunk_rows, logits):
        z = _chunk_float(rows, temperature)  # (n, V)
        logp = z if normalized else torch.log_softmax(z, dim=-1)  # (n, V)
        out.append(entropy_of_logprobs(logp))  # (n,)
    if not out:
        dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
        return logits.new_zeros(logits.shape[:-1], dtype=dtype)
    return torch.cat(out).reshape(logits.shape[:-1])  # (...)


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both :func:`token_logprobs` and :func:`token_entropy` in one pass over each chunk."""
    if logits.shape[:-1] != ids.shape:
        raise ObjectiveInputError(
            f"token_logprobs_and_entropy: ids{list(ids.shape)} must match logits{list(logits.shape)} "
            "without the last dim"
        )
    _check_temperature(temperature, "token_logprobs_and_entropy")
    lps, ents = [], []
    for rows, idx in _blocks(chunk_rows, logits, ids):
        logp = torch.log_softmax(_chunk_float(rows, temperature), dim=-1)  # (n, V)
        lps.append(logp.gather(-1, idx).squeeze(-1))  # (n,)
        ents.append(entropy_of_logprobs(logp))  # (n,)
    if not lps:
        return token_logprobs(logits, ids, temperature), token_entropy(logits, temperature)
    return torch.cat(lps).reshape(ids.shape), torch.cat(ents).reshape(ids.shape)


def auto_chunk_size(vocab_size: int, budget_bytes: int = AUTO_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits (tokens × ``vocab_size`` × 4 bytes) fit in
    ``budget_bytes``; at least :data:`MIN_AUTO_CHUNK`."""
    if vocab_size < 1:
        raise ObjectiveInputError(f"auto_chunk_size: vocab_size must be >= 1, got {vocab_size}")
    return max(MIN_AUTO_CHUNK, budget_bytes // (4 * vocab_size))


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    chunk_size: int | str = "auto",
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(ids | ·) and optionally the entropy H of softmax(h Wᵀ + b) / τ), chunk by chunk over tokens.

    Args:
        hidden: (..., H) final hidden states, the output head's input at the positions that predict ``ids``.
        weight: (V, H) the output head's weight (``lm_head.weight``; the embedding when tied).
        ids: (...) token ids to score, the leading shape of ``hidden``.
        chunk_size: tokens per chunk, or ``"auto"`` (:func:`auto_chunk_size` of V). The result does
            not depend on it; memory does: one chunk's logits, (chunk, V) floats, at a time.
        bias: (V,) the head's bias, if it has one.
        temperature: the sampling temperature τ; the logits are divided by it (as TRL does).
        with_entropy: also return H (differentiable), else None.

    Returns:
        ((...) log-probabilities, (...) entropies or None), float32 (float64 for float64 inputs).
        Under autocast the head's matmul runs in the autocast dtype (as ``lm_head`` would) and
        everything after it in float32.

    One chunk (the input has at most ``chunk_size`` tokens) runs through plain autograd, which
    keeps that chunk's float32 logits for the backward; more chunks run through a custom autograd
    Function whose backward recomputes each chunk's logits instead (one more head matmul), both
    passes a tile of vocabulary columns at a time (at most :data:`TILE_BYTES` of float32 logits).
    """
    if hidden.shape[:-1] != ids.shape:
        raise ObjectiveInputError(f"chunked_token_logprobs: ids{list(ids.shape)} must match hidden"
                                  f"{list(hidden.shape)} without the last dim")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ObjectiveInputError(f"chunked_token_logprobs: weight{list(weight.shape)} must be (V, "
                                  f"{hidden.shape[-1]})")
    _check_temperature(temperature, "chunked_token_logprobs")
    chunk = auto_chunk_size(weight.shape[0]) if chunk_size == "auto" else int(chunk_size)
    if chunk < 1:
        raise ObjectiveInputError(f"chunked_token_logprobs: chunk_size must be >= 1 or 'auto', got {chunk_size!r}")
    h = hidden.reshape(-1, hidden.shape[-1])                                   # (N, H)
    a = ids.reshape(-1).long()                                                 # (N,)
    if h.shape[0] <= chunk:
        lp, ent = _one_chunk(h, weight, bias, a, temperature, with_entropy)
    else:
        lp, ent = _ChunkedHead.apply(h, weight, bias, a, temperature, chunk, with_entropy)
    return lp.reshape(ids.shape), None if ent is None else ent.reshape(ids.shape)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on, else the input's."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: what the softmax statistics are computed in."""
    return torch.promote_types(dtype, torch.float32)


def _one_chunk(h, weight, bias, ids, temperature, with_entropy):
    """Plain autograd over one chunk: z = (h Wᵀ + b) / τ in float32, gather − logsumexp."""
    z = torch.nn.functional.linear(h, weight, bias)
    z = z.to(_acc_dtype(z.dtype))                                              # (n, V)
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)                                           # (n,)
    lp = z.gather(-1, ids[:, None]).squeeze(-1) - lse                          # (n,)
    if not with_entropy:
        return lp, None
    p = torch.softmax(z, dim=-1)                                               # (n, V)
    return lp, lse - (p * z).sum(-1)


class _ChunkedHead(torch.autograd.Function):
    """The head applied in tiles of vocabulary rows of the weight (:func:`_vocab_tiles`), each tile to
    every chunk of tokens in turn; saved for the backward: the inputs and, per token, logsumexp (and
    H). The forward folds the tiles into each token's logsumexp (and entropy) online; the backward
    recomputes each (chunk, tile) block of logits and turns it into ∂/∂z in place.

    Tiles are the outer loop, so each tile of the weight is cast to the compute dtype once per pass
    and only one tile's copy exists at a time: casting the whole (V, H) weight would hold 0.3 GB
    for a 151,936 × 1,024 head in bf16 at the start of the training backward, the step's peak, and
    casting tile by tile inside each chunk would cast the whole weight once per chunk. Per token,
    the tiles are visited in the same order whatever the chunking."""

    @staticmethod
    def forward(ctx, h, weight, bias, ids, temperature, chunk, with_entropy):
        ctx.set_materialize_grads(False)
        cdt = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            N, V = h.shape[0], weight.shape[0]
            acc = _acc_dtype(cdt)
            lse = torch.empty(N, dtype=acc, device=h.device)   # the running logsumexp over the tiles so far
            tgt = torch.zeros_like(lse)                        # the chosen token's logit, once its tile is seen
            s_pz = torch.empty_like(lse) if with_entropy else None  # Σ exp(z − lse) z over the tiles so far
            for k, (s, e) in enumerate(_vocab_tiles(V, min(chunk, N))):
                w = weight[s:e].to(cdt)                                        # (t, H), this tile only
                b = None if bias is None else bias[s:e].to(cdt)
                for i in range(0, N, chunk):
                    j = min(i + chunk, N)
                    a = ids[i:j]
                    z = _chunk_logits(h[i:j], w, b, cdt, temperature)          # (c, t)
                    t_lse = torch.logsumexp(z, dim=-1)                         # (c,)
                    new = t_lse if k == 0 else torch.logaddexp(lse[i:j], t_lse)
                    inside = (a >= s) & (a < e)
                    z_a = z.gather(-1, (a - s).clamp(0, e - s - 1)[:, None]).squeeze(-1)
                    tgt[i:j] = torch.where(inside, z_a, tgt[i:j])
                    if with_entropy:                                           # p · z of the tile, one temporary
                        pz = z.sub(new[:, None]).exp_().mul_(z).sum(-1)
                        s_pz[i:j] = pz if k == 0 else s_pz[i:j].mul_(torch.exp(lse[i:j] - new)).add_(pz)
                    lse[i:j] = new
                    del z
                del w, b
            lp = tgt - lse
            ent = lse - s_pz if with_entropy else None                         # H = logsumexp(z) − Σ p z
        ctx.save_for_backward(h, weight, bias, ids, lse, ent if with_entropy else lse)
        ctx.cdt, ctx.temperature, ctx.chunk, ctx.with_entropy = cdt, temperature, chunk, with_entropy
        if not with_entropy:
            return lp, None
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, weight, bias, ids, lse, ent = ctx.saved_tensors
        cdt, temperature, chunk = ctx.cdt, ctx.temperature, ctx.chunk
        if not ctx.with_entropy:
            g_ent = None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, V = h.shape[0], weight.shape[0]
        with torch.autocast(h.device.type, enabled=False):
            acc = _acc_dtype(cdt)
            gh = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None   # (N, H), summed over tiles
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
            g_all = g_lp[:, None].to(acc) if g_lp is not None else None        # (N, 1)
            for s, e in _vocab_tiles(V, min(chunk, N)):
                w = weight[s:e].to(cdt)                                        # (t, H), this tile only
                b = None if bias is None else bias[s:e].to(cdt)
                for i in range(0, N, chunk):
                    j = min(i + chunk, N)
                    hc, a = h[i:j].to(cdt), ids[i:j]
                    g = None if g_all is None else g_all[i:j]                  # (c, 1)
                    dz = _chunk_logits(hc, w, b, cdt, temperature)             # (c, t) z
                    dz.sub_(lse[i:j, None])                                    # log p
                    if g_ent is not None:                                      # −g_H · p (log p + H)
                        p = dz.exp()                                           # (c, t), the one extra tile
                        dz.add_(ent[i:j, None]).mul_(p).mul_(-g_ent[i:j, None].to(acc))
                        if g is not None:
                            dz.sub_(p.mul_(g))
                        del p
                    elif g is not None:                                        # −g · p, in place
                        dz.exp_().mul_(g.neg())
                    else:
                        dz.zero_()
                    if g is not None:                                          # + g · 1[v = a] (a in this tile)
                        inside = ((a >= s) & (a < e))[:, None]
                        dz.scatter_add_(1, (a - s).clamp(0, e - s - 1)[:, None], g * inside)
                    if temperature != 1.0:
                        dz.div_(temperature)                                   # ∂/∂(h Wᵀ + b)
                    if need_b:
                        grad_b[s:e] += dz.sum(0)
                    dzc = dz.to(cdt)
                    del dz                                                     # (the same tensor in float32)
                    if need_h:
                        _addmm_fp32(gh[i:j], dzc, w)
                    if need_w:
                        _addmm_fp32(grad_w[s:e], dzc.t(), hc)
                    del dzc, hc
                del w, b
        return (None if gh is None else gh.to(h.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _vocab_tiles(vocab: int, tokens: int) -> list[tuple[int, int]]:
    """[start, end) column ranges splitting the vocabulary so that one tile of ``tokens`` rows of
    float32 logits takes at most :data:`TILE_BYTES` (tiles of at least :data:`MIN_TILE` columns)."""
    width = max(MIN_TILE, TILE_BYTES // (4 * max(tokens, 1)))
    return [(s, min(s + width, vocab)) for s in range(0, vocab, width)]


def _chunk_logits(h, w, b, cdt, temperature) -> torch.Tensor:
    """(c, t) float32 (float64) logits (h Wᵀ + b) / τ of one chunk and one tile ``w`` (t, H) of the
    weight's rows, the matmul in ``cdt``."""
    z = torch.nn.functional.linear(h.to(cdt), w, b).to(_acc_dtype(cdt))
    return z.div_(temperature) if temperature != 1.0 else z


_FP32_OUT = {"ok": True}
"""whether ``torch.addmm(..., out_dtype=float32)`` ran here (CUDA, torch ≥ 2.8); cleared after a refusal"""


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b into a float32 ``acc`` without rounding a @ b to the inputs' low precision first
    (the chunks' weight gradients are summed in float32; TRL's ``_addmm_fp32`` does the same)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _FP32_OUT["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT["ok"] = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
