"""The decode step's attention (``ccrl.rollout.attention``): a GQA Llama's rollout never repeats
its key-value heads, gives the stock ``sdpa`` attention's log-probs and greedy tokens, and leaves
the model's attention setting as it found it; the Triton decode kernel
(``ccrl.rollout.decode_kernel``) against a float64 reference in Triton's CPU interpreter (skipped
without Triton), and how a step reaches it. On a GPU: ``tests/test_rollout_cuda.py``."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as hf_sdpa

from ccrl.rollout import SamplingConfig, generate
from ccrl.rollout.attention import (
    ATTENTION,
    ATTENTION_KERNEL,
    decode_sdpa_attention,
    kernel_wanted,
    rollout_attention,
)
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

    monkeypatch.setattr(engine, "rollout_attention", lambda model, kernel: __import__("contextlib").nullcontext())
    stock = _rollout(gqa_llama, ids, tok, temperature=1.0)
    assert torch.equal(ours.completion_ids, stock.completion_ids)
    m = ours.completion_mask.bool()
    assert (ours.logprobs - stock.logprobs)[m].abs().max() <= 1e-5
    assert torch.equal(greedy.completion_ids, _rollout(gqa_llama, ids, tok, greedy=True).completion_ids)


def test_the_attention_setting_comes_back_after_an_error(gqa_llama):
    with pytest.raises(RuntimeError), rollout_attention(gqa_llama):
        assert gqa_llama.config._attn_implementation == ATTENTION
        raise RuntimeError("a failing rollout")
    assert gqa_llama.config._attn_implementation == "sdpa"


def test_models_without_grouped_heads_are_left_alone_where_the_kernel_does_not_run(llama):
    assert not kernel_wanted(llama, "auto")                                       # a CPU model
    with rollout_attention(llama):
        assert llama.config._attn_implementation != ATTENTION


def _reference(q, k, v, keep, scale):
    """float64 softmax(scale · q kᵀ, kept keys) v: q (B, Hkv, G, D), k/v (B, Hkv, L, D), keep (B, L)."""
    x = torch.einsum("bhgd,bhld->bhgl", q.double(), k.double()) * scale
    if keep is not None:
        x = x.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhgl,bhld->bhgd", x.softmax(-1), v.double())


def test_the_decode_step_reaches_the_kernel_with_its_layout(monkeypatch):
    """The glue on CPU: with the kernel on, a one-token step hands the kernel the grouped query
    layout and the mask's [B, L] rows, and its output comes back as SDPA's (B, 1, H, D)."""
    from ccrl.rollout import decode_kernel

    calls = []

    def fake(q, k, v, keep, scale, splits=None):
        calls.append((tuple(q.shape), None if keep is None else tuple(keep.shape), scale))
        return _reference(q, k, v, keep, scale).to(q.dtype)

    monkeypatch.setattr(decode_kernel, "applies", lambda *a: True)
    monkeypatch.setattr(decode_kernel, "decode_attention", fake)
    torch.manual_seed(0)
    b, h, kv, length, d = 3, 6, 2, 9, 8
    q = torch.randn(b, 1, h, d).transpose(1, 2)                                    # (B, H, 1, D) as HF passes it
    k, v = torch.randn(b, kv, length + 4, d)[:, :, :length], torch.randn(b, kv, length, d)
    mask = torch.ones(b, 1, 1, length + 4, dtype=torch.bool)                      # wider than the keys: sliced
    mask[0, ..., :4] = False
    module = torch.nn.Module().eval()
    got, _ = decode_sdpa_attention(module, q, k, v, mask, scaling=0.3, kernel=True)
    none, _ = decode_sdpa_attention(module, q, k, v, None, scaling=None, kernel=True)
    assert calls == [((b, kv, 3, d), (b, length), 0.3), ((b, kv, 3, d), None, d ** -0.5)]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                          attn_mask=mask[..., :length], scale=0.3).transpose(1, 2)
    assert got.shape == (b, 1, h, d)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert none.shape == (b, 1, h, d)
    calls.clear()
    decode_sdpa_attention(module, q, k, v, mask, scaling=0.3)              # ATTENTION: the kernel is off
    assert calls == []


_INTERPRETED = r"""
import torch
from ccrl.rollout.decode_kernel import decode_attention
from tests.test_rollout_attention import _reference
torch.manual_seed(0)
worst = {}
for B, H, G, L, D, splits in [(3, 2, 1, 70, 16, 1), (2, 2, 3, 300, 32, 3), (2, 1, 6, 129, 64, 2), (1, 3, 2, 64, 16, 1),
                              (2, 2, 2, 200, 32, 8)]:
    for dtype in (torch.float32, torch.float16):
        q = torch.randn(B, H, G, D).to(dtype)
        k = torch.randn(B, H, L + 9, D).to(dtype)[:, :, :L]                      # a view of a longer cache
        v = torch.randn(B, H, L + 9, D).to(dtype)[:, :, :L]
        keep = torch.rand(B, L) > 0.3
        keep[:, -1] = True
        keep[0, : L // 2] = False                                                  # a left-padded row
        one = keep[:1].expand(B, L)                                                # a broadcast row (stride 0)
        for mask in (keep, one, None):
            got = decode_attention(q, k, v, mask, D ** -0.5, splits=splits)
            assert got.shape == (B, H, G, D) and got.dtype == dtype
            err = (got.double() - _reference(q, k, v, mask, D ** -0.5)).abs().max().item()
            worst[dtype] = max(worst.get(dtype, 0.0), err)
print(worst[torch.float32], worst[torch.float16])
"""


def test_decode_kernel_equals_the_reference_in_tritons_interpreter():
    """fp32 and fp16 (the interpreter's bf16 matmul is wrong in Triton 3.9; bf16 is tested on the GPU),
    grouped and single heads, one and several splits, kept / broadcast / no masks, strided caches."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    fp32, fp16 = map(float, out.stdout.split())
    assert fp32 <= 1e-5 and fp16 <= 2e-3, (fp32, fp16)


def test_a_kernel_that_fails_leaves_sdpa_to_decode(monkeypatch, caplog):
    """A Triton that cannot compile or launch on a device (an old GPU, a broken install) costs one
    warning: that step and every later one on the device attend with SDPA."""
    from ccrl.rollout import decode_kernel

    def broken(*a, **kw):
        raise RuntimeError("PTX compile failed\nmore detail")

    monkeypatch.setattr(decode_kernel, "applies", lambda q, k, v, m: str(q.device) not in decode_kernel.FAILED)
    monkeypatch.setattr(decode_kernel, "decode_attention", broken)
    monkeypatch.setattr(decode_kernel, "FAILED", {})
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    module = torch.nn.Module().eval()
    with caplog.at_level("WARNING", logger="ccrl.rollout.attention"):
        first, _ = decode_sdpa_attention(module, q, k, v, None, scaling=0.3, kernel=True)
        again, _ = decode_sdpa_attention(module, q, k, v, None, scaling=0.3, kernel=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                          scale=0.3).transpose(1, 2)
    torch.testing.assert_close(first, ref, rtol=0, atol=1e-6)
    assert torch.equal(first, again)
    assert decode_kernel.FAILED == {"cpu": "RuntimeError: PTX compile failed"}
    assert sum("Triton decode attention failed" in r.message for r in caplog.records) == 1


def test_a_cuda_model_without_triton_is_told_once(monkeypatch, caplog):
    import ccrl.rollout.attention as attention
    from ccrl.rollout import decode_kernel

    class OnCuda(torch.nn.Module):
        def parameters(self, recurse=True):
            yield type("P", (), {"is_cuda": True})()

    monkeypatch.setattr(decode_kernel, "triton_available", lambda: False)
    attention._warn_no_triton.cache_clear()
    with caplog.at_level("WARNING", logger="ccrl.rollout.attention"):
        assert not kernel_wanted(OnCuda(), "auto") and not kernel_wanted(OnCuda(), "auto")
        assert not kernel_wanted(OnCuda(), "sdpa")
    assert sum("Triton is not installed" in r.message for r in caplog.records) == 1


# --------------------------------------------------------------------------- torch.compile


def _compiled_kernel_step(monkeypatch, dtype: torch.dtype, d: int):
    """The decode attention compiled with ``fullgraph=True`` (a backend that keeps each graph), the
    kernel's launch replaced by its float64 reference: (step, (q, k, v, mask), graphs, launches)."""
    from ccrl.rollout import decode_kernel

    launched, graphs = [], []

    def reference(q, k, v, keep, scale, splits=None):
        launched.append(splits)
        return _reference(q, k, v, keep, scale).to(q.dtype)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(decode_kernel, "_launch", reference)
    torch._dynamo.reset()
    torch.manual_seed(0)
    b, h, kv, length = 2, 4, 2, 7
    q = torch.randn(b, 1, h, d).transpose(1, 2).to(dtype)
    k, v = torch.randn(b, kv, length, d).to(dtype), torch.randn(b, kv, length, d).to(dtype)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :3] = False
    module = torch.nn.Module().eval()
    step = torch.compile(lambda q, k, v, m: decode_sdpa_attention(module, q, k, v, m, scaling=0.3, kernel=True)[0],
                         fullgraph=True, backend=backend)
    return step, (q, k, v, mask), graphs, launched


def test_a_compiled_decode_step_traces_whole_with_the_kernel_as_one_opaque_op(monkeypatch):
    """Under torch.compile the decode attention is one graph (no graph break: the kernel switch is
    an argument, not a ContextVar), and the kernel is the custom op ``ccrl::decode_attention``,
    which Inductor does not try to lower; its output is the kernel's (here its float64 reference)."""
    from ccrl.rollout import decode_kernel

    monkeypatch.setattr(decode_kernel, "applies", lambda q, k, v, m: True)
    step, inputs, graphs, launched = _compiled_kernel_step(monkeypatch, torch.float32, 8)
    got = step(*inputs)
    assert len(graphs) == 1 and "torch.ops.ccrl.decode_attention" in graphs[0].code
    assert launched == [None]                                   # splits 0 → the kernel's own choice
    eager, _ = decode_sdpa_attention(torch.nn.Module().eval(), *inputs, scaling=0.3, kernel=True)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    torch._dynamo.reset()


def test_a_grouped_query_llama_decode_step_compiles_without_a_graph_break(gqa_llama):
    """The rollout's attention (grouped layout, SDPA on CPU) inside a whole Hugging Face decode step
    compiled with ``fullgraph=True``: same logits as eager."""
    from transformers import DynamicCache

    from policies.hf_compat import cache_kwargs

    torch._dynamo.reset()
    ids = torch.randint(3, gqa_llama.config.vocab_size, (3, 5))
    with torch.no_grad(), rollout_attention(gqa_llama):
        assert gqa_llama.config._attn_implementation == ATTENTION
        logits = []
        for compiled in (False, True):
            cache = DynamicCache(config=gqa_llama.config)
            gqa_llama(ids, **cache_kwargs(cache), use_cache=True)
            forward = torch.compile(gqa_llama.forward, fullgraph=True, backend="eager") if compiled else gqa_llama.forward
            nxt = torch.full((3, 1), 4)
            logits.append(forward(nxt, **cache_kwargs(cache), attention_mask=torch.ones(3, 6, dtype=torch.long),
                                  use_cache=True).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    torch._dynamo.reset()


def test_rollout_attention_switches_to_the_kernel_function_where_the_kernel_is_wanted(gqa_llama, llama, monkeypatch):
    import ccrl.rollout.attention as attention

    monkeypatch.setattr(attention, "kernel_wanted", lambda model, choice: choice == "auto")
    for model in (gqa_llama, llama):                      # grouped or not: the kernel runs either way
        with rollout_attention(model):
            assert model.config._attn_implementation == ATTENTION_KERNEL
        assert model.config._attn_implementation == "sdpa"
    with rollout_attention(gqa_llama, "sdpa"):
        assert gqa_llama.config._attn_implementation == ATTENTION


def test_applies_traces_whole_and_a_recorded_failure_recompiles_the_step_onto_sdpa(monkeypatch):
    """The real :func:`decode_kernel.applies` under ``fullgraph=True``: its device queries are one
    constant (:func:`decode_kernel.device_supports`, here told the CPU qualifies), the rest traces;
    the kernel runs as the custom op; once a failure is recorded in ``FAILED`` the guard on it
    recompiles the step, which then attends with SDPA."""
    from ccrl.rollout import decode_kernel

    supports = torch.compiler.assume_constant_result(lambda device, dtype: dtype == torch.float16)
    monkeypatch.setattr(decode_kernel, "device_supports", supports)
    monkeypatch.setattr(decode_kernel, "FAILED", {})
    step, (q, k, v, mask), graphs, launched = _compiled_kernel_step(monkeypatch, torch.float16, 16)
    kernel_out = step(q, k, v, mask)
    assert len(graphs) == 1 and "torch.ops.ccrl.decode_attention" in graphs[0].code and launched == [None]
    decode_kernel.FAILED["cpu"] = "RuntimeError: a test"
    sdpa_out = step(q, k, v, mask)
    assert len(graphs) == 2 and "decode_attention" not in graphs[1].code and launched == [None]
    torch.testing.assert_close(sdpa_out.float(), kernel_out.float(), rtol=2e-3, atol=2e-3)
    step(q.float(), k.float(), v.float(), mask)                  # float32: not the kernel's dtype
    assert launched == [None] and "decode_attention" not in graphs[-1].code
    torch._dynamo.reset()


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="Inductor's CPU code needs a C++ compiler")
def test_a_compiled_static_cache_step_writes_its_column_in_place():
    """Inductor on a static-mode cache step (write one column at the slot, attend): the step
    writes the column into the cache's buffers in place, as eager does, and allocates no buffer the
    size of a layer's cache (a copy of each whole buffer per step, twice, when the step returned
    the ``keys`` view made outside it: an input aliasing the buffer it mutates)."""
    from torch._inductor.utils import run_and_get_code

    from ccrl.rollout import RolloutCache

    torch.manual_seed(0)
    n, h, prompt, extra, d = 3, 2, 5, 6, 16
    caches, outs = [], []
    q, x = torch.randn(n, h, 1, d), torch.randn(n, h, 1, d)
    for compiled in (False, True):
        torch.manual_seed(1)
        cache = RolloutCache(extra=extra)
        cache.update(torch.randn(n, h, prompt, d), torch.randn(n, h, prompt, d), 0)
        cache.make_static(torch.full((1,), prompt))
        layer = cache.layers[0]
        buffer = layer._k.data_ptr()

        def step(q, x, cache=cache):
            k, v = cache.update(x, 2 * x, 0)
            return F.scaled_dot_product_attention(q, k, v)

        torch._dynamo.reset()
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):   # code, not a cache hit
            if compiled:
                out, codes = run_and_get_code(torch.compile(step, dynamic=False), q, x)
            else:
                out = step(q, x)
        assert layer._k.data_ptr() == buffer
        torch.testing.assert_close(layer._k[:, :, prompt:prompt + 1], x, rtol=0, atol=0)
        caches.append(layer._v.clone())
        outs.append(out)
    torch._dynamo.reset()
    full = f"(({n}, {h}, {prompt + extra}, {d})"
    assert codes and not any(f"empty_strided_cpu{full}" in code for code in codes)
    torch.testing.assert_close(caches[1], caches[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], outs[0])
