"""Rollout throughput: ccrl's engine (``ccrl.rollout.generate``) against ``model.generate`` on CPU.

Both sides sample the same work: ``--prompts`` arithmetic prompts (left-padded) × G =
``--group`` completions each, temperature 1 with no top-k/top-p, up to ``--max-new-tokens``
tokens, stopping a row at EOS. The Hugging Face side does what TRL's ``GRPOTrainer`` does with
its default generation backend: every prompt repeated G times in one left-padded batch and
one ``model.generate(do_sample=True, ...)`` call (so the prompt prefill runs G times); its
completion tokens are counted up to and including the first EOS, as TRL's completion mask
does. ccrl counts its ``Rollout.lengths``. Throughput is completion tokens per second of wall
time.

Models (random init, fp32; the sampled lengths depend on the weights, not on the engine):
- ``llama``: the tiny ``LlamaForCausalLM`` of ``bench.common.TINY_LLAMA`` (hidden 256, 4 layers);
- ``quillan-toy`` and ``quillan-small``: the Quillan council policy presets (QAT ternary
  weights as trained; ``QuillanForCausalLM.generate`` quantises them once per call, and so does
  ccrl's engine).
All with the character tokenizer of ``ccrl.data.default_tokenizer()``.

Timing: per model, ``--warmup`` untimed calls of each side, then ``--repeats`` rounds in which
the two sides alternate (a busy shared machine slows both alike); medians of the rounds, and
the ratio ccrl / HF of the median throughputs (the target is >= 2).

Second table (``--packed-configs``): issue 5's packed rollouts. For the Quillan ``small`` preset
(in training mode between rollouts, as during RL) at the quickstart's size (16 prompts × 8 × 6
tokens) and larger: one rollout from the QAT model against a deep copy + ``pack_ternary`` + a
rollout from the packed snapshot (copy and packing timed), and the largest gap between the
rollout's log-probs and a full QAT forward at the sampled tokens, for both.

GPU (``--device cuda``, models ``llama-base`` and ``quillan-base`` as in ``bench/rl_step.py``,
``--dtype bf16`` for bf16 autocast as the RL trainer's mixed precision): one rollout per call of
HF generate (TRL's path, as above) and of the engine's three decoders
(``SamplingConfig.cuda_graph``): the eager loop (``false``), static decoding run eagerly
(``"static"``, the graph path's eager twin) and the CUDA graph (``true``; the capture is inside
the timed call). Seconds per call (each call ends with ``torch.cuda.synchronize``), completion
tokens per second, and the speed-up over HF generate; the sides alternate round by round.

Run:  python bench/rollout.py [--models llama,quillan-toy,quillan-small --repeats 5 --threads 1
                               --packed-configs 16x8x6,16x8x16,32x8x32]
GPU:  python bench/rollout.py --device cuda --dtype bf16 --models llama-base,quillan-base --prompts 16
                              --group 8 --max-new-tokens 64 --repeats 3 --packed-configs ''
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    LLAMA_BASE,
    TINY_LLAMA,
    environment_lines,
    hf_model,
    median,
    quillan,
    table,
    tiny_llama,
)

MODELS = ("llama", "quillan-toy", "quillan-small")
GPU_MODELS = ("llama-base", "quillan-base")


def build(name: str, tok):
    if name == "llama":
        return tiny_llama(tok)
    if name == "llama-base":
        return hf_model(LLAMA_BASE, tok)
    if name.startswith("quillan-"):
        return quillan(name.split("-", 1)[1], tok)
    raise SystemExit(f"--models: unknown model {name!r}; known: {', '.join(MODELS)}")


def hf_side(model, prompts: list[list[int]], args, tok):
    """TRL's HF-generate path: prompts repeated G times, one sampling ``generate`` call."""
    from ccrl.rollout import left_pad

    rep = [p for p in prompts for _ in range(args.group)]
    ids, mask = left_pad(rep, tok.pad_token_id)
    eos = tok.eos_token_id

    def run() -> int:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        comp = out[:, ids.shape[1]:]                                            # (N, T)
        is_eos = comp == eos
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(comp[:, 0], comp.shape[1] - 1))
        return int((first + 1).sum())                                           # tokens up to and incl. EOS

    return run


def ccrl_side(model, prompts: list[list[int]], args, tok):
    from ccrl.rollout import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    gen = torch.Generator().manual_seed(args.seed)

    def run() -> int:
        ro = generate(model, prompts, sampling, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      group_size=args.group, generator=gen)
        return int(ro.lengths.sum())

    return run


def packed_side(model, prompts: list[list[int]], args, tok):
    """ccrl's engine on a freshly packed snapshot of the weights, the copy and the packing timed too
    (what ``RLTrainer`` does with ``packed_rollout``)."""
    from ccrl.rollout import SamplingConfig, generate
    from ccrl.trainers.rl import packed_snapshot

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    gen = torch.Generator().manual_seed(args.seed)

    def run() -> int:
        ro = generate(packed_snapshot(model), prompts, sampling, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, group_size=args.group, generator=gen)
        return int(ro.lengths.sum())

    return run


def measure(name: str, args, tok, prompts) -> list:
    model = build(name, tok).eval()
    sides = {"HF generate": hf_side(model, prompts, args, tok), "ccrl": ccrl_side(model, prompts, args, tok)}
    if name.startswith("quillan-"):
        sides["ccrl packed"] = packed_side(model, prompts, args, tok)
    torch.manual_seed(args.seed)
    for _ in range(args.warmup):
        for run in sides.values():
            run()
    tps = {k: [] for k in sides}
    toks = {k: [] for k in sides}
    for _ in range(args.repeats):
        for k, run in sides.items():
            t0 = time.perf_counter()
            n = run()
            tps[k].append(n / (time.perf_counter() - t0))
            toks[k].append(n)
    hf, cc = median(tps["HF generate"]), median(tps["ccrl"])
    row = [name, median(toks["HF generate"]), hf, median(toks["ccrl"]), cc, cc / hf]
    if "ccrl packed" in tps:
        cp = median(tps["ccrl packed"])
        return row + [cp, cp / hf]
    return row + ["", ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side before timing")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packed-configs", default="16x8x6,16x8x16,32x8x32",
                   help="Quillan small packed-vs-QAT sweep, PROMPTSxGxTOKENS comma-separated ('' to skip)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: HF generate vs the engine's eager loop, static decoding and CUDA graph on one GPU")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: bf16 autocast (GPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from ccrl.data import default_tokenizer, get_task

    tok = default_tokenizer()
    examples = get_task("arithmetic").examples("train", args.prompts, seed=args.seed)
    prompts = [tok.encode(e.prompt, add_special_tokens=False) for e in examples]
    if args.device == "cuda":
        return gpu_decoders(args, tok, prompts)
    print("# Rollout throughput: ccrl.rollout.generate vs model.generate (CPU)")
    for line in environment_lines(args.threads):
        print(line)
    print(f"settings: {args.prompts} arithmetic prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens) "
          f"x G={args.group}, max_new_tokens={args.max_new_tokens}, temperature 1.0, top_k 0, top_p 1.0, EOS stops a "
          f"row; HF side: prompts repeated G times in one batch (TRL's way); {args.warmup} warm-up + {args.repeats} "
          f"timed alternating rounds; llama = {TINY_LLAMA}; seed {args.seed}")
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows.append(measure(name, args, tok, prompts))
        print(f"  {name}: ccrl / HF = {rows[-1][5]:.2f}", flush=True)
    print()
    print(table(["model", "HF tokens/call", "HF tokens/s", "ccrl tokens/call", "ccrl tokens/s", "ccrl / HF",
                 "ccrl packed tokens/s", "packed / HF"], rows))
    print("\nccrl packed: the engine on a packed ternary snapshot of the weights (deep copy + pack_ternary "
          "inside the timed call), as RLTrainer's packed_rollout does; HF generate runs the QAT model.")
    if args.packed_configs:
        packed_sweep(args, tok)
    return 0


def packed_sweep(args, tok) -> None:
    """Quillan ``small``: a rollout from the QAT model against one from a freshly packed snapshot
    (deep copy + ``pack_ternary`` timed with it) at several sizes, and the log-prob gap."""
    import copy

    from ccrl.data import get_task
    from ccrl.rollout import SamplingConfig, generate

    model = build("quillan-small", tok).train()          # as during RL: training mode between rollouts
    rows = []
    for spec in args.packed_configs.split(","):
        n_prompts, group, new = (int(x) for x in spec.lower().split("x"))
        exs = get_task("arithmetic", digits=2, ops="+").examples("train", n_prompts, seed=args.seed)
        prompts = [tok.encode(e.prompt, add_special_tokens=False) for e in exs]
        sampling = SamplingConfig(max_new_tokens=new, temperature=1.0)

        def sample(policy, prompts=prompts, sampling=sampling, group=group):
            return generate(policy, prompts, sampling, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            group_size=group, generator=torch.Generator().manual_seed(args.seed))

        def packed(sample=sample):
            t0 = time.perf_counter()
            snap = copy.deepcopy(model).eval().requires_grad_(False)
            t1 = time.perf_counter()
            snap.pack_ternary()
            t2 = time.perf_counter()
            return sample(snap), t1 - t0, t2 - t1

        sample(model), packed()
        t_q, t_p, t_copy, t_pack = [], [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ro_q = sample(model)
            t_q.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ro_p, c, k = packed()
            t_p.append(time.perf_counter() - t0)
            t_copy.append(c)
            t_pack.append(k)
        gap = _logprob_gap(model, ro_p)
        gap_qat = _logprob_gap(model, ro_q)
        rows.append([spec, median(t_q), median(t_p), median(t_copy), median(t_pack), median(t_p) / median(t_q),
                     "packed" if median(t_p) < median(t_q) else "QAT", f"{gap:.1e}", f"{gap_qat:.1e}"])
        print(f"  packed sweep {spec}: packed / QAT = {rows[-1][5]:.2f}", flush=True)
    print()
    print("## Packed ternary rollouts, Quillan small (prompts x G x max_new_tokens; 2-digit addition prompts)")
    print(table(["config", "QAT rollout s", "packed s (all)", "of which copy s", "of which pack s", "packed / QAT",
                 "auto keeps", "max abs dlogp, packed", "max abs dlogp, QAT"], rows))
    print("\nmax abs dlogp: the rollout's log-prob of each sampled token against a full forward of the QAT model "
          "(training mode off) at the same tokens: what the first PPO epoch's ratio sees; 'QAT' is the same "
          "for a rollout from the QAT model itself (cached decoding vs one full forward).")


def _logprob_gap(model, ro) -> float:
    was = model.training
    model.eval()
    mask = ro.attention_mask
    with torch.no_grad():
        out = model(input_ids=ro.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                    use_cache=False)
    model.train(was)
    T = ro.completion_ids.shape[1]
    lp = torch.log_softmax(out.logits[:, -(T + 1): -1].float(), -1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    return float(((lp - ro.logprobs).abs() * ro.completion_mask).max())



def gpu_decoders(args, tok, prompts) -> int:
    """``--device cuda``: seconds per rollout of HF generate and of the engine's three decoders."""
    from contextlib import nullcontext

    from ccrl.rollout import left_pad

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext
    print("# Rollout on a GPU: HF generate vs ccrl.rollout.generate's decoders")
    for line in environment_lines(args.threads, "cuda"):
        print(line)
    print(f"settings: {args.prompts} arithmetic prompts x G={args.group}, max_new_tokens={args.max_new_tokens}, "
          f"temperature 1.0, EOS stops a row, {args.dtype}{' autocast' if args.dtype == 'bf16' else ''}, random "
          f"init; {args.warmup} warm-up + {args.repeats} timed alternating rounds; seed {args.seed}")
    rep = [p for p in prompts for _ in range(args.group)]
    ids, mask = (t.cuda() for t in left_pad(rep, tok.pad_token_id))
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in GPU_MODELS:
            raise SystemExit(f"--models with --device cuda: one of {', '.join(GPU_MODELS)}, got {name!r}")
        rows += gpu_rows(build(name, tok).cuda().eval(), name, args, tok, prompts, ids, mask, autocast)
        torch.cuda.empty_cache()
    print()
    print(table(["model", "decoder", "median s/rollout", "min", "max", "completion tokens/call", "tokens/s",
                 "speed-up vs HF generate"], rows))
    print("\nOne call = one rollout of all prompts x G (the capture of the CUDA graph included). The decoders "
          "draw from the same generator seed; lengths differ between HF generate and the engine (other draws).")
    return 0


def gpu_rows(model, name: str, args, tok, prompts, ids, mask, autocast) -> list:
    """One model's table rows: HF generate on the repeated prompts ``ids``/``mask``, then the engine's decoders."""
    from ccrl.rollout import SamplingConfig, generate

    eos = tok.eos_token_id

    def hf() -> int:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
        comp = out[:, ids.shape[1]:]                                            # (N, T)
        is_eos = comp == eos
        last = torch.full_like(comp[:, 0], comp.shape[1] - 1)
        return int((torch.where(is_eos.any(1), is_eos.int().argmax(1), last) + 1).sum())   # up to and incl. EOS

    def engine(mode):
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, cuda_graph=mode)
        gen = torch.Generator(device="cuda").manual_seed(args.seed)
        return lambda: int(generate(model, prompts, sampling, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                    group_size=args.group, generator=gen).lengths.sum())

    sides = {"HF generate": hf, "eager loop": engine(False), "static, eager": engine("static"),
             "CUDA graph": engine(True)}
    secs, toks = {k: [] for k in sides}, {k: [] for k in sides}
    for r in range(args.warmup + args.repeats):
        for k, run in sides.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad(), autocast():
                n = run()
            torch.cuda.synchronize()
            if r >= args.warmup:
                secs[k].append(time.perf_counter() - t0)
                toks[k].append(n)
    print(f"  {name}: " + ", ".join(f"{k} {median(v):.3f} s" for k, v in secs.items()), flush=True)
    hf_s = median(secs["HF generate"])
    return [[name, k, median(secs[k]), min(secs[k]), max(secs[k]), median(toks[k]), sum(toks[k]) / sum(secs[k]),
             f"{hf_s / median(secs[k]):.2f}x"] for k in sides]


if __name__ == "__main__":
    sys.exit(main())
