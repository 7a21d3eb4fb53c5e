"""The CUDA graph decode path (``SamplingConfig.cuda_graph``) on a GPU; every test here skips
without CUDA. The graph replays the static decode step, so from the same device generator it
gives exactly what static decoding gives eagerly; greedy decoding gives the eager loop's tokens;
its log-probs are the policy's (a full forward) and its samples follow the policy's distribution;
a step that cannot be captured falls back to the eager loop (``auto``) or raises (``True``); a
Quillan policy is captured whole, with or without bf16 autocast; the RL trainer's sampling
generator lives on the GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ccrl.rollout import SamplingConfig, decode_graph, engine, generate
from ccrl.rollout.sampling import draw
from tests.test_rollout import _full_forward, _special

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def llama(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                               **_special(tok))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).cuda().eval()
    with torch.no_grad():                                 # spread the logits: greedy ties would be luck, not a test
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def quillan(tok):
    from policies import QuillanConfig, QuillanForCausalLM

    torch.manual_seed(0)
    return QuillanForCausalLM(QuillanConfig.preset("toy", **_special(tok))).cuda().eval()


class EosBiased(torch.nn.Module):
    """A policy whose EOS logit is raised by ``bias`` (on the policy's device), so rows end at varied lengths."""

    def __init__(self, base, eos: int, bias: float):
        super().__init__()
        self.base = base
        vocab = base.get_output_embeddings().weight.shape[0]
        self.register_buffer("shift", F.one_hot(torch.tensor(eos), vocab).float().cuda() * bias)

    def forward(self, logits_to_keep=0, **kw):
        out = self.base(logits_to_keep=logits_to_keep, **kw)
        out.logits = out.logits + self.shift
        return out


def _run(model, ids, tok, mode, group=4, seed=0, **sampling):
    sampling.setdefault("max_new_tokens", 16)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return generate(model, ids, SamplingConfig(cuda_graph=mode, **sampling), eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, group_size=group, generator=gen)


def _equal(a, b) -> None:
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.truncated, b.truncated)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.entropies, b.entropies)


@pytest.mark.parametrize("which", ["llama", "quillan"])
def test_greedy_graph_gives_the_eager_loops_tokens(which, llama, quillan, tok, ids):
    model = llama if which == "llama" else quillan
    eager = _run(model, ids, tok, False, greedy=True)
    graph = _run(model, ids, tok, True, greedy=True)
    assert torch.equal(eager.completion_ids, graph.completion_ids)
    assert torch.equal(eager.lengths, graph.lengths)
    assert (eager.logprobs - graph.logprobs).abs().max() <= 1e-4


@pytest.mark.parametrize("which", ["llama", "quillan"])
@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 8}])
def test_graph_replays_equal_static_decoding_from_the_same_generator(which, sampling, llama, quillan, tok, ids):
    model = llama if which == "llama" else EosBiased(quillan, tok.eos_token_id, 1.5)
    static = _run(model, ids, tok, "static", seed=5, **sampling)
    graph = _run(model, ids, tok, True, seed=5, **sampling)
    _equal(static, graph)
    if which == "quillan":
        assert torch.equal(static.council_weights, graph.council_weights)
        for a, b in zip(static.routing_indices, graph.routing_indices):
            assert torch.equal(a, b)


def test_captures_reuse_one_stream_and_pin_no_memory_across_rollouts(llama, tok, ids, monkeypatch):
    """Every capture runs on the device's one capture stream: cuBLAS keeps a workspace per (handle,
    stream) for the process's lifetime, so a stream per capture pinned a workspace per window until
    torch's pool of 32 streams wrapped (up to 1 GiB on Hopper)."""
    import gc

    assert decode_graph.capture_stream("cuda") is decode_graph.capture_stream(torch.device("cuda"))
    model = EosBiased(llama, tok.eos_token_id, -1e4)                          # no row ends early: every window runs
    _run(model, ids, tok, True, max_new_tokens=32, attend_window=2)          # warm: the one stream's workspace
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    captures = []
    capture = decode_graph.capture_step
    monkeypatch.setattr(decode_graph, "capture_step", lambda *a: captures.append(1) or capture(*a))
    for seed in range(3):
        _run(model, ids, tok, True, seed=seed, max_new_tokens=32, attend_window=2)
    assert len(captures) > 32                                                 # past the pool of 32 streams
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() - before < 2**20


@pytest.mark.parametrize("which", ["llama", "quillan"])
def test_one_graph_per_attention_window_equals_static_decoding(which, llama, quillan, tok, ids, monkeypatch):
    model = llama if which == "llama" else EosBiased(quillan, tok.eos_token_id, 1.5)
    captures = []
    capture = decode_graph.capture_step
    monkeypatch.setattr(decode_graph, "capture_step", lambda *a: captures.append(1) or capture(*a))
    static = _run(model, ids, tok, "static", seed=5, temperature=1.0, attend_window=4)
    graph = _run(model, ids, tok, True, seed=5, temperature=1.0, attend_window=4)
    _equal(static, graph)
    fed = min(graph.decode_steps, 15)                     # columns fed (of 16, the last is only sampled)
    assert len(captures) == math.ceil(fed / 4)                                    # one graph per window of 4
    greedy = _run(model, ids, tok, True, greedy=True, attend_window=4)
    eager = _run(model, ids, tok, False, greedy=True)
    assert torch.equal(greedy.completion_ids, eager.completion_ids)


@pytest.mark.parametrize("shape", [(8, 2, 6, 1100, 128), (16, 16, 1, 300, 64), (3, 4, 1, 64, 16), (5, 1, 8, 2049, 64)])
def test_decode_kernel_equals_float64_attention_on_the_gpu(shape):
    pytest.importorskip("triton")
    from ccrl.rollout.decode_kernel import decode_attention
    from tests.test_rollout_attention import _reference

    B, H, G, L, D = shape
    torch.manual_seed(0)
    q = torch.randn(B, H, G, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, H, L + 32, D, device="cuda", dtype=torch.bfloat16)[:, :, :L]   # a view of a longer cache
    v = torch.randn(B, H, L + 32, D, device="cuda", dtype=torch.bfloat16)[:, :, :L]
    keep = torch.rand(B, L, device="cuda") > 0.2
    keep[:, -1] = True
    keep[0, : L // 3] = False                                                    # a left-padded row
    ref = _reference(q, k, v, keep, D ** -0.5)
    sdpa = F.scaled_dot_product_attention(q.reshape(B, H * G, 1, D), k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                          attn_mask=keep[:, None, None, :], scale=D ** -0.5).reshape(B, H, G, D)
    sdpa_err = (sdpa.double() - ref).abs().max().item()
    for splits in (None, 1, 3):
        got = decode_attention(q, k, v, keep, D ** -0.5, splits=splits)
        err = (got.double() - ref).abs().max().item()
        assert err <= max(2 * sdpa_err, 1e-2), (splits, err, sdpa_err)


def test_a_bf16_rollout_attends_with_the_decode_kernel_inside_the_graph(llama, tok, ids, monkeypatch):
    pytest.importorskip("triton")
    import copy

    from ccrl.rollout import decode_kernel

    model = copy.deepcopy(llama).to(torch.bfloat16)
    calls = []
    real = decode_kernel.decode_attention
    monkeypatch.setattr(decode_kernel, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    static = _run(model, ids, tok, "static", seed=5, temperature=1.0, attend_window=4)
    fed = min(static.decode_steps, 15)                    # columns fed (of 16, the last is only sampled)
    assert len(calls) == model.config.num_hidden_layers * fed                     # every fed column, every layer
    calls.clear()
    graph = _run(model, ids, tok, True, seed=5, temperature=1.0, attend_window=4)
    _equal(static, graph)
    assert calls                                                                  # the warm-up steps ran it
    _, logits = _full_forward(model, graph)
    lp = torch.log_softmax(logits, -1).gather(-1, graph.completion_ids[..., None]).squeeze(-1)
    m = graph.completion_mask.bool()
    assert (lp - graph.logprobs)[m].abs().mean() <= 0.02                         # bf16 forward vs bf16 decode
    calls.clear()
    _run(model, ids, tok, True, seed=5, temperature=1.0, decode_kernel="sdpa")
    assert calls == []
    assert model.config._attn_implementation == "sdpa"


def test_a_compiled_bf16_decode_step_keeps_the_decode_kernel(llama, tok, ids, monkeypatch):
    """``torch.compile`` of a bf16 decode step inside the rollout's attention: the kernel runs as the
    opaque op ``ccrl::decode_attention`` (Inductor does not lower it, so it is not recorded as failed
    and SDPA does not take over), with the eager step's logits."""
    pytest.importorskip("triton")
    import copy

    from transformers import DynamicCache

    from ccrl.rollout import decode_kernel
    from ccrl.rollout.attention import ATTENTION_KERNEL, rollout_attention
    from policies.hf_compat import cache_kwargs

    monkeypatch.setattr(decode_kernel, "FAILED", {})
    launched = []
    real = decode_kernel._launch
    monkeypatch.setattr(decode_kernel, "_launch", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    model = copy.deepcopy(llama).to(torch.bfloat16)
    prompt = torch.tensor([ids[0][:5]] * 4, device="cuda")
    torch._dynamo.reset()
    logits = []
    with torch.no_grad(), rollout_attention(model):
        assert model.config._attn_implementation == ATTENTION_KERNEL
        for compiled in (False, True):
            cache = DynamicCache(config=model.config)
            model(prompt, **cache_kwargs(cache), use_cache=True)
            forward = torch.compile(model.forward, dynamic=False) if compiled else model.forward
            launched.clear()
            out = forward(torch.full((4, 1), 5, device="cuda"), **cache_kwargs(cache), use_cache=True,
                          attention_mask=torch.ones(4, 6, dtype=torch.long, device="cuda"))
            assert len(launched) == model.config.num_hidden_layers                # every layer ran the kernel
            logits.append(out.logits.float())
    torch._dynamo.reset()
    assert decode_kernel.FAILED == {}
    # bf16 logits of about 5 (one unit in the last place: 2**-5): Inductor fuses the norms and
    # rotary embedding without the eager step's intermediate bf16 roundings, a few units apart
    torch.testing.assert_close(logits[1], logits[0], rtol=0.02, atol=0.05)


def test_a_rollout_under_bf16_autocast_uses_the_decode_kernel(llama, tok, ids, monkeypatch):
    """The RL trainer's mixed precision: float32 weights, bf16 autocast, a bf16 KV cache."""
    pytest.importorskip("triton")
    from ccrl.rollout import decode_kernel

    calls = []
    real = decode_kernel.decode_attention
    monkeypatch.setattr(decode_kernel, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    from tests.test_rollout_precision import Autocast

    ro = _run(Autocast(llama, "cuda"), ids, tok, True, seed=5, temperature=1.0)
    assert calls and torch.isfinite(ro.logprobs).all()


def test_graph_rollout_under_autocast_is_the_same_bits_with_weights_cast_once(llama, tok, ids, monkeypatch):
    import contextlib

    from tests.test_rollout_precision import Autocast

    model = Autocast(llama, "cuda")
    ours = _run(model, ids, tok, True, seed=6, temperature=1.0)
    monkeypatch.setattr(engine, "cast_linear_weights_once", lambda m: contextlib.nullcontext())
    stock = _run(model, ids, tok, True, seed=6, temperature=1.0)
    _equal(ours, stock)
    assert all(p.dtype == torch.float32 for p in llama.parameters())


def test_graph_rollout_logprobs_equal_a_full_forward(llama, tok, ids):
    model = EosBiased(llama, tok.eos_token_id, 4.0)
    ro = _run(model, ids, tok, True, group=8, temperature=0.8)
    assert ro.lengths.min() < ro.lengths.max()                                    # rows ended at different steps
    _, logits = _full_forward(model, ro)
    logp = torch.log_softmax(logits / 0.8, -1)
    lp = logp.gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    m = ro.completion_mask.bool()
    assert (lp - ro.logprobs)[m].abs().max() <= 1e-4
    assert torch.all(ro.logprobs[~m] == 0) and torch.all(ro.completion_ids[~m] == tok.pad_token_id)


def test_graph_samples_follow_the_policys_distribution(llama, tok, ids):
    """Chi-square of 4096 first tokens of one prompt against the policy's probabilities."""
    G = 4096
    ro = _run(llama, ids[:1], tok, True, group=G, seed=11, max_new_tokens=2, temperature=2.0)
    _, logits = _full_forward(llama, ro.select(torch.arange(1, device="cuda")))
    probs = torch.softmax(logits[0, 0] / 2.0, -1).double()                       # (V,)
    counts = torch.bincount(ro.completion_ids[:, 0], minlength=probs.numel()).double()
    expected = probs * G
    keep = expected >= 5                                                           # pool the rare tokens
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp.clamp_min(1e-12)).sum())
    dof = int(keep.sum())
    assert chi2 < dof + 5 * math.sqrt(2 * dof)                                    # ~5 sigma


def test_draw_is_multinomials_exponential_race():
    probs = torch.rand(64, 50, device="cuda").softmax(-1)
    want = torch.multinomial(probs, 1, generator=torch.Generator(device="cuda").manual_seed(1)).squeeze(-1)
    assert torch.equal(draw(probs, torch.Generator(device="cuda").manual_seed(1)), want)


class _Syncs(torch.nn.Module):
    """A policy whose forward reads a value back to the host: its decode step cannot be captured."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, **kw):
        out = self.base(**kw)
        if float(out.logits.abs().max()) < 0:       # never true; the read-back is the point
            raise AssertionError
        return out


def test_a_step_that_cannot_be_captured_falls_back_to_the_eager_loop(llama, tok, ids):
    model = _Syncs(llama)
    eager = _run(model, ids, tok, False, seed=2)
    auto = _run(model, ids, tok, "auto", seed=2)
    why = engine._UNCAPTURABLE[model]
    assert "test_rollout_cuda.py" in why and "float(out.logits" in why                # names the operation
    _equal(eager, auto)                                          # the generator drew as if no capture was tried
    with pytest.raises(engine.NotCapturable):
        _run(model, ids, tok, True, seed=2)


def test_quillan_is_captured_under_bf16_autocast(quillan, tok, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        static = _run(quillan, ids, tok, "static", seed=4)
        graph = _run(quillan, ids, tok, True, seed=4)
    _equal(static, graph)
    assert quillan not in engine._UNCAPTURABLE


def test_auto_uses_the_graph_on_cuda(llama, tok, ids, monkeypatch):
    captured = []
    real = decode_graph.capture_step
    monkeypatch.setattr(decode_graph, "capture_step", lambda *a: captured.append(1) or real(*a))
    _run(llama, ids, tok, "auto")
    assert captured == [1]


def test_rl_trainer_samples_with_a_generator_on_the_gpu(tmp_path, monkeypatch):
    from ccrl.pipeline import run_recipe
    from tests.conftest import TINY_LLAMA

    seen = []
    real = engine.generate

    def spy(*a, generator=None, **kw):
        seen.append(None if generator is None else generator.device.type)
        return real(*a, generator=generator, **kw)

    monkeypatch.setattr("ccrl.trainers.rl.generate", spy)
    rec = {"name": "cuda-rl", "seed": 0, "output_dir": str(tmp_path / "run"), "device": "cuda",
           "model": {"hf_config": dict(TINY_LLAMA)}, "eval": {"max_new_tokens": 4, "batch_size": 16},
           "stages": [{"kind": "rl", "objective": "grpo", "data": {"task": "arithmetic", "num_examples": 64,
                                                                    "heldout_size": 4},
                       "steps": 2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 6,
                       "warmup_steps": 0, "lr_schedule": "constant", "rewards": [{"name": "exact_match"}]}]}
    summary = run_recipe(rec)
    assert summary["stages"][0]["metrics"]
    assert seen and set(seen) == {"cuda"}
