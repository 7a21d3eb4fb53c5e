"""Linear weights cast once per rollout under autocast (``ccrl.rollout.precision``): the rollout of
a policy whose forward runs under bf16 autocast (as accelerate wraps a prepared model) gives the
same bits with the copies as without, its linear layers see bf16 weights only under autocast,
every layer gets its own parameters back (a tied head stays tied), and the copies are made once."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from ccrl.rollout import SamplingConfig, engine, generate
from ccrl.rollout.precision import cast_linear_weights_once


class Autocast(nn.Module):
    """``base`` with its forward under bf16 autocast on ``device`` ("cpu" or "cuda"), entered per call
    (accelerate's wrapper of a prepared model)."""

    def __init__(self, base, device: str = "cpu"):
        super().__init__()
        self.base, self.device = base, device

    def forward(self, **kw):
        with torch.autocast(self.device, dtype=torch.bfloat16):
            return self.base(**kw)


def _rollout(model, ids, tok, **kw):
    return generate(model, ids, SamplingConfig(max_new_tokens=10, temperature=1.0, **kw),
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, group_size=3,
                    generator=torch.Generator().manual_seed(4))


@pytest.fixture
def tied_llama(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY_LLAMA, special_tokens

    hf = dict(TINY_LLAMA, tie_word_embeddings=True)
    cfg = AutoConfig.for_model(hf.pop("model_type"), **hf, **special_tokens(tok))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("mode", [False, "static"])
def test_rollout_under_autocast_is_the_same_bits_with_weights_cast_once(tied_llama, tok, ids, monkeypatch, mode):
    model = Autocast(tied_llama)
    ours = _rollout(model, ids, tok, cuda_graph=mode)
    monkeypatch.setattr(engine, "cast_linear_weights_once", lambda m: contextlib.nullcontext())
    stock = _rollout(model, ids, tok, cuda_graph=mode)
    assert torch.equal(ours.completion_ids, stock.completion_ids)
    assert torch.equal(ours.logprobs, stock.logprobs) and torch.equal(ours.entropies, stock.entropies)


def test_the_first_linear_call_decides_and_the_layers_get_their_own_weights_back(tied_llama):
    """Under autocast at the first call every linear layer (the tied head too) runs on a bf16 copy
    made once, and no hook runs after that; a rollout that starts outside autocast keeps its own
    weights; after either, the same Parameter objects (the tie kept) and no hooks."""
    model = tied_llama
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is emb.weight
    before = {n: p for n, p in model.named_parameters()}
    linears = sum(1 for m in model.modules() if type(m) is nn.Linear)
    seen = []
    hook = head.register_forward_hook(lambda m, a, out: seen.append((m.weight.dtype, out.dtype)))
    ids = torch.tensor([[5, 6, 7]])
    casts = []
    real = torch.Tensor.to
    try:
        with torch.no_grad():
            with cast_linear_weights_once(model):
                torch.Tensor.to = lambda t, *a, **kw: casts.append(1) or real(t, *a, **kw)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(input_ids=ids)
                    first = len(casts)
                    model(input_ids=ids)                                          # the copies are reused
                    again = len(casts) - first
                torch.Tensor.to = real
                assert all(not m._forward_pre_hooks for m in model.modules())    # nothing runs per step
            with cast_linear_weights_once(model):
                model(input_ids=ids)                                              # no autocast: own weights
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(input_ids=ids)                                          # autocast casts them itself
    finally:
        torch.Tensor.to = real
        hook.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2 + [(torch.float32, torch.float32),
                                                             (torch.float32, torch.bfloat16)]
    assert first - again == linears                      # the first call casts each weight once, the next none
    assert {n: p for n, p in model.named_parameters()} == before                  # the same Parameter objects
    assert head.weight is emb.weight and head.weight.dtype == torch.float32


def test_the_parameters_come_back_after_an_error(tied_llama):
    before = list(tied_llama.parameters())
    with pytest.raises(RuntimeError), cast_linear_weights_once(tied_llama):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            tied_llama(input_ids=torch.tensor([[5, 6]]))
        raise RuntimeError("a failing rollout")
    after = list(tied_llama.parameters())
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before))
    assert all(not m._forward_pre_hooks for m in tied_llama.modules())


# ----------------------------------------------------------------------------- the KV cache under autocast


@pytest.mark.parametrize("mode", [False, "static"])
def test_the_kv_cache_stores_the_autocast_dtype_with_the_same_bits(tied_llama, tok, ids, monkeypatch, mode):
    """A Llama's keys leave RoPE in float32 under autocast; stored in bf16 they give the same rollout."""
    from ccrl.rollout import cache as cache_mod

    stored = []
    update = cache_mod._GrowingLayer.update

    def spy(self, k, v, *a, **kw):
        out = update(self, k, v, *a, **kw)
        stored.append((k.dtype, out[0].dtype, out[1].dtype))
        return out

    monkeypatch.setattr(cache_mod._GrowingLayer, "update", spy)
    model = Autocast(tied_llama)
    ours = _rollout(model, ids, tok, cuda_graph=mode)
    assert {s[0] for s in stored} == {torch.float32}                             # what the model hands over
    assert {s[1:] for s in stored} == {(torch.bfloat16, torch.bfloat16)}         # what the cache keeps
    stored.clear()
    monkeypatch.setattr(engine, "casts_keys_under_autocast", lambda m: False)
    stock = _rollout(model, ids, tok, cuda_graph=mode)
    assert {s[1] for s in stored} == {torch.float32}
    assert torch.equal(ours.completion_ids, stock.completion_ids)
    assert torch.equal(ours.logprobs, stock.logprobs) and torch.equal(ours.entropies, stock.entropies)


def test_the_kv_cache_keeps_float32_outside_autocast(tied_llama, tok, ids):
    from ccrl.rollout import RolloutCache

    cache = RolloutCache(extra=2, store_autocast=True)
    k = torch.randn(1, 2, 3, 4)
    keys, values = cache.update(k, k, 0)
    assert keys.dtype == values.dtype == torch.float32 and torch.equal(keys, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    assert keys.dtype == torch.float32 and torch.equal(keys[:, :, 3:], k[:, :, :1].bfloat16().float())


def test_only_attentions_that_autocast_casts_get_a_low_precision_cache(tied_llama, quillan):
    from ccrl.rollout.attention import casts_keys_under_autocast

    assert casts_keys_under_autocast(tied_llama) and casts_keys_under_autocast(Autocast(tied_llama))
    assert casts_keys_under_autocast(quillan)
    assert not casts_keys_under_autocast(nn.Linear(2, 2))                         # not a transformers model
    impl = tied_llama.config._attn_implementation
    try:
        tied_llama.config._attn_implementation = "flex_attention"
        assert not casts_keys_under_autocast(tied_llama)
    finally:
        tied_llama.config._attn_implementation = impl


def test_the_kernel_sees_the_autocast_dtype(monkeypatch):
    """Under autocast the decode step's float32 query (and keys, where the cache holds float32) reach
    the kernel in the autocast dtype, as SDPA under autocast would compute with them."""
    import ccrl.rollout.attention as attention
    from ccrl.rollout import decode_kernel

    seen = []
    monkeypatch.setattr(decode_kernel, "applies", lambda q, k, v, m: seen.append((q.dtype, k.dtype, v.dtype)) or False)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8).bfloat16()
    module = nn.Module().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.decode_sdpa_attention(module, q, k, v, None, scaling=0.3, kernel=True)
    attention.decode_sdpa_attention(module, q, k, v.float(), None, scaling=0.3, kernel=True)
    assert seen == [(torch.bfloat16,) * 3, (torch.float32,) * 3]
    assert out.dtype == torch.bfloat16


def test_an_autocast_rollout_reaches_the_kernel_at_every_decode_step(tied_llama, tok, ids, monkeypatch):
    """The dispatch a GPU rollout under the trainer's autocast takes, on the CPU: with the kernel
    wanted, every layer's one-token step hands the kernel bf16 query, keys and values (the real
    kernel takes nothing else), and the rollout matches the one through SDPA up to bf16 rounding."""
    import ccrl.rollout.attention as attention
    from ccrl.rollout import decode_kernel
    from tests.test_rollout_attention import _reference

    calls = []

    def fake(q, k, v, keep, scale, splits=None):
        calls.append(1)
        return _reference(q, k, v, keep, scale).to(q.dtype)

    monkeypatch.setattr(attention, "kernel_wanted", lambda model, choice: choice == "auto")
    monkeypatch.setattr(decode_kernel, "applies",
                        lambda q, k, v, m: q.shape[2] == 1 and {q.dtype, k.dtype, v.dtype} == {torch.bfloat16})
    monkeypatch.setattr(decode_kernel, "decode_attention", fake)
    model = Autocast(tied_llama)
    ours = _rollout(model, ids, tok, cuda_graph="static")
    fed = min(ours.decode_steps, 9)                          # columns fed (of 10, the last is only sampled)
    assert len(calls) == tied_llama.config.num_hidden_layers * fed
    calls.clear()
    sdpa = _rollout(model, ids, tok, cuda_graph="static", decode_kernel="sdpa")
    assert calls == []
    m = ours.completion_mask.bool() & sdpa.completion_mask.bool()
    same = (ours.completion_ids == sdpa.completion_ids).all(-1)                  # rows that sampled alike
    assert same.any()
    assert (ours.logprobs - sdpa.logprobs)[same[:, None] & m].abs().max() <= 0.05
