"""One GRPO step of ccrl against TRL's ``GRPOTrainer`` on the same tiny Llama, on CPU.

Both sides get the same work per optimizer step: ``--prompts`` prompts of the arithmetic task ×
``--group`` completions sampled at temperature 1 (no top-k/top-p) up to ``--max-new-tokens``
tokens, the same reward function (one function object, called with the TRL signature by both;
see ``--rewards``), group-normalised advantages, the clipped surrogate (ε = 0.2, one
PPO epoch, so π_old is the sampling policy and neither side runs a second "old" forward), no KL
term (β = 0: no reference model), AdamW at the same constant learning rate with grad-norm
clipping at 1.0. The model is the same randomly initialised ``LlamaForCausalLM`` (hidden 256,
4 layers, ``bench.common.TINY_LLAMA``; fp32) with the character tokenizer of
``ccrl.data.default_tokenizer()``.

- ccrl: ``ccrl.pipeline.run_recipe`` with a one-stage ``rl`` recipe (objective ``grpo``,
  ``model: {hf_config: ...}``); its rollout engine samples. A third side, ``ccrl+prefix``, is
  the same with ``RLTrainer.share_prompt_prefix = True`` (off by default; each distinct prompt
  runs once per step in the training forward, see ``ccrl.trainers.rl.PromptPrefix``).
- TRL 1.16: ``GRPOTrainer`` with ``use_vllm=False`` (``model.generate``), ``loss_type="grpo"``,
  ``bf16=False``, ``gradient_checkpointing=False``, ``report_to="none"``, offline (a model
  object, a ``PreTrainedTokenizerFast`` and a ``datasets.Dataset`` with a "prompt" column).

Rewards (``--rewards``, each measured separately): ``digit_share`` (``bench.common``; the share
of digits in a completion) is dense, so almost every group has reward variance and both sides
do the same forward and backward; ``exact_match`` (``rewards.exact_match``) scores every
completion of an untrained model 0, so every advantage is 0: TRL still runs the forward and
backward (zero gradient), ccrl skips the rows whose loss is exactly 0
(``RLTrainer.gradient_rows``). The table says how many rows went through forward/backward.

The trainers run side by side in one process, each in its own thread, and take turns step by
step (TRL's step 1, ccrl's step 1, ccrl+prefix's step 1, TRL's step 2, …; only one side runs at
any time), so a busy shared machine slows all alike. A step's time is the wall time of one whole iteration of
that side's training loop (sampling, scoring, the update, its logging). The first ``--warmup``
steps of each side are left out; the table gives medians of the timed steps and the ratio
ccrl / TRL (the target is ≤ 0.5).

Run:  python bench/rl_step.py [--steps 7 --warmup 2 --max-new-tokens 16 --threads 1
                             --rewards digit_share,exact_match --sides trl,ccrl,ccrl+prefix]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench.common import TINY_LLAMA, environment_lines, median, table, tiny_llama  # noqa: E402

REWARDS = {"exact_match": "exact_match", "digit_share": "bench.common:digit_share"}
"""reward name → how a ccrl recipe names it (TRL gets the same function object)"""


def reward_fn(name: str):
    import rewards

    return rewards.resolve(REWARDS[name])


class Baton:
    """Lets exactly one trainer run at a time, handing over to the next after every step.

    Each side's step time is the wall time from getting the baton to handing it over, i.e. one
    whole iteration of its own training loop, while the others sleep."""

    def __init__(self, order: list[str]):
        self.order = list(order)
        self.turn = self.order[0]
        self.cv = threading.Condition()
        self.times: dict[str, list[float]] = {k: [] for k in order}
        self.resumed: dict[str, float] = {}

    def take(self, who: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.turn == who)
        self.resumed[who] = time.perf_counter()

    def _pass(self, who: str) -> None:
        i = self.order.index(who)
        with self.cv:
            rest = self.order[i + 1:] + self.order[:i + 1]
            self.turn = next((k for k in rest if k in self.order), who)
            self.cv.notify_all()

    def hand_over(self, who: str) -> None:
        """End of one of ``who``'s steps: record it, let the next side run, wait for the turn."""
        self.times[who].append(time.perf_counter() - self.resumed[who])
        self._pass(who)
        self.take(who)

    def finish(self, who: str) -> None:
        """``who`` is done: take it out of the rotation."""
        with self.cv:
            i = self.order.index(who)
            self.order.remove(who)
            if self.turn == who and self.order:
                self.turn = self.order[i % len(self.order)]
            self.cv.notify_all()


def ccrl_recipe(args, workdir: Path, reward: str) -> dict:
    """The one-stage rl recipe of the ccrl side."""
    return {
        "name": "bench-rl-step", "seed": args.seed, "output_dir": str(workdir / "ccrl"), "threads": args.threads,
        "model": {"hf_config": dict(TINY_LLAMA)},
        "eval": {"max_new_tokens": args.max_new_tokens, "batch_size": 64},
        "stages": [{
            "kind": "rl", "objective": "grpo",
            "data": {"task": "arithmetic", "num_examples": 1024, "heldout_size": 8},
            "steps": args.warmup + args.steps, "lr": args.lr, "warmup_steps": 0, "lr_schedule": "constant",
            "prompts_per_step": args.prompts, "group_size": args.group, "max_new_tokens": args.max_new_tokens,
            "temperature": 1.0, "kl_beta": 0.0, "max_grad_norm": 1.0,
            "rewards": [{"name": REWARDS[reward]}],
        }],
    }


def trl_trainer(args, workdir: Path, reward: str, callback):
    """TRL's GRPOTrainer on the same model, data and reward, offline."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from ccrl.data import default_tokenizer, get_task

    tok = default_tokenizer()
    model = tiny_llama(tok, seed=args.seed)
    examples = get_task("arithmetic").examples("train", 1024, seed=args.seed)
    data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in examples])
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
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_fn(reward)], args=config,
                          train_dataset=data, processing_class=tok, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    return trainer


SIDES = {"trl": "TRL 1.16 GRPOTrainer", "ccrl": "ccrl RLTrainer (grpo)",
         "ccrl+prefix": "ccrl, share_prompt_prefix=True"}
"""the sides a run can time: TRL, ccrl as shipped, and ccrl with the opt-in shared prompt prefix"""


def run_sides(args, workdir: Path, reward: str, sides: list[str]) -> tuple[dict, dict]:
    """Every side, ``warmup + steps`` steps each, taking turns step by step, each in its own thread.

    TRL hands over in ``on_step_end`` (its logging of a step then falls in the next step's
    interval, the same amount every step); ccrl in its step callback. Returns the timed step
    times and the last metrics of each side."""
    from transformers import TrainerCallback

    from ccrl.pipeline import run_recipe
    from ccrl.trainers.rl import RLTrainer

    baton = Baton(sides)
    last: dict = {k: {} for k in sides}
    errors: list[BaseException] = []

    def trl_side():
        class HandOver(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                baton.hand_over("trl")

            def on_log(self, a, state, control, logs=None, **kw):
                last["trl"].update(logs or {})

        trl_trainer(args, workdir, reward, HandOver()).train()

    def ccrl_side(name: str, share: bool):
        def step_done(trainer, step, metrics):
            last[name].update(metrics)
            baton.hand_over(name)

        RLTrainer.share_prompt_prefix = share     # read by the trainer built during this turn
        run_recipe(ccrl_recipe(args, workdir / name, reward), callbacks=[step_done], show_progress=False,
                   log=lambda *_: None)

    def body(name: str):
        try:
            baton.take(name)
            if name == "trl":
                trl_side()
            else:
                ccrl_side(name, share=name == "ccrl+prefix")
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=body, args=(name,), daemon=True) for name in sides]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    RLTrainer.share_prompt_prefix = False
    if errors:
        raise errors[0]
    return {k: v[args.warmup:] for k, v in baton.times.items()}, last


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=7, help="timed steps per side and reward")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rewards", default="digit_share,exact_match", help=f"comma-separated, from {', '.join(REWARDS)}")
    p.add_argument("--sides", default="trl,ccrl,ccrl+prefix", help=f"comma-separated, from {', '.join(SIDES)}")
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
          f"rewards {args.rewards}, lr {args.lr}, beta 0, one PPO epoch, {args.warmup} warm-up + "
          f"{args.steps} timed steps per side, sides taking turns step by step, seed {args.seed}")
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if "trl" not in sides or any(x not in SIDES for x in sides):
        p.error(f"--sides: a comma-separated list from {', '.join(SIDES)} including trl")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_rl_step_") as tmp:
        for reward in [r.strip() for r in args.rewards.split(",") if r.strip()]:
            if reward not in REWARDS:
                p.error(f"--rewards: unknown reward {reward!r}; known: {', '.join(REWARDS)}")
            times, info = run_sides(args, Path(tmp) / reward, reward, sides)
            tm = median(times["trl"])
            print(f"  {reward}: " + ", ".join(f"{k} {median(v):.3f} s/step" for k, v in times.items()), flush=True)
            for k in sides:
                t = times[k]
                trained = "all" if k == "trl" else f"{info[k].get('rows_trained_frac', float('nan')):.2f}"
                rows.append([reward, SIDES[k], median(t), min(t), max(t), len(t),
                             info[k].get("frac_reward_zero_std", float("nan")), trained,
                             "" if k == "trl" else f"{median(t) / tm:.3f}"])
    print()
    print(table(["reward", "side", "median s/step", "min", "max", "steps timed", "zero-std groups (last step)",
                 "rows through fwd/bwd", "ccrl / TRL"], rows))
    print("\nccrl / TRL is the ratio of median step times (target <= 0.5). exact_match on an untrained model "
          "scores every completion 0, so every group has zero advantage: TRL still runs the forward and backward "
          "(with zero gradient), ccrl skips rows whose loss is exactly 0. digit_share gives almost every group "
          "reward variance, so every side runs the forward and backward.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
