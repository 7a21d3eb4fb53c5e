"""Forward+backward throughput of the Quillan council policy against a dense Llama of equal active size.

What it measures: tokens per second of one training step without the optimizer (forward with
labels, backward, zero_grad) on CPU, for the Quillan ``small`` preset (ternary QAT, as
trained) and, in the same run, a dense ``LlamaForCausalLM`` whose parameter count equals
Quillan's *active* parameters per token (same width, depth, heads and vocabulary; the MLP
width is solved for). Each model gets ``--warmup`` steps, then the median of ``--steps`` timed
steps, the models' steps interleaved round by round. The cost per active parameter is
seconds / token / active parameter (printed as µs per token per million active parameters);
the ratio MoE / dense of that cost is the number to watch (target ≤ 2).

Run:  python bench/model_throughput.py [--batch 8 --seq 128 --steps 7 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# Run as a script, sys.path[0] is bench/, where bench/kernels.py would shadow the Hugging Face
# ``kernels`` package that transformers probes for; put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from policies import QuillanConfig, QuillanForCausalLM, count_parameters  # noqa: E402


def dense_peer(cfg: QuillanConfig, active: int) -> LlamaForCausalLM:
    """A Llama with cfg's width/depth/heads/vocab whose total parameter count is closest to ``active``."""
    d, n = cfg.hidden_size, cfg.num_layers
    attn = d * cfg.num_attention_heads * cfg.head_dim * 2 + d * cfg.num_key_value_heads * cfg.head_dim * 2
    fixed = cfg.vocab_size * d + n * (attn + 2 * d) + d
    inter = max(1, round((active - fixed) / (3 * d * n)))
    llama = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=inter, num_hidden_layers=n,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
    )
    llama._attn_implementation = "sdpa"
    return LlamaForCausalLM(llama)


def train_step(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def time_interleaved(models: list, ids: torch.Tensor, warmup: int, steps: int) -> list[list[float]]:
    """Warm every model up, then time one step of each model in turn, ``steps`` rounds.

    Interleaving makes a busy shared machine slow every model alike instead of whichever
    happened to run during a burst of other work.
    """
    for model in models:
        model.train()
        for _ in range(warmup):
            train_step(model, ids)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(steps):
        for i, model in enumerate(models):
            times[i].append(train_step(model, ids))
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.steps < 5:
        ap.error("--steps must be >= 5 (medians of at least 5 steps)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    variants = {
        f"quillan-{args.preset} (ternary QAT)": QuillanConfig.preset(args.preset),
        f"quillan-{args.preset} (fp)": QuillanConfig.preset(
            args.preset, attention_precision="fp", expert_precision="fp", micro_precision="fp",
            micro_query_precision="fp", persona_head_precision="fp"),
    }
    base_cfg = next(iter(variants.values()))
    ids = torch.randint(3, base_cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    active = count_parameters(base_cfg)["active"]
    rows = []
    dense = dense_peer(base_cfg, active)
    dense_params = sum(p.numel() for p in dense.parameters())
    models = [(name, QuillanForCausalLM(cfg), count_parameters(cfg)) for name, cfg in variants.items()]
    models.append((f"dense llama (I={dense.config.intermediate_size})", dense,
                   {"total": dense_params, "active": dense_params}))
    all_times = time_interleaved([m for _, m, _ in models], ids, args.warmup, args.steps)
    for (name, _, counts), times in zip(models, all_times):
        med = statistics.median(times)
        rows.append({"model": name, "total": counts["total"], "active": counts["active"], "s_per_step": med,
                     "tokens_per_s": tokens / med, "us_per_token_mparam": med / tokens / counts["active"] * 1e12})

    ref = rows[-1]
    print(f"forward+backward, CPU, {args.threads} thread(s), batch {args.batch} x seq {args.seq} = {tokens} tokens/step, "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up; torch {torch.__version__}")
    head = (f"{'model':<34} {'total':>11} {'active':>10} {'s/step':>8} {'tokens/s':>9} {'us/tok/Mparam':>14} "
            f"{'tok/s vs dense':>15} {'cost/active vs dense':>21}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<34} {r['total']:>11,} {r['active']:>10,} {r['s_per_step']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['us_per_token_mparam']:>14.1f} {r['tokens_per_s'] / ref['tokens_per_s']:>15.2f} "
              f"{r['us_per_token_mparam'] / ref['us_per_token_mparam']:>21.2f}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
