"""The eager decoder: one Python iteration per token on a growing KV cache, finished rows
compacted away.

Used on the CPU, and wherever a CUDA graph is off or cannot be captured. Inside the loop every
operation is batched. Rows that have finished (EOS or a stop sequence) stop costing compute: when
at least ``SamplingConfig.compact_fraction`` of the live rows are done, the cache and the per-row
state are cut to the live rows, so the remaining steps run on a smaller batch. Counting the
finished rows is a host sync: on the CPU it happens every step, elsewhere every
``SamplingConfig.check_every`` steps (finished rows in between emit pad with log-prob 0).
Compaction does not change any sample: the draw is made as if every row were still in the batch
(:func:`ccrl.rollout.sampling.sample_rows`).
"""

from __future__ import annotations

import torch

from ccrl.rollout.record import assemble, repeat_last_persona, sample_and_record, start_decode
from ccrl.rollout.types import Rollout
from policies.hf_compat import cache_kwargs


def decode_eager(model, out, cache, prompt_ids, prompt_mask, sampling, eos_id, pad_id, G, generator,
                 record_council, device) -> Rollout:
    """Decode after the prefill ``out`` / ``cache``: a growing cache, finished rows compacted away."""
    s = start_decode(out, cache, prompt_ids, prompt_mask, sampling, eos_id, pad_id, G, record_council, device)
    N, P = s.prompt_ids.shape
    T = sampling.max_new_tokens
    # the attention mask of every step is a prefix of one preallocated (N, P + T) mask
    full_mask = torch.cat([s.prompt_mask, s.prompt_mask.new_ones((N, T))], dim=1)  # (n_live, P + T)
    live = torch.arange(N, device=device)                                        # rows still in the batch
    live_done = torch.zeros(N, dtype=torch.bool, device=device)                 # (n_live,) finished, not yet dropped
    n_done = 0                                                                   # rows done overall
    next_pos = s.prompt_mask.sum(-1)                                            # (n_live,)
    check = 1 if device.type == "cpu" else sampling.check_every                 # steps between host syncs
    steps = 0
    for t in range(T):
        steps += 1
        masked = n_done > 0 or check > 1                                         # may some live row be finished?
        tok, finished = sample_and_record(s, sampling, generator, live_done if masked else None, live, t)
        live_done = live_done | finished
        if t == T - 1:
            break
        if (t + 1) % check:                                                      # no host sync at this step
            n_live_done = 0
        else:                                                                    # a host sync: how many rows are done
            n_live_done = int(live_done.sum())
            n_done = n_live_done + (N - live.numel())
            if n_done == N:
                break
        # drop finished rows from the batch when enough of them have accumulated; the forward
        # below replaces the logits, α and persona log-probs of the rows that stay
        if n_live_done and n_live_done >= sampling.compact_fraction * live.numel():
            keep = (~live_done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            live, tok, full_mask, next_pos = live[keep], tok[keep], full_mask[keep], next_pos[keep]
            live_done = live_done[keep]
            n_done = N - live.numel()
        out = model(input_ids=tok[:, None], attention_mask=full_mask[:, : P + t + 1],
                    position_ids=next_pos[:, None], use_cache=True, **cache_kwargs(cache), **s.step_kw)
        next_pos = next_pos + 1
        s.logits = out.logits[:, -1].float()
        if s.alpha is not None:
            s.alpha_last = out.council_weights[:, -1].float()
        s.plp_last = repeat_last_persona(out, 1)
        if s.route_buf is not None:
            for buf, r in zip(s.route_buf, out.routing_indices):
                buf[live, P + t] = r[:, -1]                          # routes of the token fed at P + t
    done = torch.zeros(N, dtype=torch.bool, device=device)
    done[live] = live_done
    if live.numel() < N:                                                         # rows dropped earlier were done
        dropped = torch.ones(N, dtype=torch.bool, device=device)
        dropped[live] = False
        done |= dropped
    return assemble(s, done, G, steps)
