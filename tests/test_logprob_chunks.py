"""Real vocabularies in RL: the output head applied chunk by chunk over the completion tokens
(``chunked_token_logprobs``, ``logprob_chunk_size``) gives the log-probs, entropies and gradients
of the full logits, creates no (rows, T, V) tensor, and is what the RL trainer's training passes and
reference scoring use on a plain causal LM; plus bf16 weights with float32 AdamW state."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import rewards
from ccrl.objectives import chunked_token_logprobs, token_entropy, token_logprobs
from ccrl.rollout import SamplingConfig, generate
from ccrl.trainers.rl import completion_logprobs, head_chunk_size
from policies import interface as policy_api
from tests.conftest import TINY_LLAMA

VOCAB = 5000
QUIET = {"show_progress": False, "log": lambda *_: None}


@rewards.register("test_chunk_digit_share", override=True)
def digit_share(prompts, completions, **kwargs):
    """Share of digits in each completion: a dense reward, so every group has a gradient."""
    return [sum(c.isdigit() for c in s) / max(1, len(s)) for s in completions]


def _llama(vocab: int = VOCAB, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = {**TINY_LLAMA, **over}
    cfg = AutoConfig.for_model(hf.pop("model_type"), vocab_size=vocab, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, **hf)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _rollout(model, rows: int = 4, new: int = 12, group: int = 2):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (6, 4, 5, 3)][: rows // group]
    return generate(model, prompts, SamplingConfig(max_new_tokens=new, cuda_graph=False), eos_token_id=2,
                    pad_token_id=0, group_size=group, generator=torch.Generator().manual_seed(1))


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- the function itself


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_matches_full_logits_with_entropy_and_gradients(temperature):
    torch.manual_seed(0)
    N, H, V = 45, 16, 700
    h = torch.randn(N, H, requires_grad=True)
    w = (0.3 * torch.randn(V, H)).requires_grad_()          # logits of a few units, as a trained head gives
    b = (0.3 * torch.randn(V)).requires_grad_()
    ids = torch.randint(0, V, (N,))
    coef_lp, coef_h = torch.randn(N), torch.randn(N)

    def run(chunk):
        for t in (h, w, b):
            t.grad = None
        if chunk is None:                                       # the reference: full (N, V) logits
            z = torch.nn.functional.linear(h, w, b)
            lp, ent = token_logprobs(z, ids, temperature), token_entropy(z, temperature)
        else:
            lp, ent = chunked_token_logprobs(h, w, ids, chunk, bias=b, temperature=temperature, with_entropy=True)
        ((lp * coef_lp).sum() + (ent * coef_h).sum()).backward()
        return lp.detach(), ent.detach(), [t.grad.clone() for t in (h, w, b)]

    ref = run(None)
    for chunk in (1, 7, 45, 64, "auto"):                        # many chunks, one uneven, one chunk, auto
        got = run(chunk)
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
        for g, r in zip(got[2], ref[2]):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    # only the log-probs (no entropy requested): same log-probs and gradients
    for t in (h, w, b):
        t.grad = None
    lp, ent = chunked_token_logprobs(h, w, ids, 7, bias=b, temperature=temperature)
    assert ent is None
    (lp * coef_lp).sum().backward()
    got = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    (token_logprobs(torch.nn.functional.linear(h, w, b), ids, temperature) * coef_lp).sum().backward()
    for g, t in zip(got, (h, w, b)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def test_chunked_head_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    h = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (9,))
    fn = lambda h, w, b: chunked_token_logprobs(h, w, ids, 4, bias=b, temperature=0.8, with_entropy=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_chunked_head_under_bf16_autocast_is_close_to_the_full_logits():
    torch.manual_seed(0)
    h, w = torch.randn(40, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    ids = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = token_logprobs(torch.nn.functional.linear(h, w), ids)
        ref.sum().backward()
        g_ref = w.grad.clone()
        w.grad = None
        got, _ = chunked_token_logprobs(h, w, ids, 8)
        got.sum().backward()
    assert got.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(w.grad, g_ref, atol=2e-2, rtol=5e-2)


# --------------------------------------------------------------------------- the policy's head


def test_output_head_is_found_only_where_the_logits_are_the_head_of_the_hidden_states(tok, quillan):
    llama = _llama(vocab=50)
    assert policy_api.output_head(llama) is llama.lm_head
    assert head_chunk_size(llama, "auto") == max(64, 256 * 2**20 // (4 * 50)) and head_chunk_size(llama, 0) is None
    assert policy_api.output_head(quillan) is None and head_chunk_size(quillan, "auto") is None   # persona mixture
    capped = _llama(vocab=50)
    capped.config.final_logit_softcapping = 30.0
    assert policy_api.output_head(capped) is None                 # logits are not head(h)
    from ccrl.config.schema import PeftConfig
    from ccrl.pipeline import apply_peft

    lora_head = apply_peft(_llama(vocab=50), PeftConfig(r=2, alpha=4, target_modules=["lm_head", "q_proj"]))
    assert policy_api.output_head(lora_head) is None              # the adapter would be left out
    lora = apply_peft(_llama(vocab=50), PeftConfig(r=2, alpha=4))
    assert policy_api.output_head(lora) is lora.get_base_model().lm_head


@pytest.mark.parametrize("chunk", [7, 10_000, "auto"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_scoring_with_the_chunked_head_equals_the_full_logits(chunk, temperature):
    """``completion_logprobs``, what the training passes and the reference scoring call: the head
    skipped in the forward and applied in chunks gives the log-probs and every parameter's gradient
    of the model's own logits, on a tiny Llama with a 5,000-token vocabulary (float32, CPU)."""
    model = _llama().train()
    ro = _rollout(model.eval())
    model.train()
    n = ro.completion_ids.shape[0]
    mask = ro.completion_mask.float()
    weight = torch.linspace(-1, 1, n)[:, None]
    size = head_chunk_size(model, chunk)
    results = []
    for head in (None, model.lm_head):
        model.zero_grad()
        lp, out = completion_logprobs(model, ro, slice(0, n), temperature, head=head, chunk=size)
        if head is not None:
            assert out.logits.shape[1] == 0                                 # the model computed no logits
        (lp * mask * weight).sum().backward()
        results.append((lp.detach(), _grads(model)))
    (lp_full, g_full), (lp_chunk, g_chunk) = results
    torch.testing.assert_close(lp_chunk, lp_full, atol=1e-5, rtol=1e-5)
    assert g_full.keys() == g_chunk.keys() and "lm_head.weight" in g_full
    for name in g_full:
        torch.testing.assert_close(g_chunk[name], g_full[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk", [13, "auto"])
def test_tiny_llama_with_5000_tokens_chunked_logprobs_entropy_and_gradients_equal_the_full_logits(chunk):
    """A tiny Llama, vocabulary 5,000, float32 on CPU: log-probs and entropies of its next tokens from
    the hidden states with the head applied in chunks equal those of its full logits, and so do the
    gradients of every parameter (to 1e-5)."""
    model = _llama().train()
    ids = torch.randint(3, VOCAB, (4, 30), generator=torch.Generator().manual_seed(2))
    a, b = torch.randn(4, 29), torch.randn(4, 29)
    model.zero_grad()
    z = model(input_ids=ids).logits[:, :-1]                                    # (4, 29, V)
    lp_f, ent_f = token_logprobs(z, ids[:, 1:]), token_entropy(z)
    ((lp_f * a).sum() + (ent_f * b).sum()).backward()
    g_full = _grads(model)
    model.zero_grad()
    with policy_api.head_inputs(model.lm_head) as caught:
        out = model(input_ids=ids)
    assert out.logits.shape[1] == 0
    lp_c, ent_c = chunked_token_logprobs(caught["hidden"][:, :-1], model.lm_head.weight, ids[:, 1:], chunk,
                                         with_entropy=True)
    ((lp_c * a).sum() + (ent_c * b).sum()).backward()
    torch.testing.assert_close(lp_c, lp_f.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_c, ent_f.detach(), atol=1e-5, rtol=1e-5)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, g_full[name], atol=1e-5, rtol=1e-5, msg=name)


def test_prompt_prefix_with_the_chunked_head_equals_the_full_forward():
    """The opt-in shared prompt prefix takes the same chunked head: log-probs and gradients of a forward
    over every row with full logits."""
    from ccrl.trainers.rl import PromptPrefix

    model = _llama()
    ro = _rollout(model.eval(), rows=8, group=4)
    model.train()
    n = ro.completion_ids.shape[0]
    mask = ro.completion_mask.float()
    weight = torch.linspace(-1, 1, n)[:, None]
    model.zero_grad()
    lp, _ = completion_logprobs(model, ro, slice(0, n), 1.0)
    (lp * mask * weight).sum().backward()
    lp_full, g_full = lp.detach(), _grads(model)
    model.zero_grad()
    prefix = PromptPrefix(model, ro, model.lm_head, 5)
    lps = []
    for i in range(0, n, 3):
        rows = slice(i, min(i + 3, n))
        lp, _ = prefix.logprobs(model, ro, rows, 1.0)
        (lp * mask[rows] * weight[rows]).sum().backward()
        lps.append(lp.detach())
    prefix.backward()
    torch.testing.assert_close(torch.cat(lps)[mask.bool()], lp_full[mask.bool()], atol=1e-5, rtol=1e-5)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, g_full[name], atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------- memory


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_scoring_creates_no_tensor_of_the_full_logits_size():
    """Forward and backward of the training scoring with the chunked head: no operation returns a
    tensor as large as rows × T × V (float32 or otherwise); the full-logits path does (the check sees it)."""
    model = _llama().train()
    ro = _rollout(model.eval(), new=40)
    model.train()
    n, T = ro.completion_ids.shape
    assert T == 40                                              # no row stopped early
    full = n * T * VOCAB                                        # 800,000 > V·H = 160,000 (the weights)
    sizes = {}
    for name, head, chunk in (("full", None, None), ("chunked", model.lm_head, 16)):
        model.zero_grad()
        with _LargestTensor() as seen:
            lp, _ = completion_logprobs(model, ro, slice(0, n), 1.0, head=head, chunk=chunk)
            (lp * ro.completion_mask).sum().backward()
        sizes[name] = seen.largest
    assert sizes["full"] >= full
    assert sizes["chunked"] < full and sizes["chunked"] <= VOCAB * TINY_LLAMA["hidden_size"], sizes


@pytest.mark.gpu
def test_chunked_scoring_peak_cuda_memory_is_below_the_full_logits():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _llama(vocab=32_000).cuda().train()
    ro = _rollout(model.eval(), rows=8, new=256, group=4)
    model.train()
    n, T = ro.completion_ids.shape
    full_bytes = n * T * 32_000 * 4
    peaks = {}
    for name, head, chunk in (("full", None, None), ("chunked", model.lm_head, 128)):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        lp, _ = completion_logprobs(model, ro, slice(0, n), 1.0, head=head, chunk=chunk)
        (lp * ro.completion_mask).sum().backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - start
        del lp
    assert peaks["full"] >= full_bytes
    assert peaks["chunked"] < full_bytes / 4, peaks


# --------------------------------------------------------------------------- the RL stage


def _rl(tmp_path, name, model=None, top=None, **stage):
    st = {"kind": "rl", "objective": "grpo", "data": {"task": "arithmetic", "options": {"digits": 1},
                                                      "num_examples": 64, "heldout_size": 4},
          "steps": 2, "lr": 1e-3, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 6,
          "rewards": [{"name": "test_chunk_digit_share"}], "warmup_steps": 0, "lr_schedule": "constant"}
    st.update(stage)
    rec = {"name": name, "seed": 0, "output_dir": str(tmp_path / name),
           "model": model or {"hf_config": copy.deepcopy(TINY_LLAMA)}, "eval": {"max_new_tokens": 4},
           "stages": [st]}
    rec.update(top or {})
    return rec


def _params(run_dir):
    from ccrl.models import load_policy

    m, _ = load_policy(run_dir / "rl")
    return {k: v.float().clone() for k, v in m.state_dict().items()}


def test_rl_stage_with_chunked_head_matches_the_full_logits_and_micro_batches_every_scoring_forward(tmp_path):
    """An RL stage with a small chunk gives the update of ``logprob_chunk_size: 0`` (full logits), with
    the KL reference scored the same way; every forward that scores completions (training passes and
    the reference, ``use_cache=False``) holds at most ``micro_batch_size`` rows."""
    from ccrl.pipeline import run_recipe

    seen = {}

    def grab(trainer, step, metrics):
        seen.setdefault(trainer.stage.name, trainer.head_chunk)
        if "hook" not in seen:
            def rows(module, args, kwargs):
                if kwargs.get("use_cache") is False:
                    seen.setdefault("rows", []).append(kwargs["input_ids"].shape[0])
            seen["hook"] = trainer.unwrapped.register_forward_pre_hook(rows, with_kwargs=True)

    kl = {"kl_beta": 0.05, "micro_batch_size": 3}
    run_recipe(_rl(tmp_path, "full", logprob_chunk_size=0, **kl), callbacks=[grab], **QUIET)
    seen.pop("hook").remove()
    assert seen.pop("rl") is None
    run_recipe(_rl(tmp_path, "chunked", logprob_chunk_size=5, **kl), callbacks=[grab], **QUIET)
    assert seen.pop("rl") == 5
    assert seen["rows"] and max(seen["rows"]) <= 3          # step 2's passes and its reference, by 3 rows
    a, b = _params(tmp_path / "full"), _params(tmp_path / "chunked")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    la = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "chunked" / "metrics.jsonl").read_text().splitlines()]
    assert abs(la[-1]["kl"] - lb[-1]["kl"]) < 1e-5 and abs(la[-1]["loss"] - lb[-1]["loss"]) < 1e-5


# --------------------------------------------------------------------------- bf16 weights, float32 AdamW state


def test_master_weight_adamw_is_adamw_for_float32_and_keeps_float32_masters_for_bf16():
    from ccrl.trainers.optim import MasterWeightAdamW

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    low = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in a]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, foreach=True)
    ref, ours, mixed = torch.optim.AdamW(a, **kw), MasterWeightAdamW(b, **kw), MasterWeightAdamW(low, **kw)
    master = torch.optim.AdamW([torch.nn.Parameter(p.detach().float()) for p in low], **kw)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in a]
        for params, opt in ((a, ref), (b, ours)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        for p, m, g in zip(low, master.param_groups[0]["params"], grads):
            p.grad = g.to(torch.bfloat16)
            m.grad = p.grad.float()
        mixed.step()
        master.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)                            # the same arithmetic as torch's AdamW
        for p, m in zip(low, master.param_groups[0]["params"]):
            st = mixed.state[p]
            assert st["master"].dtype == st["exp_avg"].dtype == torch.float32 and p.dtype == torch.bfloat16
            assert torch.equal(st["master"], m.detach())           # float32 AdamW on the bf16 gradients
            assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
    # a reload keeps the float32 state (Optimizer.load_state_dict would cast it to bf16)
    again = MasterWeightAdamW([torch.nn.Parameter(p.detach().clone()) for p in low], **kw)
    again.load_state_dict(mixed.state_dict())
    for p, q in zip(low, again.param_groups[0]["params"]):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert again.state[q][key].dtype == torch.float32 and torch.equal(again.state[q][key], mixed.state[p][key])


def test_stage_adamw_is_fused_for_plain_tensors_and_equals_foreach():
    """The stages' AdamW runs fused when torch has the kernel for every parameter (plain float
    tensors on one device) and foreach otherwise; fused and foreach take the same steps up to 1 ulp."""
    from types import SimpleNamespace

    from ccrl.trainers.optim import build_optimizer, fused_applies

    torch.manual_seed(0)
    stage = SimpleNamespace(name="rl", lr=1e-3, weight_decay=0.1, adam_betas=[0.9, 0.95], adam_epsilon=1e-8,
                            optimizer_state_dtype=None)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (7, 300, 1025)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    fused = build_optimizer([{"params": params}], params, stage)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(twins, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    for step in range(20):
        for a, b in zip(params, twins):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step))
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for a, b, s in zip(params, twins, start):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert (a - s).abs().mean() > 1e-3                                     # the weights moved
    assert not fused_applies([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    assert not fused_applies([torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)])


def test_cast_parameters_keeps_ties_and_float32_buffers():
    from ccrl.models import cast_parameters

    model = _llama(vocab=50, tie_word_embeddings=True)
    cast_parameters(model, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("state", [None, "float32"])
def test_rl_stage_with_bf16_weights_trains_and_resumes_exactly(tmp_path, state):
    """``model.dtype: bfloat16``: the stage trains bf16 parameters; with ``optimizer_state_dtype:
    float32`` AdamW keeps float32 masters and moments, saved with the checkpoint: 1 + resume + 1 steps
    give the weights of 2 straight."""
    from ccrl.pipeline import run_recipe
    from ccrl.trainers.base import StageInterrupted

    seen = {}

    def grab(trainer, step, metrics):
        opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        seen["opt"] = type(opt).__name__
        seen["dtypes"] = {p.dtype for p in trainer.unwrapped.parameters()}
        seen["state"] = {v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"}

    model = {"hf_config": copy.deepcopy(TINY_LLAMA), "dtype": "bfloat16"}
    extra = {} if state is None else {"optimizer_state_dtype": state}
    run_recipe(_rl(tmp_path, "a", model=model, **extra), callbacks=[grab], **QUIET)
    assert seen["dtypes"] == {torch.bfloat16}
    assert seen["state"] == ({torch.float32} if state else {torch.bfloat16})
    assert seen["opt"] == ("MasterWeightAdamW" if state else "AdamW")

    def stop_after_one(trainer, step, metrics):
        if step == 1:
            trainer.request_stop()

    with pytest.raises(StageInterrupted):
        run_recipe(_rl(tmp_path, "b", model=model, save_every=1, **extra), callbacks=[stop_after_one], **QUIET)
    run_recipe(_rl(tmp_path, "b", model=model, save_every=1, **extra), resume=True, **QUIET)
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rollout_computes_logits_for_the_last_position_only():
    """Sampling needs the next token's distribution only: the prefill keeps the last position's logits
    (``logits_to_keep=1``), so the head sees one position per row in every forward of a rollout."""
    model = _llama().eval()
    widths = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: widths.append(tuple(args[0].shape[:-1])))
    try:
        for mode in (False, "static"):
            widths.clear()
            ro = _rollout(model) if mode is False else generate(
                model, [[5, 6, 7, 8, 9, 10], [11, 12, 13]], SamplingConfig(max_new_tokens=5, cuda_graph=mode),
                eos_token_id=2, pad_token_id=0, group_size=2, generator=torch.Generator().manual_seed(0))
            assert ro.prompt_ids.shape[1] > 1 and widths
            assert {w[1] for w in widths} == {1}, widths
    finally:
        handle.remove()


def test_chunked_head_runs_in_the_autocast_of_the_models_forward():
    """Mixed precision wraps the model's forward in autocast, not the trainer's code: the chunked head
    runs its matmuls in the dtype the skipped head would have used inside the forward."""
    model = _llama()
    ro = _rollout(model.eval())
    n = ro.completion_ids.shape[0]
    inner = model.forward
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(inner)        # as accelerate's mixed precision
    try:
        with torch.no_grad():
            full, _ = completion_logprobs(model, ro, slice(0, n), 1.0)           # the head's bf16 logits
            chunked, _ = completion_logprobs(model, ro, slice(0, n), 1.0, head=model.lm_head, chunk=7)
    finally:
        model.forward = inner
    with torch.no_grad():
        fp32, _ = completion_logprobs(model, ro, slice(0, n), 1.0, head=model.lm_head, chunk=7)
    mask = ro.completion_mask.bool()
    assert (chunked - full)[mask].abs().max() < 1e-4                          # the same bf16 head
    assert (fp32 - full)[mask].abs().max() > 1e-3                             # (a float32 head differs)


class _Casts(TorchDispatchMode):
    """The shapes of the low-precision tensors that operations return."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
                self.shapes.append(tuple(t.shape))
        return out


def test_scoring_under_autocast_never_casts_the_whole_output_head(monkeypatch):
    """Under bf16 autocast (as accelerate wraps the forward), training scoring with the chunked head
    casts the (V, H) output head in tiles only: neither the skipped head inside the forward (an
    ``nn.Linear`` on zero positions would cast the whole weight and keep the copy in the graph of the
    output the trainer holds) nor the chunked head's forward or backward makes a (V, H) bf16 copy.
    The log-probs and gradients are those of the same scoring with the head inside the forward."""
    import ccrl.objectives.logprobs as L

    model = _llama().train()
    ro = _rollout(model.eval(), new=20)
    model.train()
    n = ro.completion_ids.shape[0]
    monkeypatch.setattr(model, "forward", torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    V, H = model.lm_head.weight.shape
    model.zero_grad()
    full, _ = completion_logprobs(model, ro, slice(0, n), 1.0)
    (full * ro.completion_mask).sum().backward()
    g_full = _grads(model)
    model.zero_grad()
    monkeypatch.setattr(L, "TILE_BYTES", 40 * 1024 * 4)          # chunks of 40 tokens in tiles of 1024 rows
    with _Casts() as seen:
        lp, out = completion_logprobs(model, ro, slice(0, n), 1.0, head=model.lm_head, chunk=40)
        assert out.logits.shape[-2:] == (0, V)
        (lp * ro.completion_mask).sum().backward()
    assert (V, H) not in seen.shapes and (1024, H) in seen.shapes, sorted(set(seen.shapes))[-5:]
    mask = ro.completion_mask.bool()
    assert (lp.detach() - full.detach())[mask].abs().max() < 1e-4
    for name, g in _grads(model).items():                      # bf16 matmuls: relative error, as a whole
        assert (g - g_full[name]).norm() <= 2e-2 * g_full[name].norm(), name


def test_head_inputs_gives_the_head_its_own_forward_back():
    """After the block the head runs its own forward again (its logits, not zero positions), also
    after an error inside the block and when a library had set a forward on the instance."""
    model = _llama()
    head = model.lm_head
    h = torch.randn(2, 3, head.in_features)
    with policy_api.head_inputs(head) as caught:
        assert head(h).shape == (2, 0, head.out_features) and caught["hidden"] is h
    assert "forward" not in head.__dict__ and torch.equal(head(h), h @ head.weight.T)
    with pytest.raises(RuntimeError), policy_api.head_inputs(head):
        raise RuntimeError("inside")
    assert "forward" not in head.__dict__
    own = lambda x: x.sum(-1)  # noqa: E731 - as accelerate's hooks set an instance-level forward
    head.forward = own
    with policy_api.head_inputs(head):
        assert head(h).shape[-2] == 0
    assert head.forward is own
