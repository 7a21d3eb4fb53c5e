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

Run:  python bench/rollout.py [--models llama,quillan-toy,quillan-small --repeats 5 --threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench.common import TINY_LLAMA, environment_lines, median, quillan, table, tiny_llama  # noqa: E402

MODELS = ("llama", "quillan-toy", "quillan-small")


def build(name: str, tok):
    if name == "llama":
        return tiny_llama(tok)
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


def measure(name: str, args, tok, prompts) -> list:
    model = build(name, tok).eval()
    sides = {"HF generate": hf_side(model, prompts, args, tok), "ccrl": ccrl_side(model, prompts, args, tok)}
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
    return [name, median(toks["HF generate"]), hf, median(toks["ccrl"]), cc, cc / hf]


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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from ccrl.data import default_tokenizer, get_task

    tok = default_tokenizer()
    examples = get_task("arithmetic").examples("train", args.prompts, seed=args.seed)
    prompts = [tok.encode(e.prompt, add_special_tokens=False) for e in examples]
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
        print(f"  {name}: ccrl / HF = {rows[-1][-1]:.2f}", flush=True)
    print()
    print(table(["model", "HF tokens/call", "HF tokens/s", "ccrl tokens/call", "ccrl tokens/s", "ccrl / HF"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
