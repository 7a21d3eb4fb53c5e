"""The rollout engine (``ccrl.rollout.generate``): group layout, EOS and stop sequences, greedy
equality with ``model.generate``, padding invariance, log-probs and entropies against a full
forward, compaction invariance, routes against a full forward, the preallocated KV cache, and
packed ternary rollouts (engine and ``RLTrainer.packed_rollout``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from ccrl.rollout import SamplingConfig, generate, left_pad
from ccrl.rollout.engine import RolloutCache
from policies.hf_compat import cache_kwargs
from tests.conftest import ROLLOUT_PROMPTS, TINY_LLAMA, special_tokens

PROMPTS = ROLLOUT_PROMPTS
_special = special_tokens


class EosBiased(torch.nn.Module):
    """A policy whose EOS logit is raised by ``bias``, so sampled completions end at varied lengths."""

    def __init__(self, base, eos: int, bias: float):
        super().__init__()
        self.base, self.eos, self.bias = base, eos, bias

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0,
                **kwargs):                                          # kwargs: the KV cache, by either name
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits + F.one_hot(torch.tensor(self.eos), out.logits.shape[-1]) * self.bias
        return out


def _run(model, ids, tok, group=1, seed=0, **sampling):
    sampling.setdefault("max_new_tokens", 8)
    return generate(model, ids, SamplingConfig(**sampling), eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, group_size=group, generator=torch.Generator().manual_seed(seed))


def _full_forward(model, ro):
    """Logits of a plain forward over prompt + completion at the positions predicting each completion token."""
    mask = ro.attention_mask
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(input_ids=ro.input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
    T = ro.completion_ids.shape[1]
    return out, out.logits[:, -(T + 1): -1].float()                               # (N, T, V)


def _first_eos(row: list[int], eos: int) -> int | None:
    return row.index(eos) if eos in row else None


# ----------------------------------------------------------------------------- layout and stopping


def test_group_layout_rows_of_a_group_share_their_prompt(llama, tok, ids):
    G = 3
    ro = _run(llama, ids, tok, group=G)
    pid, pmask = left_pad(ids, tok.pad_token_id)
    assert ro.group_size == G and ro.completion_ids.shape[0] == len(ids) * G
    for i in range(len(ids)):
        for r in range(i * G, (i + 1) * G):
            assert torch.equal(ro.prompt_ids[r], pid[i]) and torch.equal(ro.prompt_mask[r], pmask[i])
    # the completions of a group are independent samples, not copies
    assert any(not torch.equal(ro.completion_ids[0], ro.completion_ids[r]) for r in range(1, G))


def test_eos_stops_a_row_and_later_tokens_are_pad_with_mask_0(llama, tok, ids):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ro = _run(EosBiased(llama, eos, 3.0), ids, tok, group=8, max_new_tokens=12)
    lengths = []
    for r in range(ro.completion_ids.shape[0]):
        row = ro.completion_ids[r].tolist()
        k = _first_eos(row, eos)
        n = ro.lengths[r].item()
        lengths.append(n)
        if k is None:
            assert n == 12 and bool(ro.truncated[r])
        else:
            assert n == k + 1 and not bool(ro.truncated[r])
        assert row[n:] == [pad] * (len(row) - n)
        assert ro.completion_mask[r].tolist() == [1] * n + [0] * (len(row) - n)
        assert torch.all(ro.logprobs[r, n:] == 0) and torch.all(ro.entropies[r, n:] == 0)
        assert torch.all(ro.logprobs[r, :n] < 0)
    assert min(lengths) < max(lengths)                                            # rows ended at different steps
    assert ro.completion_ids.shape[1] == max(lengths)


def test_stop_sequence_ends_a_row_and_is_kept(llama, tok, ids):
    base = _run(llama, ids, tok, greedy=True, max_new_tokens=8)
    r = int(base.lengths.argmax())                                                # a row that runs long
    row = base.completion_ids[r].tolist()[: base.lengths[r].item()]
    assert len(row) >= 5
    stop = row[2:4]
    end = next(i + 2 for i in range(len(row) - 1) if row[i: i + 2] == stop)      # first occurrence
    ro = _run(llama, ids, tok, greedy=True, max_new_tokens=8, stop_sequences=[stop])
    assert ro.lengths[r].item() == end and not bool(ro.truncated[r])
    assert ro.completion_ids[r, :end].tolist() == row[:end]
    assert ro.completion_mask[r, end:].sum() == 0


# ----------------------------------------------------------------------------- equalities


@pytest.mark.parametrize("which", ["llama", "quillan"])
def test_greedy_equals_hf_generate_token_for_token(which, llama, quillan, tok, ids):
    model = llama if which == "llama" else quillan
    T = 8
    pid, pmask = left_pad(ids, tok.pad_token_id)
    with torch.no_grad():
        hf = model.generate(input_ids=pid, attention_mask=pmask, do_sample=False, max_new_tokens=T,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, pid.shape[1]:]
    ro = _run(model, ids, tok, greedy=True, max_new_tokens=T)
    for r in range(len(ids)):
        n = ro.lengths[r].item()
        assert ro.completion_ids[r, :n].tolist() == hf[r, :n].tolist(), r
        if n < hf.shape[1]:                                                       # HF pads after EOS too
            assert hf[r, n:].eq(tok.pad_token_id).all()


@pytest.mark.parametrize("which", ["llama", "quillan"])
def test_left_padded_batch_gives_each_prompt_its_own_greedy_completion(which, llama, quillan, tok, ids):
    model = llama if which == "llama" else quillan
    batch = _run(model, ids, tok, greedy=True)
    for i, p in enumerate(ids):
        alone = _run(model, [p], tok, greedy=True)
        n = alone.lengths[0].item()
        assert batch.lengths[i].item() == n
        assert batch.completion_ids[i, :n].tolist() == alone.completion_ids[0, :n].tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropies_equal_a_full_forward(llama, tok, ids, temperature):
    ro = _run(EosBiased(llama, tok.eos_token_id, 2.0), ids, tok, group=4, temperature=temperature, max_new_tokens=10)
    _, logits = _full_forward(EosBiased(llama, tok.eos_token_id, 2.0), ro)
    logp = torch.log_softmax(logits / temperature, -1)                            # (N, T, V)
    lp = logp.gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    m = ro.completion_mask.bool()
    assert (lp - ro.logprobs)[m].abs().max() <= 1e-5
    assert (ent - ro.entropies)[m].abs().max() <= 1e-5



@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_of_the_samplers_logprobs_is_token_entropy(temperature):
    """The decoders take the entropy from the log-probs they sample with (``normalized=True``): the
    same as ``token_entropy`` of the tempered logits, and it refuses a temperature on log-probs."""
    from ccrl.objectives import ObjectiveInputError, token_entropy

    logits = torch.randn(300, 37, dtype=torch.float64) * 3                        # more rows than one chunk
    logp = torch.log_softmax(logits / temperature, -1)                            # (N, V)
    want = -(logp.exp() * logp).sum(-1)                                          # (N,)
    assert torch.allclose(token_entropy(logp, normalized=True), want, rtol=0, atol=1e-12)
    assert torch.allclose(token_entropy(logits, temperature), want, rtol=0, atol=1e-12)
    with pytest.raises(ObjectiveInputError):
        token_entropy(logp, 0.7, normalized=True)

def test_compaction_on_and_off_sample_identically(llama, tok, ids):
    model = EosBiased(llama, tok.eos_token_id, 2.5)
    on = _run(model, ids, tok, group=6, seed=3, max_new_tokens=12, compact_fraction=0.1)
    off = _run(model, ids, tok, group=6, seed=3, max_new_tokens=12, compact_fraction=10.0)
    assert on.lengths.min() < on.lengths.max()                                    # rows did leave the batch
    assert torch.equal(on.completion_ids, off.completion_ids)
    assert torch.equal(on.lengths, off.lengths) and torch.equal(on.truncated, off.truncated)
    assert torch.allclose(on.logprobs, off.logprobs, atol=1e-6, rtol=0)


def test_quillan_routes_and_council_weights_equal_a_full_forward(quillan, tok, ids):
    ro = _run(quillan, ids, tok, group=3, max_new_tokens=6)
    out, logits = _full_forward(quillan, ro)
    P = ro.prompt_ids.shape[1]
    L = quillan.config.num_layers
    assert ro.routing_indices is not None and len(ro.routing_indices) == len(out.routing_indices) == L
    mask = ro.attention_mask.bool().clone()
    fed = mask.clone()                                       # positions that went through the model while sampling
    fed[torch.arange(fed.shape[0]), P + ro.lengths - 1] = False   # the last sampled token is never fed
    fed[:, :P] = mask[:, :P]
    for rec, full in zip(ro.routing_indices, out.routing_indices):
        a, b = rec.sort(-1).values, full.sort(-1).values                          # (N, P+T, k) as sets
        assert torch.equal(a[fed], b[fed])
    alpha = out.council_weights[:, P - 1: -1]                                     # (N, T, P) the state choosing a_t
    m = ro.completion_mask.bool()
    assert (alpha - ro.council_weights)[m].abs().max() <= 1e-4


def test_rollout_cache_grows_repeats_and_selects():
    cache = RolloutCache(extra=2)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)         # (B, H, S, D)
    keys, _ = cache.update(k, k + 100, 0)
    assert torch.equal(keys, k) and cache.get_seq_length() == 3
    steps = [torch.full((2, 1, 1, 2), float(i)) for i in range(4)]                # past the initial capacity
    for s in steps:
        keys, values = cache.update(s, s, 0)
    assert keys.shape == (2, 1, 7, 2) and torch.equal(keys[:, :, 3:], torch.cat(steps, 2))
    assert torch.equal(values[:, :, :3], k + 100)
    cache.batch_repeat_interleave(3)
    assert cache.layers[0].keys.shape[0] == 6 and torch.equal(cache.layers[0].keys[1], keys[0])
    cache.batch_select_indices(torch.tensor([5, 0]))
    assert torch.equal(cache.layers[0].keys[0], keys[1]) and torch.equal(cache.layers[0].keys[1], keys[0])
    keys2, _ = cache.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), 0)
    assert keys2.shape == (2, 1, 8, 2) and cache.get_seq_length() == 8


# ----------------------------------------------------------------------------- packed ternary rollouts


def test_packed_snapshot_logprobs_equal_the_qat_model(quillan, tok, ids):
    """A packed snapshot samples from the same policy: its rollout log-probs match the QAT model's
    full forward at the sampled tokens up to the rounding of the integer kernel (int8 activations
    can land on the other side of a rounding step), the same size as the QAT model's own
    cached-decode vs full-forward gap. Measured here: ~1e-4 for both (toy preset)."""
    from ccrl.trainers.rl import packed_snapshot

    model = copy.deepcopy(quillan)
    snap = packed_snapshot(model)
    assert not any(p.requires_grad for p in snap.parameters())
    assert any(type(m).__name__ == "PackedBitLinear" for m in snap.modules())
    assert not any(type(m).__name__ == "PackedBitLinear" for m in model.modules())   # trained model untouched
    packed = _run(snap, ids, tok, group=4, max_new_tokens=8, seed=1)
    qat = _run(model, ids, tok, group=4, max_new_tokens=8, seed=1)
    m_p, m_q = packed.completion_mask.bool(), qat.completion_mask.bool()
    _, lg = _full_forward(model, packed)                                          # the QAT policy at the packed tokens
    gap_packed = (torch.log_softmax(lg, -1).gather(-1, packed.completion_ids[..., None]).squeeze(-1)
                  - packed.logprobs)[m_p].abs().max().item()
    _, lg = _full_forward(model, qat)
    gap_qat = (torch.log_softmax(lg, -1).gather(-1, qat.completion_ids[..., None]).squeeze(-1)
               - qat.logprobs)[m_q].abs().max().item()
    assert gap_packed <= 2e-3, gap_packed
    assert gap_packed <= max(10 * gap_qat, 1e-4), (gap_packed, gap_qat)
    agree = (packed.completion_ids == qat.completion_ids).float().mean().item()
    assert agree >= 0.9                                                           # same draws, same policy


def _quillan_rl_recipe(tmp_path, name, packed_rollout):
    # on the CPU, where the packed kernel runs (elsewhere `auto` means no packing, untimed)
    return {"name": name, "seed": 0, "output_dir": str(tmp_path / name), "model": {"preset": "toy"}, "device": "cpu",
            "eval": {"max_new_tokens": 4}, "stages": [{
                "kind": "rl", "objective": "ccrl", "steps": 2, "lr": 1e-3, "prompts_per_step": 4, "group_size": 4,
                "max_new_tokens": 4, "warmup_steps": 0, "lr_schedule": "constant", "packed_rollout": packed_rollout,
                "data": {"task": "arithmetic", "options": {"digits": 1}, "num_examples": 64, "heldout_size": 4},
                "rewards": [{"name": "exact_match"}]}]}


@pytest.mark.parametrize("mode", [True, False, "auto"])
def test_trainer_packed_rollout_modes(tmp_path, mode):
    from ccrl.pipeline import run_recipe

    run_recipe(_quillan_rl_recipe(tmp_path, f"p{mode}", mode), show_progress=False, log=lambda *_: None)
    lines = [json.loads(x) for x in (tmp_path / f"p{mode}" / "metrics.jsonl").read_text().splitlines()]
    flags = [x["rollout/packed"] for x in lines]
    assert len(set(flags)) == 1                                                   # one choice for the whole stage
    if mode == "auto":
        assert "rollout/auto_qat_time_s" in lines[0] and "rollout/auto_packed_time_s" in lines[0]
        faster = lines[0]["rollout/auto_packed_time_s"] < lines[0]["rollout/auto_qat_time_s"]
        assert flags[0] == int(faster)
    else:
        assert flags[0] == int(mode) and "rollout/auto_qat_time_s" not in lines[0]
    for x in lines:                                                               # π_old from the rollout: ratio ≈ 1
        assert x["logprob_gap_first_epoch"] <= 2e-3 and abs(x["ratio/max"] - 1) <= 2e-3


def test_packed_rollout_true_needs_a_packable_policy(tmp_path):
    from ccrl.pipeline import run_recipe

    rec = _quillan_rl_recipe(tmp_path, "llama", True)
    rec["model"] = {"hf_config": dict(TINY_LLAMA)}
    rec["stages"][0]["objective"] = "grpo"
    with pytest.raises(ValueError, match="packed_rollout"):
        run_recipe(rec, show_progress=False, log=lambda *_: None)


def test_training_forward_sharing_the_prompt_equals_the_full_forward(llama, tok, ids, tmp_path):
    """RLTrainer runs each distinct prompt of a plain LM once per step (``PromptPrefix``), micro-
    batched or not: the log-probs and the gradient equal those of a forward over every row."""
    from ccrl.objectives import token_logprobs
    from ccrl.trainers.rl import PromptPrefix

    model = copy.deepcopy(llama).train()
    assert PromptPrefix.applies(model)
    ro = _run(EosBiased(llama, tok.eos_token_id, 2.0), ids, tok, group=4, max_new_tokens=8)
    ro = ro.select(torch.tensor([0, 1, 2, 5, 6, 9, 13, 14, 15]))                 # ragged groups, as after skipping
    n, P = ro.completion_ids.shape[0], ro.prompt_ids.shape[1]
    m = ro.completion_mask.float()
    weight = torch.linspace(-1, 1, n)[:, None]

    def full():
        mask = ro.attention_mask
        out = model(input_ids=ro.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                    use_cache=False)
        lp = token_logprobs(out.logits[:, P - 1: -1], ro.completion_ids)
        (lp * m * weight).sum().backward()
        return lp.detach()

    def shared(micro: int):
        prefix = PromptPrefix(model, ro)
        lps = []
        for i in range(0, n, micro):
            rows = slice(i, min(i + micro, n))
            last, cache = prefix.rows(rows)
            mask = ro.attention_mask[rows]
            out = model(input_ids=ro.completion_ids[rows], attention_mask=mask,
                        position_ids=(mask.cumsum(-1) - 1).clamp_min(0)[:, P:], use_cache=True,
                        **cache_kwargs(cache))
            lp = token_logprobs(torch.cat([last[:, None], out.logits[:, :-1]], 1), ro.completion_ids[rows])
            (lp * m[rows] * weight[rows]).sum().backward()
            lps.append(lp.detach())
        prefix.backward()
        return torch.cat(lps)

    results = []
    for run in (full, lambda: shared(n), lambda: shared(2)):
        model.zero_grad()
        lp = run()
        results.append((lp, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (lp_f, g_f) = results[0]
    for lp_s, g_s in results[1:]:
        assert (lp_s - lp_f)[m.bool()].abs().max() <= 1e-5
        for name in g_f:
            assert torch.allclose(g_s[name], g_f[name], atol=1e-5, rtol=1e-4), name
