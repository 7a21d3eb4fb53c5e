"""What both decoders share: the state a decode starts from, the sample-and-record step, and the
assembly of the :class:`~ccrl.rollout.types.Rollout`.

:func:`start_decode` turns the prefill's output into (N, T) output buffers, repeating the last
logits, council weights, persona log-probs and the KV cache G times (one prefill per prompt).
:func:`sample_and_record` draws one completion column and records, per row, the token, its
log-probability under the tempered distribution, that distribution's entropy, the dense council
weights α, each persona's probability of the token and whether the row has finished (EOS or a
stop sequence). The eager loop (``decode_eager``) calls it on its live rows with a Python column
index; the static decoding (``decode_graph``) on every row with a (1,) device column, so the step
it captures has no host sync and no branch on a GPU value. :func:`assemble` cuts the buffers to
the longest completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ccrl.objectives.logprobs import token_entropy
from ccrl.rollout.sampling import SamplingConfig, draw, filter_logits, sample_rows
from ccrl.rollout.types import Rollout


@dataclass
class DecodeStart:
    """What both decoders start from: the prefill's last logits and council outputs repeated G
    times, the cache repeated likewise, and the (N, T) output buffers. A decoder replaces (eager)
    or rewrites in place (static) ``logits``, ``alpha_last`` and ``plp_last`` after each step."""

    step_kw: dict
    prompt_ids: torch.Tensor          # (N, P)
    prompt_mask: torch.Tensor         # (N, P)
    logits: torch.Tensor              # (N, V) float32, predicting the first completion token
    alpha_last: torch.Tensor | None   # (N, P_c) dense α at that state
    plp_last: torch.Tensor | None     # (N, P_c, V) persona log-probs at that state
    completion: torch.Tensor          # (N, T) pad
    logprobs: torch.Tensor            # (N, T) 0
    entropies: torch.Tensor           # (N, T) 0
    alpha: torch.Tensor | None        # (N, T, P_c) 0
    chosen_p: torch.Tensor | None     # (N, T, P_c) 0: π_i(a_t), when the policy gives persona log-probs
    lengths: torch.Tensor             # (N,) tokens generated so far
    route_buf: list | None            # per council layer (N, P + T, k) placeholder routes
    stops: list                       # stop sequences as device tensors
    pad: torch.Tensor                 # (1,) the pad id, emitted by finished rows
    eos_id: int


def start_decode(out, cache, prompt_ids, prompt_mask, sampling: SamplingConfig, eos_id: int, pad_id: int, G: int,
                 record_council: bool, device) -> DecodeStart:
    """The prefill output ``out`` (B rows) and ``cache`` repeated G times, with empty output buffers."""
    step_kw = {"output_persona_logprobs": True} if getattr(out, "persona_logprobs", None) is not None else {}
    B, P = prompt_ids.shape
    N, T = B * G, sampling.max_new_tokens
    logits = out.logits[:, -1].float()                                          # (B, V)
    council = getattr(out, "council_weights", None) if record_council else None
    routes = getattr(out, "routing_indices", None) if record_council else None
    routes = tuple(routes) if routes else None
    if G > 1:
        cache.batch_repeat_interleave(G)
        logits = logits.repeat_interleave(G, 0)                                 # (N, V)
    alpha = alpha_last = None
    if council is not None:
        alpha = torch.zeros((N, T, council.shape[-1]), device=device)
        alpha_last = council[:, -1].float().repeat_interleave(G, 0)             # (N, P_c)
    plp_last = repeat_last_persona(out, G)                                      # (N, P_c, V) or None
    chosen_p = None if plp_last is None else torch.zeros((N, T, plp_last.shape[1]), device=device)
    route_buf = None
    if routes is not None:
        # positions never fed through the model (padding, the last sampled token), and prompt
        # positions whose routes a prefill with logits_to_keep=1 does not compute (an overseer's
        # top-k), keep distinct placeholder routes 0..k-1; none of them influences any completion
        # token's log-prob
        route_buf = [torch.arange(r.shape[-1], device=device).expand(N, P + T, -1).clone() for r in routes]
        for buf, r in zip(route_buf, routes):
            buf[:, P - r.shape[1]: P] = r.repeat_interleave(G, 0)
    return DecodeStart(
        step_kw=step_kw, prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
        logits=logits, alpha_last=alpha_last, plp_last=plp_last,
        completion=torch.full((N, T), pad_id, dtype=torch.long, device=device),
        logprobs=torch.zeros((N, T), device=device), entropies=torch.zeros((N, T), device=device),
        alpha=alpha, chosen_p=chosen_p, lengths=torch.zeros(N, dtype=torch.long, device=device),
        route_buf=route_buf, stops=[torch.tensor(s, device=device) for s in sampling.stop_sequences if s],
        pad=torch.full((1,), pad_id, dtype=torch.long, device=device), eos_id=eos_id,
    )


def sample_and_record(s: DecodeStart, sampling: SamplingConfig, generator, done: torch.Tensor | None,
                      rows: torch.Tensor | None, col) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw completion column ``col`` from ``s.logits`` and record it in ``s``'s buffers.

    ``rows`` and ``col`` say where the n rows of ``s.logits`` go: the eager loop passes its live
    rows (an index into the N rows) and a Python int column, written by indexing; the static
    decoding passes ``rows=None`` (all N rows) and a (1,) device column, written with
    ``index_copy_``, so the step reads nothing back to the host and can be captured in a CUDA
    graph. ``done`` (n,) marks rows that have finished: they emit pad with log-prob, entropy, α
    and persona probabilities 0 and do not grow; None when no row can be finished (the eager loop
    skips the masking then).

    Returns the tokens (n,), pad on finished rows, and the rows that finish at this token (n,)
    (EOS or the end of a stop sequence).
    """
    scaled = s.logits if sampling.greedy else s.logits / sampling.temperature
    logp = F.log_softmax(scaled, dim=-1)                                        # (n, V)
    ent = token_entropy(logp, normalized=True)                                  # (n,)
    if sampling.greedy:
        tok = logp.argmax(-1)
    else:
        probs = filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(-1)  # (n, V)
        if rows is None:
            tok = draw(probs, generator)                                        # (N,)
        else:
            tok = sample_rows(probs, rows, s.completion.shape[0], generator)    # (n_live,)
    tok_lp = logp.gather(-1, tok[:, None]).squeeze(-1)                          # (n,)
    if done is not None:                                                        # finished rows emit pad, mask 0
        tok = torch.where(done, s.pad, tok)
        tok_lp = tok_lp.masked_fill(done, 0.0)
        ent = ent.masked_fill(done, 0.0)
    _put(s.completion, rows, col, tok)
    _put(s.logprobs, rows, col, tok_lp)
    _put(s.entropies, rows, col, ent)
    if s.alpha is not None:
        _put(s.alpha, rows, col, _zero_done(s.alpha_last, done))               # (n, P_c)
    if s.chosen_p is not None and s.plp_last is not None:
        plp = s.plp_last                                                        # (n, P_c, V)
        cp = plp.gather(-1, tok.view(-1, 1, 1).expand(-1, plp.shape[1], 1)).squeeze(-1).float().exp()  # (n, P_c)
        _put(s.chosen_p, rows, col, _zero_done(cp, done))
    grow = 1 if done is None else ~done
    if rows is None:
        s.lengths += grow
    else:
        s.lengths[rows] += grow
    finished = tok == s.eos_id                                                  # (n,)
    for stop in s.stops:
        finished |= _ends_with(s.completion, rows, col, stop)
    return tok, finished


def _zero_done(x: torch.Tensor, done: torch.Tensor | None) -> torch.Tensor:
    """``x`` (n, ...) with the rows of finished rows zeroed."""
    return x if done is None else x.masked_fill(done[:, None], 0.0)


def _put(buf: torch.Tensor, rows: torch.Tensor | None, col, value: torch.Tensor) -> None:
    """Write ``value`` (n, ...) into column ``col`` of ``buf`` (N, T, ...) (see :func:`sample_and_record`)."""
    if rows is None:
        buf.index_copy_(1, col, value[:, None])
    else:
        buf[rows, col] = value


def _ends_with(completion: torch.Tensor, rows: torch.Tensor | None, col, stop: torch.Tensor) -> torch.Tensor:
    """(n,) whether a row's completion ends with ``stop`` at column ``col``; false while shorter."""
    n = len(stop)
    if rows is not None:                                    # a host column: slice when there are n columns
        if col + 1 < n:
            return torch.zeros(rows.numel(), dtype=torch.bool, device=completion.device)
        return (completion[rows, col + 1 - n: col + 1] == stop).all(-1)
    # a device column: the last n columns, clamped at 0, and a device-side check that there are n
    cols = (col + 1 - n + torch.arange(n, device=completion.device)).clamp_min(0)   # (n,)
    hit = (completion.index_select(1, cols) == stop).all(-1)                        # (N,)
    return hit & (col + 1 >= n)


def assemble(s: DecodeStart, done: torch.Tensor, G: int, steps: int) -> Rollout:
    """The Rollout of a finished decode, cut to the longest completion."""
    N, P = s.prompt_ids.shape
    T = s.completion.shape[1]
    lengths = s.lengths
    Tm = int(lengths.max()) if N else 0
    cmask = (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).long()
    route_buf = None if s.route_buf is None else tuple(b[:, : P + Tm] for b in s.route_buf)
    return Rollout(
        prompt_ids=s.prompt_ids, prompt_mask=s.prompt_mask,
        completion_ids=s.completion[:, :Tm], completion_mask=cmask[:, :Tm], logprobs=s.logprobs[:, :Tm],
        lengths=lengths, truncated=~done,
        council_weights=None if s.alpha is None else s.alpha[:, :Tm],
        chosen_token_probs=None if s.chosen_p is None else s.chosen_p[:, :Tm],
        routing_indices=route_buf, group_size=G, decode_steps=steps, entropies=s.entropies[:, :Tm],
    )


def repeat_last_persona(out, G: int) -> torch.Tensor | None:
    """The persona log-probs of ``out``'s last position, each row repeated G times: (n·G, P_c, V) or None."""
    plp = getattr(out, "persona_logprobs", None)          # (n, t, P_c, V)
    if plp is None:
        return None
    last = plp[:, -1]
    return last.repeat_interleave(G, 0) if G > 1 else last
