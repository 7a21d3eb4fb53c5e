"""Static decoding (``SamplingConfig(cuda_graph="static")``), the CUDA graph path's eager twin, on
the CPU: the same completions, log-probs, entropies, council weights and routes as the eager
compacting loop from the same generator, EOS and stop sequences included; the static KV cache;
the option's validation. The graph itself is tested in ``tests/test_rollout_cuda.py``."""

from __future__ import annotations

import pytest
import torch

from ccrl.rollout import SamplingConfig, generate
from ccrl.rollout.engine import RolloutCache
from tests.test_rollout import EosBiased, _run


def _pair(model, ids, tok, **kw):
    """The eager loop's rollout and the static one's, from generators seeded alike."""
    kw.setdefault("group", 3)
    kw.setdefault("seed", 3)
    return _run(model, ids, tok, cuda_graph=False, **kw), _run(model, ids, tok, cuda_graph="static", **kw)


def _fed(ro) -> torch.Tensor:
    """(N, P + T) positions that went through the model while sampling (the last sampled token never does)."""
    P = ro.prompt_ids.shape[1]
    fed = ro.attention_mask.bool().clone()
    fed[torch.arange(fed.shape[0]), P + ro.lengths - 1] = False
    return fed


def _assert_same(a, b, tol=1e-5):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.truncated, b.truncated)
    assert (a.logprobs - b.logprobs).abs().max() <= tol
    assert (a.entropies - b.entropies).abs().max() <= tol


@pytest.mark.parametrize("sampling", [{"greedy": True}, {"temperature": 1.0}, {"temperature": 0.7, "top_k": 5},
                                      {"temperature": 1.0, "top_p": 0.8}])
def test_static_decoding_equals_the_eager_loop(llama, tok, ids, sampling):
    for model in (llama, EosBiased(llama, tok.eos_token_id, 2.5)):
        eager, static = _pair(model, ids, tok, max_new_tokens=12, **sampling)
        _assert_same(eager, static)


def test_static_decoding_with_rows_ending_early_samples_as_the_compacting_loop(llama, tok, ids):
    model = EosBiased(llama, tok.eos_token_id, 2.5)
    eager, static = _pair(model, ids, tok, group=6, max_new_tokens=12, compact_fraction=0.1)
    assert eager.lengths.min() < eager.lengths.max()                              # rows did leave the eager batch
    _assert_same(eager, static)


def test_static_decoding_of_quillan_keeps_council_weights_and_routes(quillan, tok, ids):
    for sampling in ({"greedy": True}, {"temperature": 1.0}):
        eager, static = _pair(quillan, ids, tok, max_new_tokens=8, **sampling)
        _assert_same(eager, static)
        m = eager.completion_mask.bool()
        assert (eager.council_weights - static.council_weights)[m].abs().max() <= 1e-6
        assert (eager.chosen_token_probs - static.chosen_token_probs)[m].abs().max() <= 1e-6
        fed = _fed(eager)
        for a, b in zip(eager.routing_indices, static.routing_indices):
            assert torch.equal(a[fed], b[fed])


def test_static_decoding_ends_rows_at_stop_sequences(llama, tok, ids):
    base = _run(llama, ids, tok, greedy=True, max_new_tokens=8)
    r = int(base.lengths.argmax())
    stop = base.completion_ids[r, 2:4].tolist()
    eager, static = _pair(llama, ids, tok, greedy=True, max_new_tokens=8, stop_sequences=[stop, [tok.eos_token_id]])
    assert eager.lengths[r] < 8
    _assert_same(eager, static)


def test_static_decoding_of_one_token(llama, tok, ids):
    eager, static = _pair(llama, ids, tok, max_new_tokens=1)
    _assert_same(eager, static)
    assert static.decode_steps == 1 and static.completion_ids.shape[1] == 1


def test_static_cache_writes_at_its_slot_and_returns_the_whole_buffer():
    cache = RolloutCache(extra=3)
    k = torch.randn(2, 1, 2, 4)                                                   # (B, H, S, D) a 2-token prompt
    cache.update(k, -k, 0)
    slot = torch.tensor([2])
    cache.make_static(slot)
    step = torch.randn(2, 1, 1, 4)
    keys, values = cache.update(step, -step, 0)
    assert keys.shape == (2, 1, 5, 4)                                             # prompt + room for 3 tokens
    assert torch.equal(keys[:, :, :2], k) and torch.equal(keys[:, :, 2:3], step) and torch.equal(values[:, :, 2:3], -step)
    assert torch.all(keys[:, :, 3:] == 0)                                         # unwritten slots are finite zeros
    slot += 1                                                                     # the caller advances the slot
    keys, _ = cache.update(step * 2, step, 0)
    assert torch.equal(keys[:, :, 3:4], step * 2) and torch.equal(keys[:, :, 2:3], step)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_static_decoding_in_attention_windows_equals_the_eager_loop(llama, quillan, tok, ids, window):
    for model in (EosBiased(llama, tok.eos_token_id, 2.5), quillan):
        for sampling in ({"greedy": True}, {"temperature": 1.0}):
            eager, static = _pair(model, ids, tok, max_new_tokens=12, attend_window=window, **sampling)
            _assert_same(eager, static)
            whole = _run(model, ids, tok, group=3, seed=3, max_new_tokens=12, cuda_graph="static", attend_window=0,
                         **sampling)
            # attention over the whole cache sums over more (masked) keys, in another order: on an AMD EPYC
            # the council's log π_Ω = log Σ α_i π_i of an unlikely sampled token then moved by 5e-5
            # (entropies by 1.4e-6); the tokens are the same
            _assert_same(whole, static, tol=2e-4)


def test_static_decoding_attends_over_the_written_columns_rounded_up_to_a_window(llama, tok, ids, monkeypatch):
    from ccrl.rollout.decode_graph import StaticDecode

    seen = []
    feed = StaticDecode.feed

    def recording_feed(self):
        seen.append((int(self.slot), self.length, tuple(self.cache.layers[0].keys.shape)))
        feed(self)

    monkeypatch.setattr(StaticDecode, "feed", recording_feed)
    ro = _run(llama, ids, tok, max_new_tokens=10, cuda_graph="static", attend_window=4)
    P = ro.prompt_ids.shape[1]
    assert [length for _, length, _ in seen] == [P + 4] * 4 + [P + 8] * 4 + [P + 10]   # columns 0..8 are fed
    for slot, length, keys in seen:
        assert slot < length and keys[2] == length                               # the fed slot is attended
    seen.clear()
    _run(llama, ids, tok, max_new_tokens=10, cuda_graph="static", attend_window=0)
    assert {length for _, length, _ in seen} == {P + 10}


def test_static_cache_attends_over_a_prefix_of_its_buffer():
    cache = RolloutCache(extra=4)
    k = torch.randn(2, 1, 2, 4)
    cache.update(k, -k, 0)
    slot = torch.tensor([2])
    cache.make_static(slot)
    cache.attend(3)
    step = torch.randn(2, 1, 1, 4)
    keys, values = cache.update(step, -step, 0)
    assert keys.shape == (2, 1, 3, 4) and cache.layers[0].get_mask_sizes(1) == (3, 0)
    assert torch.equal(keys[:, :, 2:3], step) and torch.equal(values[:, :, :2], -k)
    assert keys.data_ptr() == cache.layers[0]._k.data_ptr()                      # a view, not a copy
    cache.attend(None)
    assert cache.layers[0].keys.shape[2] == 6
    for bad in (0, 7):
        with pytest.raises(ValueError, match=r"attend: length .* outside 1\.\.6"):
            cache.attend(bad)


def test_persona_counts_equal_bincount():
    from policies.modeling_quillan import persona_counts

    for shape in [(0, 2), (7, 2), (3, 5, 4)]:
        idx = torch.randint(0, 32, shape)
        assert torch.equal(persona_counts(idx, 32), torch.bincount(idx.reshape(-1), minlength=32))


def test_quillan_takes_a_prepared_4d_mask_as_the_2d_one_it_stands_for(quillan, tok, ids):
    from ccrl.rollout import left_pad

    pid, pmask = left_pad(ids, tok.pad_token_id)                                  # (B, P) left-padded
    B, P = pid.shape
    pos = (pmask.cumsum(-1) - 1).clamp_min(0)
    keys = torch.arange(P)
    causal = keys[None, :] <= keys[:, None]                                       # (P, P)
    mask4 = (causal[None] & pmask.bool()[:, None, :]) | torch.eye(P, dtype=torch.bool)[None]   # (B, P, P)
    with torch.no_grad():
        a = quillan(input_ids=pid, attention_mask=pmask, position_ids=pos, use_cache=False)
        b = quillan(input_ids=pid, attention_mask=mask4[:, None], position_ids=pos, use_cache=False)
    real = pmask.bool()
    assert (a.logits - b.logits)[real].abs().max() <= 1e-5
    with pytest.raises(ValueError, match="4-D attention_mask"):
        quillan(input_ids=pid, attention_mask=mask4[:, None].float(), position_ids=pos, use_cache=False)


def test_sampling_config_checks_cuda_graph_check_every_and_attend_window():
    with pytest.raises(ValueError, match="cuda_graph"):
        SamplingConfig(cuda_graph="yes")
    with pytest.raises(ValueError, match="check_every"):
        SamplingConfig(check_every=0)
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="attend_window"):
            SamplingConfig(attend_window=bad)


def test_cuda_graph_true_off_cuda_is_an_error(llama, tok, ids):
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(llama, ids, SamplingConfig(max_new_tokens=2, cuda_graph=True), eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
