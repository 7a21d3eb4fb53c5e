"""policies.CouncilHead on a tiny Llama built from a config: the mixture, H_Ω, generate, save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from policies import CouncilHead, CouncilHeadConfig
from policies.errors import PolicyCheckpointError


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=None, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 48, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def test_mixture_over_the_wrapped_models_hidden_state():
    base = tiny_llama()
    model = CouncilHead(base, num_personas=8, persona_head_rank=4).eval()
    ids, mask = inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        h = base.model(input_ids=ids, attention_mask=mask).last_hidden_state                 # (B, T, d)
        head, e = model.head, base.lm_head.weight
        log_alpha = head.overseer(h).log_softmax(-1)                                           # (B, T, 8)
        log_pi = torch.stack([F.log_softmax((h + (h @ head.persona_down[i].T) @ head.persona_up[i].T) @ e.T, -1)
                              for i in range(8)], dim=-2)                                      # (B, T, 8, V)
    torch.testing.assert_close(out.logits, torch.logsumexp(log_alpha.unsqueeze(-1) + log_pi, -2), rtol=0, atol=2e-5)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(2, 9), rtol=0, atol=1e-5)
    alpha = out.council_weights
    torch.testing.assert_close(out.council_entropy, -(alpha * alpha.log()).sum(-1), rtol=0, atol=1e-6)
    assert out.aux_loss.item() == 0.0 and out.routing_indices == () and out.router_logits == ()


def test_entropy_gradient_and_training_reach_head_and_base():
    base = tiny_llama()
    model = CouncilHead(base, num_personas=32, persona_head_rank=4).train()
    ids, mask = inputs()
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    (out.loss - 0.05 * out.council_entropy.mean()).backward()
    assert model.head.overseer.weight.grad.abs().max() > 0
    assert model.head.persona_up.grad.abs().max() > 0
    assert base.model.layers[0].self_attn.q_proj.weight.grad.abs().max() > 0
    assert out.loss.item() == pytest.approx(math.log(48), abs=0.5)     # near-uniform at init


def test_uniform_overseer_entropy_is_log_p():
    model = CouncilHead(tiny_llama(), num_personas=32, persona_head_rank=4).eval()
    with torch.no_grad():
        model.head.overseer.weight.zero_()
        out = model(input_ids=inputs()[0])
    torch.testing.assert_close(out.council_entropy, torch.full((2, 9), math.log(32)), rtol=0, atol=1e-6)


def test_generate_with_cache_equals_greedy_loop():
    model = CouncilHead(tiny_llama(), num_personas=8, persona_head_rank=4, overseer_top_k=2).eval()
    with torch.no_grad():
        model.base.lm_head.weight.mul_(20.0)
    ids, mask = inputs()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref_ids, ref_mask = ids, mask
    for _ in range(5):
        with torch.no_grad():
            nxt = model(input_ids=ref_ids, attention_mask=ref_mask).logits[:, -1].argmax(-1, keepdim=True)
        ref_ids = torch.cat([ref_ids, nxt], 1)
        ref_mask = torch.cat([ref_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, ref_ids)


def test_save_load_round_trip(tmp_path):
    model = CouncilHead(tiny_llama(), num_personas=8, persona_head_rank=4, overseer_top_k=3).eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"base", "config.json", "council_head.json",
                                                     "council_head.safetensors"}
    loaded = CouncilHead.from_pretrained(tmp_path).eval()
    assert loaded.head.overseer_top_k == 3 and loaded.head.num_personas == 8
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           loaded(input_ids=ids, attention_mask=mask).logits)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()                 # as any checkpoint loads
    assert type(auto) is CouncilHead and type(AutoConfig.from_pretrained(tmp_path)) is CouncilHeadConfig
    assert auto.head.overseer_top_k == 3 and auto.base.config.model_type == "llama"
    with torch.no_grad():
        assert torch.equal(auto(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)  # loader options reach base/
    assert half.base.dtype == torch.bfloat16 and next(half.head.parameters()).dtype == torch.bfloat16
    (tmp_path / "council_head.safetensors").unlink()
    with pytest.raises(PolicyCheckpointError, match="council_head.safetensors"):
        CouncilHead.from_pretrained(tmp_path)
