"""The Quillan council policy: config and parameter count, the council mixture, KV cache,
sorted dispatch vs the dense reference, product-key retrieval, routing replay, routing
losses and bias updates, Hugging Face save/load/generate, and PEFT LoRA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

import policies
from ccrl.errors import CcrlError
from policies import (
    QuillanConfig,
    QuillanConfigError,
    QuillanForCausalLM,
    QuillanInputError,
    count_parameters,
)
from policies.hf_compat import CACHE_ARG, cache_kwargs, keep_last_positions, output_cache
from policies.modeling_quillan import _grouped_mm_applies, grouped_linear, load_balancing_loss

FP = dict(attention_precision="fp", expert_precision="fp", micro_precision="fp")


def make_model(seed: int = 0, **overrides) -> QuillanForCausalLM:
    torch.manual_seed(seed)
    return QuillanForCausalLM(QuillanConfig.preset("toy", **overrides))


def batch(seed: int = 0, b: int = 3, t: int = 10, vocab: int = 64, left_pad: tuple = (0, 3, 6)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for row, pad in enumerate(left_pad[:b]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


# ----------------------------------------------------------------------------- config
def test_presets_sizes_and_overrides():
    sizes = {name: count_parameters(QuillanConfig.preset(name))["total"] for name in ("toy", "small", "base")}
    assert sizes["toy"] < 1_000_000
    assert 10_000_000 <= sizes["small"] <= 30_000_000
    assert 100_000_000 <= sizes["base"] <= 300_000_000
    # defaults = small's sizes; small sets its own precisions and quantisation sizes (the class
    # defaults of the precision fields are what checkpoints saved before those fields existed hold)
    small, default = QuillanConfig.preset("small").to_dict(), QuillanConfig().to_dict()
    assert {k for k in default if small[k] != default[k]} == {
        "attention_precision", "micro_query_precision", "persona_head_precision", "weight_group_size", "act_block_size",
    }
    cfg = QuillanConfig.preset("toy", vocab_size=40, persona_top_k=3)
    assert (cfg.vocab_size, cfg.persona_top_k, cfg.num_personas) == (40, 3, 32)
    assert cfg.num_hidden_layers == cfg.num_layers and cfg.num_experts_per_tok == 3


@pytest.mark.parametrize(
    "overrides",
    [{}, {"shared_expert": False}, {"micro_agents": 0}, {"micro_agents": 7, "micro_top_m": 2},
     {"tie_word_embeddings": False}, {"overseer_top_k": 4, "num_personas": 8, "persona_top_k": 1}],
)
def test_count_parameters_total_equals_numel(overrides):
    model = make_model(**overrides)
    assert count_parameters(model.config)["total"] == sum(p.numel() for p in model.parameters())


def test_count_parameters_active_by_hand():
    cfg = QuillanConfig.preset("toy")
    d, v, p, k = 32, 64, 32, 2
    attn = d * 4 * 8 * 2 + d * 2 * 8 * 2                     # q, o: 4 heads; k, v: 2 kv heads; head_dim 8
    expert = 3 * d * 32
    micro = d * 2 * 8 + (4 + 4) * 4 + 2 * 4 * (2 * 2 * d)    # query, all sub-keys, h·m agents of rank 2
    layer = attn + 2 * d + d * p + 3 * d * 32 + k * (expert + micro)
    active = v * d + 2 * layer + d + d * p + p * 2 * 4 * d
    assert count_parameters(cfg)["active"] == active
    assert make_model().active_parameters_per_token() == active


def test_micro_grid_rounds_up_to_the_product_key_grid():
    assert QuillanConfig.preset("toy", micro_agents=7000).micro_grid == (84, 84)
    assert QuillanConfig.preset("toy", micro_agents=6, micro_top_m=2).micro_grid == (2, 3)
    assert QuillanConfig.preset("toy", micro_agents=7, micro_top_m=2).micro_agents_stored == 9


@pytest.mark.parametrize(
    "bad, match",
    [({"routing": "switch"}, "routing"), ({"num_key_value_heads": 3}, "num_key_value_heads"),
     ({"persona_top_k": 33}, "persona_top_k"), ({"expert_precision": "int4"}, "expert_precision"),
     ({"micro_key_dim": 7}, "micro_key_dim"), ({"overseer_top_k": 0}, "overseer_top_k"),
     ({"weight_group_size": -1}, "weight_group_size"),
     ({"micro_query_precision": "int4"}, r"QuillanConfig\.micro_query_precision: expected one of \['ternary', "
                                         r"'binary', 'fp'\], got 'int4'"),
     ({"persona_head_precision": "bf16"}, r"QuillanConfig\.persona_head_precision: expected one of .*got 'bf16'")],
)
def test_invalid_config_fields_raise(bad, match):
    with pytest.raises(QuillanConfigError, match=match):
        QuillanConfig.preset("toy", **bad)


def test_query_and_head_precisions_default_to_full_precision(tmp_path):
    """The fields added for the query nets and persona heads default to ``fp``: the toy and base
    presets keep them so, and a config.json written before they existed loads that way."""
    import json

    assert QuillanConfig.preset("toy").micro_query_precision == "fp"
    assert QuillanConfig.preset("base").persona_head_precision == "fp"
    old = QuillanConfig.preset("toy").to_dict()
    for key in ("micro_query_precision", "persona_head_precision"):
        del old[key]
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert (cfg.micro_query_precision, cfg.persona_head_precision) == ("fp", "fp")
    model = QuillanForCausalLM(cfg)
    assert model.council_head.precision == "fp" and model.model.layers[0].council.micro.query_precision == "fp"


def test_unknown_preset_and_field_suggest():
    with pytest.raises(CcrlError, match="did you mean 'vocab_size'"):
        QuillanConfig.preset("toy", vocab_sise=40)
    with pytest.raises(CcrlError, match="did you mean 'small'"):
        QuillanConfig.preset("smal")


# ----------------------------------------------------------------------------- the council mixture
def manual_mixture(model: QuillanForCausalLM, ids, mask):
    """log π_Ω recomputed from the head's parts, persona by persona (a test may loop)."""
    head = model.council_head
    h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state          # (B, T, d)
    e = model.lm_head.weight
    log_alpha = (head.overseer(h) / head.overseer_temperature).log_softmax(-1)     # (B, T, P)
    persona = []
    for i in range(head.num_personas):
        hi = h + (h @ head.persona_down[i].T) @ head.persona_up[i].T
        persona.append(F.log_softmax(hi @ e.T, -1))
    log_pi = torch.stack(persona, dim=-2)                                          # (B, T, P, V)
    return torch.logsumexp(log_alpha.unsqueeze(-1) + log_pi, dim=-2), log_alpha, log_pi


def test_logits_are_the_council_mixture():
    model = make_model().eval()
    ids, mask = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        ref, log_alpha, _ = manual_mixture(model, ids, mask)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(3, 10), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits.log_softmax(-1), out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.council_weights, log_alpha.exp(), rtol=0, atol=1e-6)
    assert out.council_weights.shape == (3, 10, 32)
    # personas differ (the mixture is not a single head in disguise)
    assert (out.logits - F.log_softmax(model.lm_head(model.model(input_ids=ids).last_hidden_state), -1)).abs().max() > 1e-3


def test_inputs_embeds_and_council_weights():
    model = make_model().eval()
    ids, mask = batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask)
        b = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask)
    assert torch.equal(a.logits, b.logits)
    torch.testing.assert_close(a.council_weights.sum(-1), torch.ones(3, 10), rtol=0, atol=1e-6)
    with pytest.raises(QuillanInputError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))


def test_bf16_model_keeps_a_float32_mixture():
    model = make_model().to(torch.bfloat16)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(3, 10), rtol=0, atol=1e-5)
    out.loss.backward()
    assert model.model.layers[0].council.experts.gate_up_proj.grad.abs().max() > 0


def test_autocast_keeps_a_float32_mixture_and_float32_gradients():
    # mixed-precision training (accelerate's bf16 autocast): the head still runs in float32
    model = make_model()
    ids, mask = batch()
    ref = model(input_ids=ids, attention_mask=mask).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(3, 10), rtol=0, atol=1e-5)
    assert (out.logits - ref).abs().max() < 0.1                                # bf16 matmuls below the head
    out.loss.backward()
    grad = model.model.layers[0].council.experts.gate_up_proj.grad
    assert grad.dtype == torch.float32 and grad.abs().max() > 0


def test_config_round_trip_and_router_logits_flag(tmp_path):
    cfg = QuillanConfig.preset("toy", overseer_top_k=3, routing="noaux_bias", weight_group_size=None)
    cfg.save_pretrained(tmp_path)
    loaded = QuillanConfig.from_pretrained(tmp_path)
    skip = {"_name_or_path", "transformers_version"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in skip} == \
        {k: v for k, v in cfg.to_dict().items() if k not in skip}
    out = make_model()(input_ids=batch()[0], output_router_logits=False)
    assert out.router_logits is None and len(out.routing_indices) == 2


def test_training_forward_builds_no_cache_by_default():
    model = make_model().train()
    assert output_cache(model(input_ids=batch()[0])) is None
    out = model.eval()(input_ids=batch()[0])
    assert isinstance(out.past_key_values, DynamicCache) and out.cache is out.past_key_values   # both names


def test_council_entropy_matches_formula_and_uniform_value():
    model = make_model().eval()
    ids, mask = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    alpha = out.council_weights
    torch.testing.assert_close(out.council_entropy, -(alpha * alpha.log()).sum(-1), rtol=0, atol=1e-6)
    with torch.no_grad():
        model.council_head.overseer.weight.zero_()
        uniform = model(input_ids=ids).council_entropy
    torch.testing.assert_close(uniform, torch.full((3, 10), math.log(32)), rtol=0, atol=1e-6)


def test_entropy_bonus_sends_gradient_to_the_overseer():
    model = make_model()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask)
    (-out.council_entropy[mask.bool()].mean()).backward()
    grad = model.council_head.overseer.weight.grad
    assert grad is not None and grad.abs().max() > 1e-6
    # the persona heads do not enter H_Ω
    assert model.council_head.persona_up.grad is None or model.council_head.persona_up.grad.abs().max() == 0


def test_overseer_top_k_renormalises_over_kept_personas():
    model = make_model(overseer_top_k=3).eval()
    ids, mask = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        _, log_alpha, log_pi = manual_mixture(model, ids, mask)
    kept = out.routing_indices[-1]                                                 # (B, T, 3)
    assert len(out.routing_indices) == model.config.num_layers + 1 and kept.shape == (3, 10, 3)
    torch.testing.assert_close(kept, log_alpha.topk(3, -1).indices)
    w = log_alpha.gather(-1, kept).log_softmax(-1)
    pi = log_pi.gather(-2, kept.unsqueeze(-1).expand(3, 10, 3, 64))
    torch.testing.assert_close(out.logits, torch.logsumexp(w.unsqueeze(-1) + pi, -2), rtol=0, atol=2e-5)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(3, 10), rtol=0, atol=1e-5)
    # H_Ω stays on the dense α
    dense = out.council_weights
    assert dense.shape[-1] == 32
    torch.testing.assert_close(out.council_entropy, -(dense * dense.log()).sum(-1), rtol=0, atol=1e-6)


def test_labels_loss_is_nll_plus_aux():
    model = make_model()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    lp = out.logits[:, :-1]
    tgt = labels[:, 1:]
    keep = tgt != -100
    nll = -lp[keep].gather(-1, tgt[keep].unsqueeze(-1)).mean()
    torch.testing.assert_close(out.loss, nll + 0.01 * out.aux_loss, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("overrides", [FP, {}, {"overseer_top_k": 4, **FP}, {"routing": "noaux_bias"}])
def test_incremental_decoding_equals_full_forward(overrides):
    model = make_model(**overrides).eval()
    ids, mask = batch(t=12)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)
        out = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True,
                    **cache_kwargs(DynamicCache(config=model.config)))
        steps, routes = [out.logits], [out.routing_indices[0]]
        for t in range(5, 12):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                        use_cache=True, **cache_kwargs(output_cache(out)))
            steps.append(out.logits)
            routes.append(out.routing_indices[0])
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full.logits[real], rtol=0, atol=1e-5)
    assert torch.equal(torch.cat(routes, 1)[real], full.routing_indices[0][real])


def test_no_padding_cache_and_positions():
    model = make_model(**FP).eval()
    ids, _ = batch(left_pad=(0, 0, 0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :4], use_cache=True)
        rest = model(input_ids=ids[:, 4:], past_key_values=output_cache(first), use_cache=True)   # T > 1 on a cache
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=0, atol=1e-5)


def test_left_padding_does_not_change_real_tokens():
    model = make_model(**FP).eval()
    ids, mask = batch(b=1, left_pad=(0,))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    pmask = torch.cat([torch.zeros(1, 4, dtype=torch.long), mask], 1)
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=padded, attention_mask=pmask).logits[:, 4:]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("overrides", [{}, {"hidden_size": 30, "num_attention_heads": 3, "num_key_value_heads": 1,
                                            "expert_intermediate_size": 30, "micro_key_dim": 6}])
def test_sorted_dispatch_equals_dense_reference(overrides):
    # the second config has sizes grouped_mm refuses (not 16-byte multiples): the padded-bmm path
    fast = make_model(**overrides)
    dense = make_model(**overrides, dispatch="dense")
    dense.load_state_dict(fast.state_dict())
    ids, mask = batch()
    outs = []
    for model in (fast, dense):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=0, atol=1e-5)
    for a, b in zip(outs[0].routing_indices, outs[1].routing_indices):
        assert torch.equal(a, b)
    grads = {n: p.grad for n, p in dense.named_parameters()}
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("micro_rank", [1, 2])
def test_micro_swarm_training_form_equals_the_gathered_rows(micro_rank):
    """With gradients on, the micro-swarm runs as grouped matmuls over each persona's agent table;
    its output and gradients equal the gathered-rows form (inference, packed) up to float rounding,
    and a no-grad forward of the model takes the gathered rows."""
    torch.manual_seed(0)
    model = make_model(micro_rank=micro_rank, micro_agents=16, micro_top_m=4)
    micro = model.model.layers[0].council.micro
    for param in micro.parameters():
        torch.nn.init.normal_(param, std=0.2)
    p = micro.num_personas
    persona = torch.randint(0, p, (40,)).sort().values
    counts = torch.bincount(persona, minlength=p)
    x = torch.randn(40, micro.hidden, requires_grad=True)
    s = torch.randn(40, micro.heads, micro.n1 + micro.n2)
    s1, s2 = s.split([micro.n1, micro.n2], dim=-1)
    grouped = micro.mix(x, persona, s1, s2, counts=counts)
    gathered = micro.mix(x, persona, s1, s2)
    torch.testing.assert_close(grouped, gathered, rtol=0, atol=1e-6)
    weights = [x, micro.down.weight, micro.up.weight]
    g = torch.randn_like(grouped)
    for a, b in zip(torch.autograd.grad(grouped, weights, g), torch.autograd.grad(gathered, weights, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    calls = []
    real = type(micro)._mix_grouped
    micro._mix_grouped = lambda *args: calls.append(1) or real(micro, *args)
    ids, mask = batch()
    train = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 1
    with torch.no_grad():
        infer = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 1
    torch.testing.assert_close(train.detach(), infer, rtol=0, atol=1e-5)


def test_micro_swarm_with_a_large_table_trains_on_gathered_rows():
    """Past GROUPED_TABLE_RATIO agents per retrieved agent the grouped form would multiply more than
    the gathered one reads; the training forward then gathers."""
    from policies.modeling_quillan import GROUPED_TABLE_RATIO

    model = make_model(micro_agents=1024, micro_top_m=4, micro_query_heads=2)
    micro = model.model.layers[0].council.micro
    assert micro.agents > GROUPED_TABLE_RATIO * micro.heads * micro.top_m
    calls = []
    micro._mix_grouped = lambda *args: calls.append(1)
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert calls == [] and micro.down.weight.grad.abs().sum() > 0


def test_grouped_linear_matches_a_per_group_loop():
    torch.manual_seed(0)
    for k, n, fast in [(32, 16, True), (30, 10, False)]:      # grouped_mm, then padded bmm
        counts = torch.tensor([3, 0, 7, 1, 0, 5])
        x = torch.randn(int(counts.sum()), k, requires_grad=True)
        w = torch.randn(6, n, k, requires_grad=True)
        assert _grouped_mm_applies(x, w) == fast
        y = grouped_linear(x, w, counts)
        starts = (counts.cumsum(0) - counts).tolist()
        ref = torch.cat([x[s:s + c] @ w[p].T for p, (s, c) in enumerate(zip(starts, counts.tolist()))])
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        rx, rw = torch.autograd.grad(ref, (x, w), g)
        torch.testing.assert_close(gx, rx, rtol=0, atol=1e-5)
        torch.testing.assert_close(gw, rw, rtol=0, atol=1e-5)


def test_grouped_linear_under_autocast_runs_the_grouped_kernel_in_bf16():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 7, 1, 0, 5])
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    w = torch.randn(6, 16, 32, requires_grad=True)
    assert not _grouped_mm_applies(x, w.bfloat16()) and _grouped_mm_applies(x, w, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(x, w, counts)
    assert y.dtype == torch.bfloat16
    ref = grouped_linear(x.bfloat16(), w.bfloat16(), counts)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    gx, gw = torch.autograd.grad(y.float().sum(), (x, w))
    assert gx.dtype == gw.dtype == torch.float32


def test_product_key_retrieval_is_exact_at_seed_scale():
    # 7,000 agents per persona (the seeds' scale): 84 + 84 sub-keys scored, same top-m as the full grid.
    cfg = QuillanConfig.preset("toy", micro_agents=7000, micro_top_m=8, num_personas=2, persona_top_k=1,
                               hidden_size=16, num_attention_heads=2, num_key_value_heads=1, micro_query_heads=2)
    from policies.modeling_quillan import MicroSwarm

    torch.manual_seed(0)
    swarm = MicroSwarm(cfg)
    for p in swarm.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(20, 16)
    persona = torch.randint(0, 2, (20,))
    s1, s2 = torch.randn(20, 2, 84), torch.randn(20, 2, 84)
    torch.testing.assert_close(swarm.mix(x, persona, s1, s2), swarm.mix(x, persona, s1, s2, exhaustive=True),
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- routing replay
def test_replaying_own_routes_is_bit_identical():
    model = make_model()
    ids, mask = batch()
    first = model(input_ids=ids, attention_mask=mask)
    again = model(input_ids=ids, attention_mask=mask, routing_indices=first.routing_indices)
    assert torch.equal(first.logits, again.logits)
    for a, b in zip(first.routing_indices, again.routing_indices):
        assert torch.equal(a, b)


def test_replay_reproduces_given_routes_and_trains_the_router():
    model = make_model(overseer_top_k=2)
    ids, mask = batch()
    g = torch.Generator().manual_seed(7)
    given = tuple(torch.randint(0, 32, (3, 10, 2), generator=g) for _ in range(3))
    given = tuple(torch.stack([r[..., 0], (r[..., 0] + 1 + r[..., 1] % 31) % 32], -1) for r in given)  # distinct pairs
    out = model(input_ids=ids, attention_mask=mask, routing_indices=given)
    for a, b in zip(out.routing_indices, given):
        assert torch.equal(a, b)
    out.logits[mask.bool()].mean().backward()
    assert model.model.layers[0].council.router.proj.weight.grad.abs().max() > 0
    # after the router moves, a free forward picks other personas; the replay still uses the recorded ones
    with torch.no_grad():
        for layer in model.model.layers:
            layer.council.router.proj.weight.normal_(std=1.0)
    free = model(input_ids=ids, attention_mask=mask)
    replayed = model(input_ids=ids, attention_mask=mask, routing_indices=given)
    assert not torch.equal(free.routing_indices[0], given[0])
    assert torch.equal(replayed.routing_indices[0], given[0])


def test_bad_replay_and_mask_raise():
    model = make_model()
    ids, mask = batch()
    with pytest.raises(QuillanInputError, match=r"routing_indices\[0\]"):
        model(input_ids=ids, routing_indices=(torch.zeros(3, 10, 3, dtype=torch.long),) * 2)
    with pytest.raises(QuillanInputError, match="one tensor per council layer"):
        model(input_ids=ids, routing_indices=(torch.zeros(3, 10, 2, dtype=torch.long),))
    with pytest.raises(QuillanInputError, match="persona ids"):
        model(input_ids=ids, routing_indices=(torch.full((3, 10, 2), 40, dtype=torch.long),) * 2)
    with pytest.raises(QuillanInputError, match="attention_mask"):
        model(input_ids=ids, attention_mask=mask[:, :5])


# ----------------------------------------------------------------------------- routing losses and bias
def test_load_balancing_loss_by_hand():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]))
    idx = torch.tensor([[0], [1]])
    # f = (0.5, 0.5, 0), p̄ = (0.4, 0.5, 0.1): L = 3 · (0.5·0.4 + 0.5·0.5) = 1.35
    assert load_balancing_loss(logits, idx).item() == pytest.approx(1.35, abs=1e-6)
    balanced = torch.zeros(4, 4)
    assert load_balancing_loss(balanced, torch.tensor([[0], [1], [2], [3]])).item() == pytest.approx(1.0, abs=1e-6)
    masked = load_balancing_loss(logits, idx, token_mask=torch.tensor([True, False]))
    assert masked.item() == pytest.approx(3 * 0.7, abs=1e-6)       # f = (1, 0, 0), p̄ = (0.7, 0.2, 0.1)


def test_router_stats_and_aux_loss_outputs():
    model = make_model()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask)
    stats = out.router_stats
    assert stats["persona_load"].shape == (2, 32) and not stats["persona_load"].requires_grad
    torch.testing.assert_close(stats["persona_load"].sum(-1), torch.ones(2), rtol=0, atol=1e-6)
    # loads count the 21 real tokens only: shares are multiples of 1/(21·2)
    assert mask.sum() == 21
    scaled = stats["persona_load"] * 42
    torch.testing.assert_close(scaled, scaled.round(), rtol=0, atol=1e-4)
    assert stats["max_share"].shape == (2,) and (stats["load_entropy"] <= math.log(32) + 1e-6).all()
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() >= 1.0 - 1e-6   # ≥ 1, equality when balanced
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (30, 32)


def test_noaux_bias_counts_update_and_steer_selection():
    model = make_model(routing="noaux_bias", router_bias_update_rate=0.01).train()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask)
    router = model.model.layers[0].council.router
    counts = router.load_counts.clone()
    assert counts.sum().item() == 21 * 2                         # real tokens × top-k
    assert torch.equal(counts, torch.bincount(out.routing_indices[0][mask.bool()].reshape(-1), minlength=32).float())
    model.update_router_bias()
    expected = 0.01 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(router.score_bias, expected, rtol=0, atol=1e-9)
    assert router.load_counts.sum() == 0
    with torch.no_grad():                                        # a large bias on persona 5 wins every token
        for layer in model.model.layers:
            layer.council.router.score_bias[5] = 10.0
    out = model.eval()(input_ids=ids)
    assert (out.routing_indices[0] == 5).any(-1).all()


def test_update_router_bias_is_a_noop_for_softmax_topk():
    model = make_model().train()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    model.update_router_bias()
    assert model.model.layers[0].council.router.score_bias.abs().sum() == 0


# ----------------------------------------------------------------------------- Hugging Face citizenship
def test_save_load_identical_logits_and_auto_classes(tmp_path):
    model = make_model(routing="noaux_bias").eval()
    with torch.no_grad():
        model.model.layers[1].council.router.score_bias.normal_()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), QuillanConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), policies.QuillanModel)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, QuillanForCausalLM)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           loaded(input_ids=ids, attention_mask=mask).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert policies.QuillanConfig is QuillanConfig


def greedy_loop(model, ids, mask, steps):
    """Greedy decoding with full forwards and no cache (the reference for generate)."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def test_generate_with_cache_equals_no_cache_greedy_loop():
    model = make_model(eos_token_id=None).eval()
    with torch.no_grad():                                         # make greedy paths non-trivial
        model.lm_head.weight.mul_(30.0)
    ids, mask = batch(t=8, left_pad=(0, 2, 5))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 14)
    assert torch.equal(out, greedy_loop(model, ids, mask, 6))
    assert len(set(out[:, 8:].reshape(-1).tolist())) > 1


def test_logits_to_keep_and_tuple_output():
    model = make_model().eval()
    ids, mask = batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)
        last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        tup = model(input_ids=ids, attention_mask=mask, return_dict=False)
    assert last.logits.shape == (3, 1, 64) and last.council_weights.shape == (3, 1, 32)
    torch.testing.assert_close(last.logits, full.logits[:, -1:], rtol=0, atol=1e-6)
    assert torch.equal(tup[0], full.logits)


def test_peft_lora_on_bitlinear_trains_only_adapters():
    from peft import LoraConfig, get_peft_model

    from policies.ternary import BitLinear

    model = make_model(attention_precision="ternary")
    assert isinstance(model.model.layers[0].attn.q_proj, BitLinear)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    lora_before = {n: p.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    ids, mask = batch()
    for _ in range(2):
        peft_model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = peft_model.get_base_model().state_dict()
    for key, value in before.items():
        new_key = key if key in after else key.replace(".weight", ".base_layer.weight")
        assert torch.equal(after[new_key], value), key
    moved = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert moved


def test_gradient_checkpointing_gives_the_same_gradients():
    ref = make_model().train()
    ckpt = make_model().train()
    # transformers >= 5.x (later releases) name it activation_checkpointing_enable; earlier gradient_...
    enable = getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable
    enable()
    assert ckpt.model.layers[0].gradient_checkpointing
    ids, mask = batch()
    for m in (ref, ckpt):
        m(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)


def test_small_preset_builds_with_its_count():
    model = QuillanForCausalLM(QuillanConfig.preset("small"))
    assert count_parameters(model.config)["total"] == sum(p.numel() for p in model.parameters())


def test_pack_ternary_packs_bitlinears_and_experts(tmp_path):
    packed = pytest.importorskip("policies.packed")
    model = make_model(attention_precision="ternary", eos_token_id=None).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    ids, mask = batch(t=8)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    qat_tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    model.pack_ternary()
    assert any(isinstance(m, packed.PackedBitLinear) for m in model.modules())
    experts, micro = model.model.layers[0].council.experts, model.model.layers[0].council.micro
    state = model.state_dict()
    assert experts.is_packed and "model.layers.0.council.experts.gate_up_proj_codes" in state
    assert micro.is_packed and state["model.layers.0.council.micro.down_codes"].dtype == torch.uint8
    assert not any(k.endswith(("micro.down.weight", "micro.up.weight")) for k in state)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    # integer-exact packed products vs the float QAT products: equal up to float rounding
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                      pad_token_id=0), qat_tokens)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.ternary_packed and loaded.model.layers[1].council.experts.is_packed
    assert loaded.model.layers[1].council.micro.is_packed
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, out)
    assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                       pad_token_id=0), qat_tokens)


@torch.no_grad()
def logits_by_dispatch(model, ids, mask) -> dict[str, torch.Tensor]:
    """The model's logits under each expert dispatch path (the config's dispatch is left on "sorted")."""
    out = {}
    for dispatch in ("dense", "sorted"):
        model.config.dispatch = dispatch
        out[dispatch] = model(input_ids=ids, attention_mask=mask).logits
    return out


@pytest.mark.parametrize(
    "precision,group,hidden",
    [("ternary", 128, 32), ("binary", 128, 32), ("ternary", 16, 42), ("binary", 16, 42), ("ternary", None, 42)],
)
def test_packed_micro_tables_are_the_qat_values(precision, group, hidden):
    """Row codes + scales give back the QAT table bit for bit (ragged rows and groups included), and a
    model whose only quantised part is the micro-swarm gives bit-identical logits once packed."""
    pytest.importorskip("policies.packed")
    from policies.packed import dequantize_rows

    heads = dict(num_attention_heads=3, num_key_value_heads=1) if hidden == 42 else {}
    model = make_model(expert_precision="fp", micro_precision=precision, weight_group_size=group,
                       hidden_size=hidden, **heads).eval()
    micro = model.model.layers[0].council.micro
    with torch.no_grad():
        micro.down.weight[3].zero_()                                  # an all-zero agent
        micro.up.weight[5, :7].mul_(1e4)                               # extreme values in one group
        tables = {name: micro._table(getattr(micro, name)).view(-1, hidden) for name in ("down", "up")}
    ids, mask = batch(t=8)
    ref = logits_by_dispatch(model, ids, mask)
    model.pack_ternary()
    assert micro.is_packed and not hasattr(micro, "down")
    for name, table in tables.items():
        codes, scale = getattr(micro, f"{name}_codes"), getattr(micro, f"{name}_scale")
        assert codes.dtype == torch.uint8 and tuple(codes.shape) == (table.shape[0], -(-hidden // 4))
        assert scale.dtype == torch.float32
        assert torch.equal(dequantize_rows(codes, scale, hidden, group), table)
        rows = torch.tensor([[5, 3], [0, table.shape[0] - 1]])                   # gathered rows only
        assert torch.equal(dequantize_rows(codes, scale, hidden, group, rows=rows), table[rows])
    got = logits_by_dispatch(model, ids, mask)
    assert all(torch.equal(got[d], ref[d]) for d in ref), [d for d in ref if not torch.equal(got[d], ref[d])]


@pytest.mark.parametrize(
    "precision,group,hidden",
    [("ternary", 128, 32), ("binary", 128, 32), ("ternary", 16, 42), ("ternary", None, 42)],
)
def test_quantised_query_nets_and_persona_heads_pack_to_the_qat_values(tmp_path, precision, group, hidden):
    """``micro_query_precision`` / ``persona_head_precision``: the forward uses the quantised
    weights (straight-through gradients reach the latent ones), and a model whose only quantised
    parts they are gives bit-identical logits once packed, after ``from_pretrained`` and in
    both dispatch paths; the packed scales stay float32 under ``.to(dtype)``."""
    pytest.importorskip("policies.packed")
    from policies.packed import dequantize_stacked_rows, stacked_rows_shapes
    from policies.ternary import fake_quantize_weight, quantized_parameters

    heads = dict(num_attention_heads=3, num_key_value_heads=1) if hidden == 42 else {}
    model = make_model(expert_precision="fp", micro_precision="fp", micro_query_precision=precision,
                       persona_head_precision=precision, weight_group_size=group, hidden_size=hidden, **heads)
    micro, head = model.model.layers[0].council.micro, model.council_head
    found = {id(p) for p in quantized_parameters(model)}
    assert found == {id(micro.query) for micro in (lay.council.micro for lay in model.model.layers)} | {
        id(head.persona_down), id(head.persona_up)}
    ids, mask = batch(t=8)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert micro.query.grad.abs().max() > 0 and head.persona_up.grad.abs().max() > 0
    with torch.no_grad():
        query = fake_quantize_weight(micro.query, precision, group)
        down, up = head.persona_factors()
        assert torch.equal(up, fake_quantize_weight(head.persona_up.transpose(1, 2), precision, group).transpose(1, 2))
        if precision == "binary":                                               # q · scale: a sign times a scale
            assert not torch.equal(down, head.persona_down) and (down != 0).all()
    model.eval()
    ref = logits_by_dispatch(model, ids, mask)
    model.pack_ternary()
    assert micro.query_packed and head.is_packed and not hasattr(micro, "query") and not hasattr(head, "persona_up")
    assert not micro.is_packed and isinstance(micro.down, torch.nn.Embedding)                # tables stay fp
    codes, scale = micro.query_codes, micro.query_scale
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (micro.query_shape[0] * micro.query_shape[1],
                                                                 -(-hidden // 4))
    assert scale.dtype == torch.float32 and tuple(scale.shape) == stacked_rows_shapes(micro.query_shape, group)[1]
    assert torch.equal(dequantize_stacked_rows(codes, scale, micro.query_shape, group), query)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(head.persona_factors(), (down, up)))
    got = logits_by_dispatch(model, ids, mask)
    assert all(torch.equal(got[d], ref[d]) for d in ref), [d for d in ref if not torch.equal(got[d], ref[d])]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.council_head.is_packed and loaded.model.layers[1].council.micro.query_packed
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, ref["sorted"])
    loaded.to(torch.bfloat16)
    assert loaded.council_head.persona_up_scale.dtype == torch.float32
    assert loaded.model.layers[0].council.micro.query_scale.dtype == torch.float32
    assert loaded.model.layers[0].council.micro.query_codes.dtype == torch.uint8


def _export_source(tmp_path, **overrides):
    """A toy QAT checkpoint directory as a stage writes it (model + tokenizer), for ``ccrl export``."""
    from ccrl.data.tokenizer import default_tokenizer

    tok = default_tokenizer()
    model = make_model(vocab_size=len(tok), eos_token_id=None, **overrides).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return model, src


def test_packed_export_round_trip_gives_the_qat_greedy_tokens(tmp_path):
    pytest.importorskip("policies.packed")
    from safetensors import safe_open

    from ccrl.cli import main
    from ccrl.models import load_policy

    qat, src = _export_source(tmp_path, attention_precision="ternary")
    ids, mask = batch(t=8, vocab=qat.config.vocab_size)
    greedy = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    qat_tokens = qat.generate(**greedy)
    assert main(["export", str(src), str(tmp_path / "packed"), "--packed"]) == 0
    loaded, _ = load_policy(tmp_path / "packed")
    loaded.eval()
    assert loaded.config.ternary_packed and loaded.model.layers[0].council.micro.is_packed
    assert torch.equal(loaded.generate(**greedy), qat_tokens)
    with safe_open(str(tmp_path / "packed" / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert "model.layers.0.council.micro.up_codes" in stored and "lm_head.weight" not in stored   # tied: once
    state = qat.state_dict()
    for name, t in stored.items():                     # full-precision tensors kept exactly as trained
        if t.is_floating_point() and not name.endswith("_scale"):
            assert t.dtype == torch.float32 and torch.equal(t, state[name]), name


def test_small_preset_packed_export_is_at_most_a_seventh_of_bf16(tmp_path):
    """``ccrl export --packed`` of the ``small`` preset is at most 1/7 of the same model saved as
    bf16 safetensors, and loads back to a model that decodes the QAT model's greedy tokens."""
    pytest.importorskip("policies.packed")
    from safetensors.torch import save_file

    from ccrl.data.tokenizer import default_tokenizer
    from ccrl.export import export_checkpoint
    from ccrl.models import load_policy

    torch.manual_seed(0)
    qat = QuillanForCausalLM(QuillanConfig.preset("small", eos_token_id=None)).eval()
    with torch.no_grad():
        qat.lm_head.weight.mul_(30.0)                          # peaked logits: greedy choices far from ties
    src = tmp_path / "src"
    qat.save_pretrained(src)
    default_tokenizer().save_pretrained(src)
    bf16 = {k: v.to(torch.bfloat16) for k, v in qat.state_dict().items() if k != "lm_head.weight"}  # tied: once
    save_file(bf16, str(tmp_path / "bf16.safetensors"))
    bf16_bytes = (tmp_path / "bf16.safetensors").stat().st_size
    out = export_checkpoint(src, tmp_path / "packed", packed=True)
    packed_bytes = (out / "model.safetensors").stat().st_size
    assert packed_bytes * 7 <= bf16_bytes, (packed_bytes, bf16_bytes, bf16_bytes / packed_bytes)
    loaded, _ = load_policy(out)
    loaded.eval()
    assert loaded.config.ternary_packed and loaded.council_head.is_packed
    ids, mask = batch(t=8, vocab=qat.config.vocab_size)
    greedy = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(**greedy), qat.generate(**greedy))
    with torch.no_grad():                # integer-exact packed products vs the float QAT products: rounding
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   qat(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-4)


def test_packed_export_in_bf16_casts_back_on_load(tmp_path):
    pytest.importorskip("policies.packed")
    from safetensors import safe_open

    from ccrl.errors import CheckpointError
    from ccrl.export import export_checkpoint

    qat, src = _export_source(tmp_path)
    out = export_checkpoint(src, tmp_path / "packed16", packed=True, fp_dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    state = qat.state_dict()
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16 and "lm_head.weight" not in stored
    assert stored["model.layers.0.council.micro.query"].dtype == torch.bfloat16
    assert stored["model.layers.0.council.micro.down_scale"].dtype == torch.float32
    assert stored["model.layers.0.council.router.score_bias"].dtype == torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for name, t in loaded.state_dict().items():
        if name in state and t.is_floating_point():
            assert torch.equal(t, state[name].to(torch.bfloat16).float()), name
    ref = copy.deepcopy(qat).pack_ternary()
    for name in ("model.layers.1.council.micro.up_codes", "model.layers.1.council.experts.down_proj_scale"):
        assert torch.equal(loaded.state_dict()[name], ref.state_dict()[name])
    with pytest.raises(CheckpointError, match="packed"):
        export_checkpoint(src, tmp_path / "plain16", fp_dtype="bfloat16")


def test_packed_checkpoint_size_is_codes_scales_and_fp_parts(tmp_path):
    """Toy preset, ternary attention: the file holds exactly the hand-counted bytes (plus its header).

    d = 32, 2 layers, P = 32 personas, every quantised matrix has in-features 32 (one 32-wide
    sub-block: codes out · 32 / 4 bytes, one float32 scale per row with weight groups of 128):
    per layer attention q, k, v, o rows 32 + 16 + 16 + 32 = 96; persona experts P · (2 · 32 + 32)
    = 3072; shared expert 32 + 32 + 32 = 96; micro-agent tables 2 · P · 16 agents · rank 2 = 2048
    rows of 32 / 4 = 8 bytes. Full-precision parts: embedding 64 · 32 (tied: once), norms
    2 · 2 · 32 + 32, per layer router 32 · 32, micro queries P · 2 heads · 8 · 32 and sub-keys
    P · (4 + 4) · 4, then overseer 32 · 32 and persona heads 2 · P · 4 · 32; router selection
    biases 2 · 32 (always float32).
    """
    pytest.importorskip("policies.packed")
    import json
    import struct

    model = make_model(attention_precision="ternary").eval().pack_ternary()
    rows = 2 * (96 + 3072 + 96 + 2048)
    codes, scales = rows * 32 // 4, 4 * rows
    fp = 64 * 32 + (2 * 2 * 32 + 32) + 2 * (32 * 32 + 32 * 2 * 8 * 32 + 32 * 8 * 4) + 32 * 32 + 2 * 32 * 4 * 32
    bias = 4 * 2 * 32
    for fp_dtype, width in ((None, 4), (torch.bfloat16, 2)):
        out = tmp_path / str(fp_dtype)
        model.save_pretrained(out, state_dict=model.packed_state_dict(fp_dtype))
        path = out / "model.safetensors"
        raw = path.read_bytes()
        header = struct.unpack("<Q", raw[:8])[0]
        meta = json.loads(raw[8:8 + header])
        data = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in meta.items() if k != "__metadata__")
        expected = codes + scales + width * fp + bias
        assert data == expected, (fp_dtype, data, expected)
        assert path.stat().st_size == 8 + header + expected
    assert model.state_dict()["model.layers.0.council.micro.down_codes"].numel() == 32 * 16 * 2 * 8


def test_packing_needs_eval_mode():
    pytest.importorskip("policies.packed")
    with pytest.raises(CcrlError, match="eval"):
        make_model(attention_precision="ternary").train().pack_ternary()


# ----------------------------------------------------------------------------- transformers' cache contract
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_takes_the_cache_by_either_name_and_returns_it_under_the_installed_name(name):
    model = make_model(**FP).eval()
    ids, mask = batch(t=8)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        first = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        assert first[CACHE_ARG] is first.past_key_values is first.cache
        rest = model(input_ids=ids[:, 5:], attention_mask=mask, use_cache=True, **{name: first[CACHE_ARG]})
    real = mask.bool()
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1)[real], full[real], rtol=0, atol=1e-5)
    assert rest[CACHE_ARG].get_seq_length() == 8


def test_forward_refuses_two_different_caches():
    model = make_model(**FP).eval()
    with pytest.raises(TypeError, match="QuillanForCausalLM.forward: got both cache= and past_key_values="):
        model(input_ids=batch()[0], cache=DynamicCache(config=model.config),
              past_key_values=DynamicCache(config=model.config))


def test_keep_last_positions_slices_like_the_output_head_needs():
    h = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    assert torch.equal(keep_last_positions(h, 0), h)
    assert torch.equal(keep_last_positions(h, 2), h[:, 3:])
    assert torch.equal(keep_last_positions(h, torch.tensor([0, 4])), h[:, [0, 4]])
    with pytest.raises(ValueError, match="logits_to_keep"):
        keep_last_positions(h, torch.zeros(2, 2, dtype=torch.long))
