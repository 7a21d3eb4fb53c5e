"""Grouped-query attention of the decode step (``ccrl.rollout.attention``): a GQA Llama's rollout
never repeats its key-value heads, gives the stock ``sdpa`` attention's log-probs and greedy tokens,
and leaves the model's attention setting as it found it."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa

from ccrl.rollout import SamplingConfig, generate
from ccrl.rollout.attention import ATTENTION, decode_sdpa_attention, grouped_decode_attention
from tests.conftest import ROLLOUT_PROMPTS, TINY_LLAMA, special_tokens


@pytest.fixture(scope="module")
def gqa_llama(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(TINY_LLAMA, num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    cfg = AutoConfig.for_model(hf.pop("model_type"), **hf, **special_tokens(tok))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def ids(tok):
    return [tok.encode(p) for p in ROLLOUT_PROMPTS]


def _rollout(model, ids, tok, **kw):
    s = SamplingConfig(max_new_tokens=8, **kw)
    return generate(model, ids, s, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, group_size=3,
                    generator=torch.Generator().manual_seed(0))


def test_grouped_layout_equals_repeated_heads_with_padding_mask():
    torch.manual_seed(0)
    b, h, kv, length, d = 3, 6, 2, 9, 8
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, kv, length, d), torch.randn(b, kv, length, d)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :4] = False                                                       # a left-padded row
    module = torch.nn.Module().eval()
    module.num_key_value_groups = h // kv
    got, _ = decode_sdpa_attention(module, q, k, v, mask, scaling=d ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                          attn_mask=mask, scale=d ** -0.5).transpose(1, 2)
    assert got.shape == (b, 1, h, d)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    per_head = mask.expand(b, h, 1, length).clone()
    per_head[1, 4, 0, 2] = False                                                   # a mask that differs per head
    got, _ = decode_sdpa_attention(module, q, k, v, per_head, scaling=d ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                          attn_mask=per_head, scale=d ** -0.5).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_gqa_rollout_decodes_without_repeating_key_value_heads(gqa_llama, tok, ids, monkeypatch):
    calls = []
    real = hf_sdpa.repeat_kv
    monkeypatch.setattr(hf_sdpa, "repeat_kv", lambda x, n: calls.append(x.shape[2]) or real(x, n))
    ro = _rollout(gqa_llama, ids, tok, temperature=1.0)
    # the prefill (several query tokens) may repeat; no decode step (one query token) does
    assert ro.completion_ids.shape[1] == 8 and len(calls) <= 2 * gqa_llama.config.num_hidden_layers
    assert gqa_llama.config._attn_implementation == "sdpa"


def test_gqa_rollout_equals_stock_sdpa(gqa_llama, tok, ids, monkeypatch):
    ours = _rollout(gqa_llama, ids, tok, temperature=1.0)
    greedy = _rollout(gqa_llama, ids, tok, greedy=True)
    import ccrl.rollout.engine as engine

    monkeypatch.setattr(engine, "grouped_decode_attention", lambda model: __import__("contextlib").nullcontext())
    stock = _rollout(gqa_llama, ids, tok, temperature=1.0)
    assert torch.equal(ours.completion_ids, stock.completion_ids)
    m = ours.completion_mask.bool()
    assert (ours.logprobs - stock.logprobs)[m].abs().max() <= 1e-5
    assert torch.equal(greedy.completion_ids, _rollout(gqa_llama, ids, tok, greedy=True).completion_ids)


def test_the_attention_setting_comes_back_after_an_error(gqa_llama):
    with pytest.raises(RuntimeError), grouped_decode_attention(gqa_llama):
        assert gqa_llama.config._attn_implementation == ATTENTION
        raise RuntimeError("a failing rollout")
    assert gqa_llama.config._attn_implementation == "sdpa"


def test_models_without_grouped_heads_are_left_alone(llama):
    with grouped_decode_attention(llama):
        assert llama.config._attn_implementation != ATTENTION
