"""Per-token log-probabilities and entropies from logits, without a (B, T, V) log-softmax.

``token_logprobs`` is the "gather minus logsumexp" identity

    log softmax(z)_a = z_a − log Σ_v exp(z_v)

evaluated over chunks of rows, so the only (rows, V) temporaries are one chunk's (the
same trick as TRL's ``selective_log_softmax``, which loops row by row). Low-precision
logits (bf16/fp16) are upcast one chunk at a time: logsumexp in bf16 loses ~2 digits,
which is why TRL falls back to a per-row ``log_softmax`` there. The result has the dtype
of the logits for fp32/fp64 inputs and float32 otherwise.

``token_entropy`` is H = logsumexp(z) − Σ_v softmax(z)_v z_v (nats), chunked the same way;
it equals TRL's ``entropy_from_logits`` (−Σ p log p).
"""

from __future__ import annotations

import torch

from ccrl.objectives._checks import ObjectiveInputError

DEFAULT_CHUNK_ROWS = 256
"""rows (flattened leading positions) processed per chunk; peak extra memory ≈ chunk·V floats"""


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
