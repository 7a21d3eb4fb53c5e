"""One GRPO step of ccrl against TRL's ``GRPOTrainer`` on the same tiny Llama, on CPU.

Both sides get the same work per optimizer step: ``--prompts`` prompts of the arithmetic task ×
``--group`` completions sampled at temperature 1 (no top-k/top-p) up to ``--max-new-tokens``
tokens, the same reward function (``rewards.exact_match`` — one function object, called with
the TRL signature by both), group-normalised advantages, the clipped surrogate (ε = 0.2, one
PPO epoch, so π_old is the sampling policy and neither side runs a second "old" forward), no KL
term (β = 0: no reference model), AdamW at the same constant learning rate with grad-norm
clipping at 1.0. The model is the same randomly initialised ``LlamaForCausalLM`` (hidden 256,
4 layers, ``bench.common.TINY_LLAMA``; fp32) with the character tokenizer of
``ccrl.data.default_tokenizer()``.

- ccrl: ``ccrl.pipeline.run_recipe`` with a one-stage ``rl`` recipe (objective ``grpo``,
  ``model: {hf_config: ...}``); its rollout engine samples.
- TRL 1.16: ``GRPOTrainer`` with ``use_vllm=False`` (``model.generate``), ``loss_type="grpo"``,
  ``bf16=False``, ``gradient_checkpointing=False``, ``report_to="none"``, offline (a model
  object, a ``PreTrainedTokenizerFast`` and a ``datasets.Dataset`` with a "prompt" column).

A step's time is the wall time between the ends of two consecutive optimizer steps, so it
includes everything each trainer's loop does per step (sampling, scoring, the update, logging).
The sides run in alternating rounds (TRL, ccrl, TRL, ccrl, …: a busy shared machine slows both
alike); each round's first ``--warmup`` steps are left out; the table gives medians over all
timed steps and the ratio ccrl / TRL (the target is ≤ 0.5).

Run:  python bench/rl_step.py [--steps 5 --rounds 2 --max-new-tokens 16 --threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench.common import TINY_LLAMA, environment_lines, median, table, tiny_llama  # noqa: E402


def run_ccrl(args, workdir: Path) -> tuple[list[float], dict]:
    """Step times of one ccrl run of ``warmup + steps`` steps (warm-up excluded) and its last metrics."""
    from ccrl.pipeline import run_recipe

    stamps, last = [], {}

    def record(trainer, step, metrics):
        stamps.append(time.perf_counter())
        last.update(metrics)

    recipe = {
        "name": "bench-rl-step", "seed": args.seed, "output_dir": str(workdir / "ccrl"), "threads": args.threads,
        "model": {"hf_config": dict(TINY_LLAMA)},
        "eval": {"max_new_tokens": args.max_new_tokens, "batch_size": 64},
        "stages": [{
            "kind": "rl", "objective": "grpo",
            "data": {"task": "arithmetic", "num_examples": 1024, "heldout_size": 8},
            "steps": args.warmup + args.steps, "lr": args.lr, "warmup_steps": 0, "lr_schedule": "constant",
            "prompts_per_step": args.prompts, "group_size": args.group, "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0, "kl_beta": 0.0, "max_grad_norm": 1.0,
            "rewards": [{"name": "exact_match"}],
        }],
    }
    t0 = time.perf_counter()
    run_recipe(recipe, callbacks=[record], show_progress=False, log=lambda *_: None)
    del t0
    # the first stamp closes step 1; differences of later stamps are whole steps
    times = [b - a for a, b in zip(stamps, stamps[1:])][max(0, args.warmup - 1):]
    return times, last


def run_trl(args, workdir: Path) -> tuple[list[float], dict]:
    """Step times of one TRL GRPOTrainer run of ``warmup + steps`` steps (warm-up excluded)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import rewards
    from ccrl.data import default_tokenizer, get_task

    tok = default_tokenizer()
    model = tiny_llama(tok, seed=args.seed)
    examples = get_task("arithmetic").examples("train", 1024, seed=args.seed)
    data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in examples])

    stamps: list[float] = []
    last: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps.clear()

        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            last.update(logs or {})

    n = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(workdir / "trl"), report_to="none", use_vllm=False, bf16=False, use_cpu=True,
        gradient_checkpointing=False, per_device_train_batch_size=n, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
        top_k=0, top_p=1.0, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group", num_iterations=1,
        max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no", seed=args.seed,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[rewards.get("exact_match")], args=config,
                          train_dataset=data, processing_class=tok, callbacks=[Clock()])
    torch.set_num_threads(args.threads)
    trainer.train()
    times = [b - a for a, b in zip(stamps, stamps[1:])][max(0, args.warmup - 1):]
    return times, last


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (TRL then ccrl)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step's start is not observable the same way on both sides)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    print("# RL step: ccrl GRPO vs TRL GRPOTrainer (CPU)")
    for line in environment_lines(args.threads):
        print(line)
    print(f"settings: tiny Llama {TINY_LLAMA} (fp32, random init), char tokenizer, arithmetic prompts, "
          f"{args.prompts} prompts x G={args.group}, max_new_tokens={args.max_new_tokens}, temperature 1.0, "
          f"reward exact_match, lr {args.lr}, beta 0, one PPO epoch, {args.rounds} rounds x "
          f"({args.warmup} warm-up + {args.steps} timed steps) per side, seed {args.seed}")
    trl_t, ccrl_t = [], []
    info = {}
    with tempfile.TemporaryDirectory(prefix="bench_rl_step_") as tmp:
        for r in range(args.rounds):
            t, info["trl"] = run_trl(args, Path(tmp) / f"r{r}")
            trl_t += t
            c, info["ccrl"] = run_ccrl(args, Path(tmp) / f"r{r}")
            ccrl_t += c
            print(f"round {r + 1}: TRL median {median(t):.3f} s/step, ccrl median {median(c):.3f} s/step")
    n = args.prompts * args.group
    tm, cm = median(trl_t), median(ccrl_t)
    tok_trl = info["trl"].get("num_tokens")
    ccrl_tokens = info["ccrl"].get("completion_tokens", float("nan")) * n
    trl_tokens = info["trl"].get("completions/mean_length", float("nan")) * n
    del tok_trl
    print()
    print(table(["side", "median s/step", "min", "max", "steps timed", "completion tokens/step (last)"], [
        ["TRL 1.16 GRPOTrainer", tm, min(trl_t), max(trl_t), len(trl_t), trl_tokens],
        ["ccrl RLTrainer (grpo)", cm, min(ccrl_t), max(ccrl_t), len(ccrl_t), ccrl_tokens],
    ]))
    print(f"\nratio ccrl / TRL step time: {cm / tm:.3f}  (target <= 0.5; TRL / ccrl = {tm / cm:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
