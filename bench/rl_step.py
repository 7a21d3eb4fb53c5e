"""One GRPO step of ccrl against TRL's ``GRPOTrainer`` on the same model, on CPU or a GPU.

Both sides get the same work per optimizer step: ``--prompts`` prompts of the arithmetic task ×
``--group`` completions sampled at temperature 1 (no top-k/top-p) up to ``--max-new-tokens``
tokens, the same reward function (one function object, called with the TRL signature by both;
see ``--rewards``), group-normalised advantages, the clipped surrogate (ε = 0.2, one
PPO epoch, so π_old is the sampling policy and neither side runs a second "old" forward), no KL
term (β = 0: no reference model), AdamW at the same constant learning rate with grad-norm
clipping at 1.0. The model is the same randomly initialised ``LlamaForCausalLM`` (hidden 256,
4 layers, ``bench.common.TINY_LLAMA``; fp32; ``--model`` picks another) with the character
tokenizer of ``ccrl.data.default_tokenizer()``.

Model size and vocabulary are options (``bench.common.add_size_options``): ``--model`` picks a
preset (``tiny-llama``, ``llama-base``, ``llama-0.5b``, ``llama-1.5b``, ``llama`` = the tiny
Llama's sizes as a starting point, or a Quillan preset), and ``--hidden --layers --heads
--kv-heads --head-dim --intermediate --max-positions --tie-embeddings`` override any of the
Llama's sizes. ``--vocab N`` gives both sides a tokenizer of exactly N tokens
(``bench.common.padded_tokenizer``: the task's characters, then filler tokens), so both sample
over, and train the output head of, a real-size vocabulary; the model and that tokenizer are
saved once into a temporary folder and each side loads them from it (ccrl as ``model:
{checkpoint: ...}``, TRL with ``from_pretrained``). ``max_position_embeddings`` is raised to
``--max-new-tokens`` + 64 when smaller.

Memory at real size: ``--weights-dtype bfloat16`` gives both sides bf16 weights (ccrl
``model.dtype``; TRL gets the bf16 model, whose torch AdamW keeps bf16 state, as ccrl's does
unless ``--optimizer-state-dtype float32``: float32 master weights and state);
``--micro-batch-size M`` runs M completions per forward/backward on both sides (ccrl
``micro_batch_size``; TRL ``per_device_train_batch_size`` M with gradient accumulation over the
step's completions, still one generation and one optimizer step per step);
``--gradient-checkpointing`` turns on activation checkpointing on both sides; ccrl scores the
completion tokens with its chunked output head (``--logprob-chunk-size``, default ``auto``; 0:
full logits), TRL 1.16 with its fused LM head, so neither holds (rows, T, V) logits.

``--repeats N`` runs the whole comparison N times in one process, the sides' order reversed in
every other repeat; the table pools the timed steps of all repeats per side (median, min, max,
max/median) and lists the speed-up of each repeat.

- ccrl: ``ccrl.pipeline.run_recipe`` with a one-stage ``rl`` recipe (objective ``grpo``,
  ``model: {hf_config: ...}`` or ``{preset: ...}``); its rollout engine samples. A third side, ``ccrl+prefix``, is
  the same with ``RLTrainer.share_prompt_prefix = True`` (off by default; each distinct prompt
  runs once per step in the training forward, see ``ccrl.trainers.rl.PromptPrefix``). The side
  ``ccrl+whole-cache`` is ccrl with ``attend_window: 0``: its CUDA-graph rollout attends over the
  whole preallocated KV cache at every decode step (the engine's default attends over the columns
  decoded so far, in windows of 128), for measuring what the windows save at long completions;
  ``ccrl+sdpa`` is ccrl with ``decode_kernel: sdpa`` (SDPA instead of the Triton decode attention).
- TRL 1.16: ``GRPOTrainer`` with ``use_vllm=False`` (``model.generate``), ``loss_type="grpo"``,
  ``bf16=False`` (``--dtype bf16``: True), ``gradient_checkpointing=False``, ``report_to="none"``, offline (a model
  object, a ``PreTrainedTokenizerFast`` and a ``datasets.Dataset`` with a "prompt" column).

Rewards (``--rewards``, each measured separately): ``digit_share`` (``bench.common``; the share
of digits in a completion) is dense at the character tokenizer, so almost every group has reward
variance and both sides do the same forward and backward; at ``--vocab`` 32,000 or more an
untrained model samples mostly filler tokens (letters) and scores 0, so use ``char_share`` (the
share of digits and letters a–m; dense at any vocabulary) there; ``exact_match`` (``rewards.exact_match``) scores every
completion of an untrained model 0, so every advantage is 0: TRL still runs the forward and
backward (zero gradient), ccrl skips the rows whose loss is exactly 0
(``RLTrainer.gradient_rows``; on a plain causal LM, not on Quillan, whose load-balance loss sees
every row). The table says how many rows went through forward/backward (the mean over the timed
steps), and a line under it says when a ccrl side trained less than 90% of its rows while TRL
trains every row (the timing is then not like for like).

The trainers run side by side in one process, each in its own thread, and take turns step by
step (TRL's step 1, ccrl's step 1, ccrl+prefix's step 1, TRL's step 2, …; only one side runs at
any time), so a busy shared machine slows all alike. A step's time is the wall time of one whole iteration of
that side's training loop (sampling, scoring, the update, its logging). The first ``--warmup``
steps of each side are left out; the table gives medians of the timed steps and the ratio
ccrl / TRL (the target is ≤ 0.5).

GPU (``--device cuda``; ``--model``, ``--dtype``): the same comparison on one CUDA device, for
the Quillan ``base`` preset (``quillan-base``: ternary QAT as trained, random init; TRL gets the
same ``QuillanForCausalLM`` object, which ``policies`` registers with the transformers Auto
classes; TRL's fused LM head, which would score log_softmax(lm_head(h)) instead of the council
mixture, is replaced by the model's own logits, see ``score_with_model_logits``, unless
``--trl-fused-head``) and the dense Llama of the same size (``llama-base``: ``bench.common.LLAMA_BASE``, whose
parameter count equals Quillan base's active parameters per token). On CUDA the sides run one
after another instead of taking turns (taking turns only shares the noise of a busy CPU), each
step's end waits for the device (``torch.cuda.synchronize``), and each side's peak memory is
``torch.cuda.max_memory_allocated`` from its start (the previous side freed and the cache
emptied) to the end of its last step. ``--dtype bf16`` is mixed precision on both sides: fp32
weights and optimizer, bf16 autocast through accelerate (ccrl ``mixed_precision: bf16``, TRL
``bf16=True``; accelerate keeps one such setting per process, so both sides share it). TRL
samples with ``model.generate`` (its HF generate backend, ``use_vllm=False``).

Giving any of ``--device``, ``--dtype``, ``--model`` adds columns to the table: completion
tokens per step (ccrl's ``completion_tokens`` metric and TRL's ``completions/mean_length``, mean
tokens per completion with EOS, times the completions per step), completion tokens/s (the timed
steps' completion tokens over their total time), the speed-up TRL time / side time and, on
CUDA, the peak memory. Without them the output is the CPU table above.

Run:  python bench/rl_step.py [--steps 7 --warmup 2 --max-new-tokens 16 --threads 1
                             --rewards digit_share,exact_match --sides trl,ccrl,ccrl+prefix]
GPU:  python bench/rl_step.py --device cuda --dtype bf16 --model quillan-base --steps 5 --warmup 2
                             --max-new-tokens 64 --prompts 16 --group 8 --rewards digit_share --sides trl,ccrl
      (and --model llama-base for the dense model)
Real size (one H100; the commands BENCHMARKS.md lists):
      python bench/rl_step.py --device cuda --dtype bf16 --model llama-0.5b --vocab 151936 --prompts 16 --group 8
                             --max-new-tokens 256 --micro-batch-size 32 --steps 2 --warmup 1 --repeats 3
                             --rewards char_share --sides trl,ccrl
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    LLAMA_BASE,
    LLAMA_PRESETS,
    TINY_LLAMA,
    add_size_options,
    bench_tokenizer,
    environment_lines,
    hf_model,
    llama_config,
    median,
    parameter_count,
    quillan,
    size_options_given,
    table,
)
from ccrl.trainers.trl_arm import score_with_model_logits  # noqa: E402  (TRL scoring the council mixture)

REWARDS = {"exact_match": "exact_match", "digit_share": "bench.common:digit_share",
           "char_share": "bench.common:char_share"}
"""reward name → how a ccrl recipe names it (TRL gets the same function object)"""


MODELS = {"tiny-llama": {"hf_config": TINY_LLAMA}, "llama-base": {"hf_config": LLAMA_BASE},
          "llama-0.5b": {"hf_config": LLAMA_PRESETS["llama-0.5b"]},
          "llama-1.5b": {"hf_config": LLAMA_PRESETS["llama-1.5b"]}, "llama": {"hf_config": TINY_LLAMA},
          "quillan-base": {"preset": "base"}, "quillan-small": {"preset": "small"}}
"""--model name → the base of the ccrl recipe's model section (Llamas: their config, which the size
options change; ``llama`` starts from the tiny Llama's); TRL gets the same randomly initialised model"""


class Setup:
    """What both sides start from, made once per run: the ccrl recipe's model section, the tokenizer,
    and the same model for TRL (:meth:`trl_model`).

    A Quillan preset or a Llama config with the character tokenizer is built by each side from the
    seed (ccrl's ``build_model`` and ``bench.common.hf_model`` make the same weights). With
    ``--vocab`` the Llama is built once, in ``--weights-dtype``, and saved with its tokenizer into
    ``folder``; ccrl reads it as ``model: {checkpoint: folder}``, TRL with ``from_pretrained``."""

    def __init__(self, args, folder: Path):
        from ccrl.models import cast_parameters

        spec = MODELS[args.model]
        self.args, self.dtype = args, getattr(torch, args.weights_dtype)
        self.tok = bench_tokenizer(args.vocab)
        self.preset = spec.get("preset")
        self.config = None if self.preset else llama_config(spec["hf_config"], args, args.max_new_tokens + 64)
        self.folder = None
        if self.preset:
            self.section = {"preset": self.preset}
        elif args.vocab is None:
            self.section = {"hf_config": dict(self.config)}
        else:
            self.folder = folder
            model = hf_model(self.config, self.tok, seed=args.seed)
            cast_parameters(model, self.dtype)
            model.save_pretrained(folder)
            self.tok.save_pretrained(folder)
            del model
            self.section = {"checkpoint": str(folder)}
        self.section["dtype"] = args.weights_dtype

    def trl_model(self):
        """TRL's copy of the model: the same weights ccrl starts from, in ``--weights-dtype``."""
        from ccrl.models import cast_parameters

        if self.folder is not None:
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(self.folder, dtype=self.dtype)
        if self.preset:
            model = quillan(self.preset, self.tok, seed=self.args.seed)
        else:
            model = hf_model(self.config, self.tok, seed=self.args.seed)
        cast_parameters(model, self.dtype)
        return model

    def describe(self) -> str:
        """The model in the settings line (its parameter counts with this tokenizer's vocabulary)."""
        if self.preset:
            from policies import QuillanConfig, count_parameters

            n = count_parameters(QuillanConfig.preset(self.preset, vocab_size=len(self.tok)))
            return (f"Quillan preset {self.preset!r} (ternary QAT; {n['total'] / 1e6:.1f}M parameters, "
                    f"{n['active'] / 1e6:.1f}M active per token)")
        total = parameter_count(self.config, self.tok)
        name = {"llama-base": "dense Llama of Quillan base's size", "tiny-llama": "tiny Llama", "llama": "Llama"}.get(
            self.args.model, f"Llama {self.args.model}")
        return (f"{name} {self.config} ({total / 1e6:.1f}M parameters, vocabulary {len(self.tok)}, "
                f"{self.args.weights_dtype} weights)")


def reward_fn(name: str):
    import rewards

    return rewards.resolve(REWARDS[name])


class Baton:
    """Lets exactly one trainer run at a time, handing over to the next after every step.

    Each side's step time is the wall time from getting the baton to handing it over, i.e. one
    whole iteration of its own training loop, while the others sleep."""

    def __init__(self, order: list[str], cuda: bool = False):
        self.order = list(order)
        self.turn = self.order[0]
        self.cv = threading.Condition()
        self.times: dict[str, list[float]] = {k: [] for k in order}
        self.resumed: dict[str, float] = {}
        self.cuda = cuda
        self.peak: dict[str, int] = {}

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
        """End of one of ``who``'s steps: record it, let the next side run, wait for the turn.

        On CUDA the step ends once the device has finished its work; the peak memory so far is read then."""
        if self.cuda:
            torch.cuda.synchronize()
        self.times[who].append(time.perf_counter() - self.resumed[who])
        if self.cuda:
            self.peak[who] = torch.cuda.max_memory_allocated()
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


def ccrl_recipe(args, setup: Setup, workdir: Path, reward: str) -> dict:
    """The one-stage rl recipe of the ccrl side. Held-out scoring at the stage's end (after the timed
    steps) decodes 8 prompts × 8 tokens."""
    stage = {
        "kind": "rl", "objective": "grpo",
        "data": {"task": "arithmetic", "num_examples": 1024, "heldout_size": 8},
        "steps": args.warmup + args.steps, "lr": args.lr, "warmup_steps": 0, "lr_schedule": "constant",
        "prompts_per_step": args.prompts, "group_size": args.group, "max_new_tokens": args.max_new_tokens,
        "temperature": 1.0, "kl_beta": 0.0, "max_grad_norm": 1.0,
        "rewards": [{"name": REWARDS[reward]}],
        "gradient_checkpointing": args.gradient_checkpointing, "logprob_chunk_size": args.logprob_chunk_size,
    }
    if args.micro_batch_size:
        stage["micro_batch_size"] = args.micro_batch_size
    if args.optimizer_state_dtype:
        stage["optimizer_state_dtype"] = args.optimizer_state_dtype
    return {
        "name": "bench-rl-step", "seed": args.seed, "output_dir": str(workdir / "ccrl"), "threads": args.threads,
        "device": args.device, "mixed_precision": "bf16" if args.dtype == "bf16" else "no",
        "model": {k: dict(v) if isinstance(v, dict) else v for k, v in setup.section.items()},
        "eval": {"max_new_tokens": 8, "batch_size": 64},
        "stages": [stage],
    }


def trl_trainer(args, setup: Setup, workdir: Path, reward: str, callback):
    """TRL's GRPOTrainer on the same model, data and reward, offline."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from ccrl.data import get_task

    model = setup.trl_model()
    examples = get_task("arithmetic").examples("train", 1024, seed=args.seed)
    data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in examples])
    n = args.prompts * args.group
    micro = args.micro_batch_size or n        # one generation of n completions, accumulated over n / micro passes
    config = GRPOConfig(
        output_dir=str(workdir / "trl"), report_to="none", use_vllm=False, bf16=args.dtype == "bf16",
        use_cpu=args.device == "cpu",
        gradient_checkpointing=args.gradient_checkpointing, per_device_train_batch_size=micro,
        gradient_accumulation_steps=n // micro,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
        top_k=0, top_p=1.0, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group", num_iterations=1,
        max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no", seed=args.seed,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_fn(reward)], args=config,
                          train_dataset=data, processing_class=setup.tok, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    if "preset" in MODELS[args.model] and not args.trl_fused_head:
        score_with_model_logits(trainer.model, trainer.temperature)
    return trainer


SIDES = {"trl": "TRL 1.16 GRPOTrainer", "ccrl": "ccrl RLTrainer (grpo)",
         "ccrl+prefix": "ccrl, share_prompt_prefix=True",
         "ccrl+whole-cache": "ccrl, attend_window=0", "ccrl+sdpa": "ccrl, decode_kernel=sdpa"}
"""the sides a run can time: TRL, ccrl as shipped, ccrl with the opt-in shared prompt prefix (which
applies to plain causal LMs only: on a Quillan model ``ccrl+prefix`` runs exactly as ``ccrl``), and
ccrl whose CUDA-graph decoding attends over the whole preallocated cache at every step instead of
the columns decoded so far in windows of 128 (``attend_window: 0``; on the CPU the eager loop
decodes and it runs exactly as ``ccrl``), and ccrl whose decode step attends with torch's SDPA
instead of the Triton decode kernel (``decode_kernel: sdpa``; the same as ``ccrl`` where the kernel
does not run: off CUDA, fp32 attention, no Triton)"""


SIDE_KEYS = {"ccrl+whole-cache": {"attend_window": 0}, "ccrl+sdpa": {"decode_kernel": "sdpa"}}
"""the RL stage keys a ccrl side sets over the shared recipe"""


def run_sides(args, setup: Setup, workdir: Path, reward: str, sides: list[str]) -> dict[str, dict]:
    """Every side, ``warmup + steps`` steps each, taking turns step by step, each in its own thread.

    TRL hands over in ``on_step_end`` (its logging of a step then falls in the next step's
    interval, the same amount every step); ccrl in its step callback. Returns per side: the
    timed step times (``times``), the completion tokens of the timed steps (``tokens``), the
    last metrics (``last``) and on CUDA the peak allocated memory up to the last step (``peak``)."""
    from transformers import TrainerCallback

    from ccrl.pipeline import run_recipe
    from ccrl.trainers.rl import RLTrainer

    baton = Baton(sides, cuda=args.device == "cuda")
    last: dict = {k: {} for k in sides}
    tokens: dict = {k: [] for k in sides}
    trained: dict = {k: [] for k in sides}
    rollout: dict = {k: [] for k in sides}
    n = args.prompts * args.group
    errors: list[BaseException] = []

    def trl_side():
        class HandOver(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                baton.hand_over("trl")

            def on_log(self, a, state, control, logs=None, **kw):
                last["trl"].update(logs or {})
                if logs and "completions/mean_length" in logs:     # one log per step (logging_steps=1)
                    tokens["trl"].append(logs["completions/mean_length"] * n)

        trl_trainer(args, setup, workdir, reward, HandOver()).train()

    def ccrl_side(name: str, share: bool):
        def step_done(trainer, step, metrics):
            last[name].update(metrics)
            tokens[name].append(metrics["completion_tokens"] * n)   # mean generated tokens per completion
            trained[name].append(metrics["rows_trained_frac"])
            rollout[name].append(metrics["rollout_time_s"])
            baton.hand_over(name)

        RLTrainer.share_prompt_prefix = share     # read by the trainer built during this turn
        recipe = ccrl_recipe(args, setup, workdir / name, reward)
        recipe["stages"][0].update(SIDE_KEYS.get(name, {}))
        run_recipe(recipe, callbacks=[step_done], show_progress=False, log=lambda *_: None)

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
    return {k: {"times": baton.times[k][args.warmup:], "tokens": tokens[k][args.warmup:], "last": last[k],
                "trained": trained[k][args.warmup:], "rollout": rollout[k][args.warmup:], "peak": baton.peak.get(k)}
            for k in sides}


def run_one_by_one(args, setup: Setup, workdir: Path, reward: str, sides: list[str]) -> dict[str, dict]:
    """CUDA: the sides one after another, each alone on the device; before each, the previous side's
    model and optimizer are freed, the allocator cache emptied and the peak-memory counter reset."""
    out = {}
    for side in sides:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out.update(run_sides(args, setup, workdir, reward, [side]))
        out[side]["start"] = start
    gc.collect()
    torch.cuda.empty_cache()
    return out


def repeat_detail(res: dict) -> str:
    """What the per-repeat line adds after a side's step time (so a run stopped early still shows it):
    a ccrl side's median rollout seconds per step (``rollout_time_s``: sampling, rewards and advantages,
    before the update) and rows trained, and on CUDA the side's peak memory and what was allocated at
    its start (what earlier sides left behind in the process: a peak compares fairly only net of it)."""
    parts = []
    if res.get("rollout"):
        parts.append(f"rollout {median(res['rollout']):.3f} s")
    if res.get("trained"):
        parts.append(f"rows trained {rows_trained(res['trained'])}")
    if res.get("peak") is not None:
        parts.append(f"peak {res['peak'] / 2**30:.2f} GiB")
    if res.get("start") is not None:
        parts.append(f"allocated at start {res['start'] / 2**30:.2f} GiB")
    return f" ({'; '.join(parts)})" if parts else ""


def run_repeats(args, setup: Setup, workdir: Path, reward: str, sides: list[str]) -> dict[str, dict]:
    """``--repeats`` runs of every side, the order reversed in every other one; each repeat's folder
    (the ccrl side's checkpoint) is removed after it. Per side: every timed step of every repeat
    (``times``, ``tokens``), the median step time of each repeat (``medians``), the last metrics and,
    on CUDA, the largest peak memory and the allocation at the side's start."""
    pooled = {k: {"times": [], "tokens": [], "trained": [], "medians": [], "peak": None, "start": None, "last": {}}
              for k in sides}
    for r in range(args.repeats):
        order = sides if r % 2 == 0 else sides[::-1]
        folder = workdir / f"repeat{r}"
        res = (run_one_by_one if args.device == "cuda" else run_sides)(args, setup, folder, reward, order)
        shutil.rmtree(folder, ignore_errors=True)
        for k, v in res.items():
            acc = pooled[k]
            acc["times"] += v["times"]
            acc["tokens"] += v["tokens"]
            acc["trained"] += v["trained"]
            acc["medians"].append(median(v["times"]))
            acc["last"] = v["last"]
            if v.get("peak") is not None:
                acc["peak"] = max(acc["peak"] or 0, v["peak"])
            if v.get("start") is not None:
                acc["start"] = v["start"]
        print(f"  {reward}, repeat {r + 1}/{args.repeats} ({', '.join(order)}): "
              + ", ".join(f"{k} {median(res[k]['times']):.3f} s/step{repeat_detail(res[k])}" for k in sides), flush=True)
    return pooled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__[__doc__.index("Run:"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=7, help="timed steps per side and reward")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of the whole comparison in this process (the sides' order reversed every other run)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rewards", default="digit_share,exact_match", help=f"comma-separated, from {', '.join(REWARDS)}")
    p.add_argument("--sides", default="trl,ccrl,ccrl+prefix", help=f"comma-separated, from {', '.join(SIDES)}")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="cpu (default) or cuda: ccrl device: cuda, TRL use_cpu=False; sides run one after another")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="fp32 (default) or bf16: bf16 autocast on both sides (ccrl mixed_precision bf16, TRL bf16=True)")
    p.add_argument("--model", choices=list(MODELS), default=None,
                   help="tiny-llama (default), llama-base (dense, Quillan base's active size), llama-0.5b, llama-1.5b "
                        "(bench.common.LLAMA_PRESETS), llama (the tiny Llama's sizes, to change with the size "
                        "options), quillan-base, quillan-small")
    add_size_options(p)
    p.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the parameters' dtype on both sides (ccrl model.dtype; TRL gets the model in it)")
    p.add_argument("--optimizer-state-dtype", choices=["float32", "bfloat16"], default=None,
                   help="ccrl optimizer_state_dtype (default: the weights' dtype, as TRL's torch AdamW); float32 with "
                        "bf16 weights keeps float32 master weights")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="completions per forward/backward on both sides (ccrl micro_batch_size; TRL "
                        "per_device_train_batch_size with gradient accumulation over the step); default: all")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing on both sides")
    p.add_argument("--logprob-chunk-size", default="auto",
                   help="ccrl logprob_chunk_size: tokens per chunk of the output head ('auto', or 0 for full logits)")
    p.add_argument("--trl-fused-head", action="store_true",
                   help="Quillan models: keep TRL's fused LM head, which scores log_softmax(lm_head(h)) instead of "
                        "the council mixture the model samples from (less work, a different distribution); by "
                        "default TRL scores with the model's own logits (score_with_model_logits)")
    args = p.parse_args(argv)
    extended = any(getattr(args, k) is not None for k in ("device", "dtype", "model", "vocab", "micro_batch_size")) \
        or bool(size_options_given(args)) or args.repeats > 1 or args.weights_dtype != "float32"
    args.device, args.dtype, args.model = args.device or "cpu", args.dtype or "fp32", args.model or "tiny-llama"
    if args.logprob_chunk_size != "auto":
        try:
            args.logprob_chunk_size = int(args.logprob_chunk_size)
        except ValueError:
            p.error(f"--logprob-chunk-size: 'auto' or an integer, got {args.logprob_chunk_size!r}")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step's start is not observable the same way on both sides)")
    if args.repeats < 1 or args.steps < 1:
        p.error("--repeats and --steps must be >= 1")
    n = args.prompts * args.group
    if args.micro_batch_size is not None and (args.micro_batch_size < 1 or n % args.micro_batch_size):
        p.error(f"--micro-batch-size must divide the step's {n} completions (prompts x group)")
    if "preset" in MODELS[args.model] and (args.vocab is not None or size_options_given(args)):
        p.error(f"--model {args.model}: the size options and --vocab apply to the Llama models")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if not sides or any(x not in SIDES for x in sides):
        p.error(f"--sides: a comma-separated list from {', '.join(SIDES)} (without trl: the ccrl sides' times and "
                f"memory alone, no ratios)")
    rewards_ = [r.strip() for r in args.rewards.split(",") if r.strip()]
    for reward in rewards_:
        if reward not in REWARDS:
            p.error(f"--rewards: unknown reward {reward!r}; known: {', '.join(REWARDS)}")

    print(f"# RL step: ccrl GRPO vs TRL GRPOTrainer ({'GPU' if cuda else 'CPU'})")
    for line in environment_lines(args.threads, args.device):
        print(line)
    with tempfile.TemporaryDirectory(prefix="bench_rl_step_") as tmp:
        setup = Setup(args, Path(tmp) / "model")
        print(settings_line(args, setup, cuda))
        results = {reward: run_repeats(args, setup, Path(tmp) / reward, reward, sides) for reward in rewards_}
    print()
    print_table(args, results, sides, extended, cuda)
    return 0


def settings_line(args, setup: Setup, cuda: bool) -> str:
    precision = "fp32 autocast off" if args.dtype == "fp32" else (
        "bf16 autocast on both sides: ccrl mixed_precision bf16, TRL bf16=True")
    order = ("sides run one after another, each alone on the device, peak memory = torch.cuda.max_memory_allocated "
             "from the side's start to its last step" if cuda else "sides taking turns step by step")
    head = ""
    if setup.preset:
        head = (", TRL keeps its fused LM head (trains log_softmax(lm_head(h)), not the council mixture it samples)"
                if args.trl_fused_head else ", TRL scores with the model's own logits log pi_Omega (its fused LM head "
                "would skip the council mixture), both sides add the router load-balance loss")
    tok = "char tokenizer" if args.vocab is None else f"tokenizer of {args.vocab} tokens (task characters + fillers)"
    memory = (f"micro-batch {args.micro_batch_size or 'all'}, gradient checkpointing "
              f"{'on' if args.gradient_checkpointing else 'off'}, ccrl logprob_chunk_size {args.logprob_chunk_size}, "
              f"ccrl optimizer_state_dtype {args.optimizer_state_dtype or 'the weights'}")
    return (f"settings: {setup.describe()} ({precision}, random init), {tok}, arithmetic prompts, {args.prompts} "
            f"prompts x G={args.group}, max_new_tokens={args.max_new_tokens}, temperature 1.0, rewards {args.rewards}, "
            f"lr {args.lr}, beta 0, one PPO epoch, {memory}, {args.warmup} warm-up + {args.steps} timed steps per "
            f"side, {args.repeats} repeat(s), {order}{head}, seed {args.seed}")


def rows_trained(fracs: list[float]) -> str:
    """The share of a ccrl side's completions that went through forward/backward: the mean over the
    timed steps, with the smallest step's in brackets when they differ."""
    if not fracs:
        return "n/a"
    mean, low = sum(fracs) / len(fracs), min(fracs)
    return f"{mean:.2f}" if f"{low:.2f}" == f"{mean:.2f}" else f"{mean:.2f} (min {low:.2f})"


UNEQUAL_WORK = 0.9
"""a ccrl side that trained less than this share of its rows (mean over the timed steps) did less
work than TRL, which trains every row; the table then says the timing is not like for like"""


def unequal_work_notes(results: dict, sides: list[str]) -> list[str]:
    """One line per reward × ccrl side whose mean share of rows trained is below :data:`UNEQUAL_WORK`."""
    notes = []
    for reward, res in results.items():
        for k in sides:
            fracs = res[k].get("trained") or []
            if k != "trl" and fracs and sum(fracs) / len(fracs) < UNEQUAL_WORK:
                notes.append(f"NOT LIKE FOR LIKE: {SIDES[k]} with {reward} trained {rows_trained(fracs)} of its rows "
                             f"(groups without reward variance are skipped) while TRL trains every row; for a speed "
                             f"comparison use a reward dense at this vocabulary (--rewards char_share).")
    return notes


def print_table(args, results: dict, sides: list[str], extended: bool, cuda: bool) -> None:
    """The table of every reward × side (pooled over the repeats) and the notes under it."""
    rows = []
    for reward, res in results.items():
        tm = median(res["trl"]["times"]) if "trl" in res else None
        for k in sides:
            t, info = res[k]["times"], res[k]["last"]
            trained = "all" if k == "trl" else rows_trained(res[k]["trained"])
            ratio = "" if k == "trl" or tm is None else f"{median(t) / tm:.3f}"
            spread = max(t) / median(t)
            if not extended:
                rows.append([reward, SIDES[k], median(t), min(t), max(t), spread, len(t),
                             info.get("frac_reward_zero_std", float("nan")), trained, ratio])
                continue
            toks = res[k]["tokens"]
            row = [reward, SIDES[k], median(t), min(t), max(t), spread, len(t), sum(toks) / max(1, len(toks)),
                   sum(toks) / sum(t) if t else float("nan")]
            if cuda:
                row += [res[k]["peak"] / 2**30, res[k]["start"] / 2**30]
            per_repeat = "" if k == "trl" or tm is None else " / ".join(
                f"{a / b:.2f}x" for a, b in zip(res["trl"]["medians"], res[k]["medians"]))
            row += [info.get("frac_reward_zero_std", float("nan")), trained, ratio,
                    "" if k == "trl" or tm is None else f"{tm / median(t):.2f}x", per_repeat]
            rows.append(row)
    if not extended:
        print(table(["reward", "side", "median s/step", "min", "max", "max/median", "steps timed",
                     "zero-std groups (last step)", "rows through fwd/bwd (mean over timed steps)", "ccrl / TRL"], rows))
        print("\nccrl / TRL is the ratio of median step times (target <= 0.5). exact_match on an untrained model "
              "scores every completion 0, so every group has zero advantage: TRL still runs the forward and "
              "backward (with zero gradient), ccrl skips rows whose loss is exactly 0. digit_share gives almost "
              "every group reward variance at the character tokenizer, so every side runs the forward and backward.")
        for note in unequal_work_notes(results, sides):
            print(note)
        return
    memory = ["peak memory GiB", "allocated at side start GiB"] if cuda else []
    print(table(["reward", "side", "median s/step", "min", "max", "max/median", "steps timed",
                 "completion tokens/step", "completion tokens/s", *memory, "zero-std groups (last step)",
                 "rows through fwd/bwd (mean over timed steps)", "ccrl / TRL (time)", "speed-up vs TRL (TRL time / side time)",
                 "speed-up per repeat"], rows))
    print("\nStep times pool the timed steps of every repeat. ccrl / TRL (time) is the ratio of median step times "
          "(CPU target <= 0.5); speed-up vs TRL is its inverse, TRL's median step time over the side's (GPU target "
          ">= 2x); per repeat, the same from each repeat's medians. Completion tokens/step is the mean over the "
          "timed steps of the completions' generated tokens (EOS included; sampling differs between the sides, so "
          "the lengths may too); completion tokens/s = the timed steps' completion tokens / their total time. "
          "exact_match on an untrained model gives every group zero advantage: TRL still runs the forward and "
          "backward (with zero gradient); ccrl skips rows whose loss is exactly 0 on a plain causal LM, but not on "
          "a Quillan model, whose load-balance loss and router statistics see every row.")
    if cuda:
        print("Peak memory is the largest torch.cuda.max_memory_allocated over the side's runs, each up to the end "
              "of its last step (model, optimizer state, rollouts, activations; warm-up steps included). It includes "
              "what was allocated at the side's start: memory an earlier side left in the process (cuBLAS keeps a "
              "workspace per stream it ran on for the process's lifetime); the per-repeat lines give both.")
    for note in unequal_work_notes(results, sides):
        print(note)


if __name__ == "__main__":
    sys.exit(main())
