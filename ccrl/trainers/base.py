"""The trainer base: device placement, optimisation, logging, evaluation and checkpoint/resume.

Every stage trainer (pretrain, sft, rl, dpo/orpo) subclasses :class:`Trainer` and implements
``training_step(step) -> metrics``; inside it, the subclass computes losses, calls
``self.backward(loss)`` once per micro-batch and ``self.optimizer_step()`` once per update.
The base owns everything around that:

- accelerate for devices, mixed precision, DDP and FSDP2 (``accelerate launch -m ccrl run``);
- AdamW over the trainable parameters, gradient clipping, warm-up then cosine/linear/constant;
- determinism: every random draw of step ``s`` comes from ``self.step_generator(s)``, a generator
  seeded by (recipe seed, stage index, step), so a resumed run draws exactly what an uninterrupted
  one would — 20 steps straight and 10 + resume + 10 give identical parameters and metrics;
- ``metrics.jsonl`` (one line per step) and a tqdm progress bar with loss/reward and tokens/s;
- checkpoints every ``save_every`` steps and at the end (atomic, see ``ccrl.checkpoint``); the
  final one (``ctx.final_checkpoint``, marked complete) is saved *before* held-out scoring;
- ``early_stop``: every ``every`` steps, greedy accuracy on a fixed sample of the stage's training
  prompts; the stage ends (final checkpoint, held-out scoring) at the first check that reaches
  the threshold, and ``stopped_early`` / ``step`` say where;
- ``max_seconds`` and callbacks (``ccrl.callbacks``): a stage whose training time passes its budget,
  or whose callback asks it to, ends the same way at that step boundary (``stopped_by`` says why);
  the time is summed over resumes, and every ``metrics.jsonl`` line carries it as ``elapsed_s``
  (training seconds since the stage started, its periodic evaluations included: the clock the
  budget reads); RL's ``max_samples`` ends a stage the same way (:meth:`Trainer.budget_spent`);
- metrics also go to the recipe's experiment trackers (``report_to``, accelerate's ``log``) as
  ``<stage>/<key>`` at a step counted over the run (``RunContext.step_offset`` + step);
- AdamW's betas and eps are the stage's ``adam_betas`` / ``adam_epsilon``, the precision of its state
  ``optimizer_state_dtype`` (float32 master weights for bf16 parameters, ``ccrl.trainers.optim``);
  ``gradient_checkpointing`` turns on the model's activation checkpointing (transformers) for the stage;
- SIGINT or SIGTERM: the current step finishes, a checkpoint is written, and ``StageInterrupted``
  is raised (the CLI exits 130 and says that ``--resume`` continues);
- a NaN/inf loss or gradient: the update is skipped, the (still finite) weights are saved as the
  last good checkpoint, and :class:`ccrl.errors.TrainingDiverged` is raised.

What a failure keeps (nothing trained is thrown away). When anything else raises inside the
stage's loop (a reward function raising at step 19, a data error, a bug, a KeyboardInterrupt
that bypassed the handler), the trainer saves the last consistent state as ``<stage>-last``
before the error leaves :meth:`Trainer.train`: the weights, optimizer, schedule and RNG after the
last step that finished (a failure inside a step that had not yet updated the weights loses only
that step; one raised after the update, e.g. in periodic evaluation, keeps the step, whose
``metrics.jsonl`` line may then be missing). It keeps the existing ``<stage>-last`` instead when
the weights were changed mid-step (an update of a multi-update RL step had run), are no longer
finite, when several processes train (the others cannot join a save), or when the failure was
the save itself. The error is re-raised with a sentence saying what was kept and that
``--resume`` continues from it: a :class:`ccrl.errors.CcrlError` keeps its class (exit 2), any
other exception gets the sentence as a note on its traceback. A checkpoint that cannot be
written (a full disk) is :class:`ccrl.checkpoint.CheckpointWriteError` (exit 2), with no
temporary folder left. If held-out scoring at the stage's end fails, the final checkpoint is
already saved and marked complete; ``--resume`` then scores it without training again.

Several processes (``accelerate launch -m ccrl run``, DDP): every process builds the same trainer
and draws the same step (the generators above do not depend on the process); each then trains
its own contiguous share of the step's rows (:meth:`Trainer.shard_slice`; the stage's batch size
must be a multiple of the process count, checked at the start of the stage). Losses divide by
the step's *global* normalisers over W (token and sequence counts summed over the processes,
then divided by W), so after DDP averages the gradients over the W processes the update is the
one a single process computes on the whole batch. Every process runs the same number of
backward passes per update (a process with less to do runs passes of weight 0), because each
backward joins a gradient reduction. Logged metrics are reduced over the processes, so the
main process writes the global values; only it writes ``metrics.jsonl`` and checkpoints (which
hold the whole model and optimizer, so a stage resumes on any process count). The decisions
that end a stage (a stop request, a non-finite loss) are agreed by all processes before they
act.

FSDP2 (an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``): accelerate's
``prepare`` shards the parameters, gradients and AdamW state over the processes
(``torch.distributed.fsdp.fully_shard``, in place); the training forward and backward passes are
the same as under DDP (each process its share, gradients averaged by FSDP's reduce-scatter), so
the update is again that of one process on the whole step. What reads the whole model (rollouts,
held-out evaluation, early-stop checks, pairs built from the policy, checkpoints) reads a full
copy of it: each process keeps an unsharded replica of the policy (taken before sharding, in
eval mode, no gradients, no optimizer state), and :meth:`Trainer.gather_full_weights` copies the
trained weights into it (``get_model_state_dict(full_state_dict=True)``; the frozen parameters,
e.g. a LoRA base, never change and are not gathered again) once per optimizer update, at a point
every process reaches together. Every forward of the sharded model is a collective as well, so
it runs only where each process runs the same number of forwards (the training passes, idle ones
included; DPO's reference and held-out log-probs, which every process computes over every
pair); the RL reference log-probs under LoRA, whose micro-batch counts differ between the
processes, read the replica. A replica and not unsharding around generation: each forward of
a sharded module is a collective, and the processes generate different numbers of tokens and
rounds (their own prompts, EOS, dynamic sampling) and the main process alone builds preference
pairs, so forwards of the sharded model would wait on one another; the replica generates with no
communication and with the generation code unchanged (KV cache, packed kernels). It costs one
unsharded copy of the weights per process, which is what a rollout needs anyway; the optimizer
state and gradients, the largest part, stay sharded. Checkpoints hold the full weights and the
full optimizer state (gathered by every process, written by the main one) in the one-process
layout, so a stage saved under FSDP2 resumes in one process and the reverse. FSDP1
(``fsdp_version: 1``) is refused.

Why our own loop and not ``transformers.Trainer``: RL steps interleave generation, scoring and
several optimizer updates per batch, and the exact-resume guarantee needs the data order to be a
function of the step, which ``Trainer``'s sampler state does not give.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ccrl import checkpoint as ckpt
from ccrl.errors import CcrlError, CheckpointError, RecipeError, TrainingDiverged


class StageInterrupted(KeyboardInterrupt):
    """Raised after SIGINT (or ``request_stop``) once a resumable checkpoint has been written."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"interrupted; checkpoint written to {checkpoint}")
        self.checkpoint = checkpoint


@dataclass
class RunContext:
    """What a stage trainer needs to know about the run around it."""

    output_dir: Path
    seed: int
    stage_index: int
    stage_name: str
    accelerator: Any
    tokenizer: Any
    task: Any = None
    heldout: list = field(default_factory=list)
    train_examples: list = field(default_factory=list)
    reward_specs: list = field(default_factory=list)
    eval_config: Any = None
    callbacks: list = field(default_factory=list)
    show_progress: bool = True
    final_checkpoint: Path | None = None
    """where ``train()`` saves the stage's final checkpoint before held-out scoring (None: it does not)"""
    step_offset: int = 0
    """steps planned in the stages before this one: experiment trackers log step ``step_offset + step``"""

    def task_target(self, example) -> str:
        """The completion text a supervised stage teaches for ``example``."""
        if self.task is not None:
            return self.task.format_target(example)
        return example.answer or ""


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    """Multiplier of the peak lr at optimizer step ``i`` (0-based): linear warm-up, then decay."""

    def f(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        p = min(1.0, (i - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - (1.0 - min_ratio) * p
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    return f


def stream_seed(seed: int, stage_index: int, step: int = 0, salt: int = 0) -> int:
    """The seed of one random stream of a run: a function of (seed, stage, step, salt) alone, so a
    stage draws the same numbers whether the stages before it ran in this process or a resume
    skipped them."""
    return (seed * 1_000_003 + stage_index * 10_007 + step * 101 + salt) % (2**63)


class Trainer:
    """Base class; see the module docstring."""

    kind = "base"

    def __init__(self, stage, model, ctx: RunContext):
        self.stage = stage
        self.ctx = ctx
        self.acc = ctx.accelerator
        self.tokenizer = ctx.tokenizer
        self.model = model
        self.step = 0
        self.updates = 0
        self._stop_requested = False
        self._nonfinite: tuple[str, float] | None = None   # a non-finite loss seen by this process (W > 1)
        self._in_step = False            # inside training_step (its weights may be half-updated)
        self._updates_at_step = 0        # self.updates when the current step began
        self._saved_step: int | None = None   # the step of the latest in-progress checkpoint (saved or resumed)
        self._final_saved = False
        from ccrl.callbacks import CallbackHandler

        self.callbacks = CallbackHandler(ctx.callbacks)
        self.stopped_by: str | None = None   # why the stage ended before its steps (ccrl.callbacks.STOP_REASONS)
        self.train_seconds = 0.0             # training time of the stage so far, summed over resumes
        self.lr_scale = 1.0                  # multiplies the scheduled learning rate (apply_lr_scale)
        self.check_processes()
        self._metrics_file = Path(ctx.output_dir) / "metrics.jsonl"
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {stage.name}: the model has no trainable parameters")
        # AdamW fused (or foreach) instead of a Python loop over parameters; the state's precision is
        # the stage's optimizer_state_dtype (ccrl.trainers.optim)
        from ccrl.trainers.optim import build_optimizer

        self.optimizer = build_optimizer(self.param_groups(model, params), params, stage)
        if getattr(stage, "gradient_checkpointing", False):
            enable_gradient_checkpointing(model, stage.name)
        total = self.total_updates()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(stage.lr_schedule, stage.warmup_steps, total, stage.min_lr_ratio))
        # FSDP2: the unsharded replica that generation, evaluation and checkpoints read (module docstring)
        self._full = None
        self._full_at: int | None = None      # self.updates when the replica was last gathered
        if self.fsdp:
            self._full = copy.deepcopy(model).eval().requires_grad_(False).to(self.acc.device)
            self._full_at = self.updates
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.device = self.acc.device
        self.stopped_early = False
        self.early_stop_last: float | None = None   # the accuracy of the latest early-stop check
        self.early_stop_sample = self.early_stop_examples() if stage.early_stop else []

    def param_groups(self, model, params: list) -> list[dict]:
        """One AdamW group, or two when ``quantized_lr_scale`` != 1: the latent weights of the
        ternary/binary layers (``policies.ternary.quantized_parameters``) at ``lr × scale``, the
        rest at ``lr`` (the schedule multiplies both)."""
        scale = getattr(self.stage, "quantized_lr_scale", 1.0)
        if scale == 1.0:
            return [{"params": params}]
        from policies.ternary import quantized_parameters

        q = {id(p) for p in quantized_parameters(model)}
        groups = [{"params": [p for p in params if id(p) not in q]},
                  {"params": [p for p in params if id(p) in q], "lr": self.stage.lr * scale}]
        return [g for g in groups if g["params"]]

    # ----------------------------------------------------------------- hooks for subclasses

    def total_updates(self) -> int:
        """Optimizer updates over the whole stage (for the schedule)."""
        return self.stage.steps

    def sharded_sizes(self) -> dict[str, int]:
        """The stage's per-step sizes that the processes split between them (must divide evenly)."""
        return {"batch_size": self.stage.batch_size}

    def training_step(self, step: int) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the current weights (heldout_accuracy, reward/<name>, value)."""
        from ccrl.evaluation import evaluate_policy
        from ccrl.scoring import reward_state

        self.gather_full_weights()
        return evaluate_policy(self.sampling_model, self.ctx, state=reward_state(self))

    @property
    def sampling_model(self):
        """The policy that generates (held-out scoring, early-stop checks); subclasses under PEFT
        may return another view of it. Under FSDP2 the replica: call :meth:`gather_full_weights`
        first."""
        return self.full_model

    def early_stop_examples(self) -> list:
        """The fixed sample of distinct training prompts that ``early_stop`` decodes.

        Drawn with an RNG seeded by (recipe seed, stage name), so every process and every
        resume of the stage checks the same prompts.
        """
        seen, pool = set(), []
        for e in self.ctx.train_examples:
            if e.answer is None:
                raise RecipeError(
                    f"stages.{self.stage.name}.early_stop: needs training examples with answers (a task, or a "
                    f"file with prompt and answer columns); the example with prompt {e.prompt!r} has none")
            if e.prompt not in seen:
                seen.add(e.prompt)
                pool.append(e)
        if not pool:
            raise RecipeError(f"stages.{self.stage.name}.early_stop: the stage has no training examples to check")
        rng = random.Random(f"early_stop:{self.ctx.seed}:{self.stage.name}")
        return rng.sample(pool, min(self.stage.early_stop.prompts, len(pool)))

    def early_stop_accuracy(self) -> float:
        """Greedy accuracy of the current weights on the ``early_stop`` sample of training prompts."""
        from ccrl.evaluation import evaluate_policy

        ctx = dataclasses.replace(self.ctx, reward_specs=[])   # accuracy only: no reward scoring
        self.gather_full_weights()
        return evaluate_policy(self.sampling_model, ctx, self.early_stop_sample)["heldout_accuracy"]

    def _early_stop_check(self, metrics: dict) -> bool:
        """At a check step, log ``early_stop/accuracy`` into ``metrics``; True when the stage should end."""
        es = self.stage.early_stop
        if es is None or self.step % es.every or self.step < es.min_steps or self.step >= self.stage.steps:
            return False
        acc = self.early_stop_accuracy()
        self.model.train()
        metrics["early_stop/accuracy"] = self.early_stop_last = acc
        reached = acc >= es.accuracy
        if self.world_size > 1:   # the processes decode the same prompts greedily; stop only if all agree
            reached = bool(self.all_reduce([reached], "min")[0])
        return reached

    # ----------------------------------------------------------------- helpers

    @property
    def unwrapped(self):
        """The trained model without its DDP wrapper (under FSDP2: the sharded model itself)."""
        return self.acc.unwrap_model(self.model)

    @property
    def fsdp(self) -> bool:
        """Whether the parameters are sharded over the processes (accelerate's FSDP2)."""
        return bool(getattr(self.acc, "is_fsdp2", False))

    @property
    def full_model(self):
        """The policy with every weight in this process, for what reads the whole model (generation,
        reference copies, saving): the trained model itself, or under FSDP2 its unsharded replica as
        of the last :meth:`gather_full_weights`."""
        return self._full if self._full is not None else self.unwrapped

    def gather_full_weights(self) -> None:
        """FSDP2: copy the current trained weights and buffers into the replica (:attr:`full_model`),
        unless no update ran since the last copy. A collective: every process calls it at the same
        point (never inside :meth:`on_main`). Nothing to do without FSDP2."""
        if self._full is None or self._full_at == self.updates:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                        ignore_frozen_params=True))
        missing, unexpected = self._full.load_state_dict(sd, strict=False)
        if unexpected:
            raise RuntimeError(f"FSDP2 full state dict names parameters the replica lacks: {unexpected[:5]}")
        del sd
        full_buffers = dict(self._full.named_buffers())
        with torch.no_grad():   # buffers are not sharded; non-persistent ones (router load counts) are not in sd
            for name, buf in self.unwrapped.named_buffers():
                if name in full_buffers:
                    full_buffers[name].copy_(buf)
        self._full_at = self.updates

    def load_weights(self, path) -> None:
        """Copy the weights of checkpoint ``path`` into the trained model (resuming a stage). Under
        FSDP2 every process reads them into its replica, and each keeps its shard of them
        (``set_model_state_dict`` with the full state dict)."""
        from ccrl.models import load_weights_into

        if self._full is None:
            load_weights_into(self.unwrapped, path)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        load_weights_into(self._full, path)
        set_model_state_dict(self.model, self._full.state_dict(), options=StateDictOptions(full_state_dict=True))
        self._full_at = self.updates

    def full_optimizer_state(self) -> dict | None:
        """The optimizer's state dict as one process holds it (parameters numbered in group order,
        whole tensors). Under FSDP2 gathered from the shards into the main process's CPU memory (a
        collective; the other processes get None)."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.acc.is_main_process:
            return None
        state, groups, i = {}, [], 0
        for g in osd["param_groups"]:
            ids = []
            for fqn in g["params"]:
                if fqn in osd["state"]:
                    state[i] = osd["state"][fqn]
                ids.append(i)
                i += 1
            groups.append({**g, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_full_optimizer_state(self, sd: dict) -> None:
        """Load a state dict of :meth:`full_optimizer_state`'s layout (from either kind of run)."""
        if not self.fsdp:
            self.optimizer.load_state_dict(sd)
            return
        from accelerate.utils.fsdp_utils import fsdp2_canonicalize_names
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): n for n, p in fsdp2_canonicalize_names(dict(self.unwrapped.named_parameters())).items()}
        fqns = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        if len(fqns) != sum(len(g["params"]) for g in sd["param_groups"]):
            raise ValueError(f"the saved optimizer has {sum(len(g['params']) for g in sd['param_groups'])} "
                             f"parameters, this model {len(fqns)}")
        osd = {"state": {fqns[int(k)]: v for k, v in sd["state"].items()},
               "param_groups": [{**g, "params": [fqns[int(k)] for k in g["params"]]} for g in sd["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, osd, options=StateDictOptions(full_state_dict=True))

    def step_generator(self, step: int, salt: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded by (seed, stage, step, salt): the only randomness a step may use. On
        ``device`` (the CPU unless asked): one on the policy's device draws samples there, with no
        copy of the probabilities to the host and inside a CUDA graph (the seed is the same; the
        numbers drawn differ from the CPU's)."""
        g = torch.Generator(device=device)
        g.manual_seed(stream_seed(self.ctx.seed, self.ctx.stage_index, step, salt))
        return g

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def accumulating(self, last: bool):
        """Context of one micro-batch's forward/backward: gradients are reduced over the processes
        only in the last one of an update (DDP ``no_sync`` before it; nothing in one process)."""
        return contextlib.nullcontext() if last or self.world_size == 1 else self.acc.no_sync(self.model)

    def apply_lr_scale(self) -> None:
        """Set every parameter group's learning rate to the scheduled one times ``self.lr_scale``
        (1 unless a trainer adapts it, e.g. the RL stage's ``kl_guard``)."""
        for group, scheduled in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = scheduled * self.lr_scale

    def optimizer_step(self) -> float:
        """Clip, check for non-finite gradients, step optimizer and schedule. Returns the grad norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.stage.max_grad_norm > 0:
            norm = self.acc.clip_grad_norm_(params, self.stage.max_grad_norm)
        elif self.fsdp:   # each process holds a shard of every gradient: the norm of the whole (no clipping)
            norm = self.acc.clip_grad_norm_(params, math.inf)
        else:
            norm = torch.norm(torch.stack([p.grad.detach().norm() for p in params if p.grad is not None]))
        norm = float(norm)
        if self.world_size > 1 and self.all_reduce([self._nonfinite is not None], "max")[0]:
            # some process saw a non-finite loss (checked here, where every process is, not in check_finite)
            what, value = self._nonfinite or ("loss (on another process)", float("nan"))
            self._nonfinite = None
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(what, value)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged("gradient norm", norm)
        self.optimizer.step()
        self.scheduler.step()
        self.apply_lr_scale()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        from policies.interface import router_bias_update

        after = router_bias_update(self.unwrapped)
        if after is not None:
            self._sum_router_load()
            after()
        return norm

    def check_finite(self, loss: torch.Tensor, what: str = "loss") -> None:
        v = float(loss.detach())
        if not math.isfinite(v):
            if self.world_size > 1:
                # the other processes are about to join this backward's gradient reduction: stop at
                # the update instead, where every process learns of it (optimizer_step)
                self._nonfinite = self._nonfinite or (what, v)
                return
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(what, v)

    def _sum_router_load(self) -> None:
        """Sum the routers' token counts (``load_counts`` buffers) over the processes, so the
        aux-loss-free bias update (DeepSeek-V3) sees the global batch and stays the same everywhere."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        from policies.interface import router_load_buffers

        for buf in router_load_buffers(self.unwrapped):
            dist.all_reduce(buf)

    # ----------------------------------------------------------------- several processes

    @property
    def world_size(self) -> int:
        """W, the number of processes training together (1 without ``accelerate launch``)."""
        return self.acc.num_processes

    def check_processes(self) -> None:
        """Refuse what several processes cannot run: FSDP1, and step sizes the processes cannot split evenly."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.FSDP and not self.fsdp:
            raise RecipeError(
                f"stage {self.stage.name!r}: FSDP version 1 is not supported (its flattened parameters hide the "
                f"model's own parameters, which rollouts, LoRA adapters and checkpoints address by name); set "
                f"fsdp_version: 2 in the accelerate config's fsdp_config, or launch with DDP")
        W = self.world_size
        if W == 1:
            return
        for key, value in self.sharded_sizes().items():
            if value % W:
                raise RecipeError(
                    f"stage {self.stage.name!r}: {key}={value} is not a multiple of the {W} processes; each "
                    f"process trains an equal share of the step, so set stages.{self.stage.name}.{key} to a "
                    f"multiple of {W} (e.g. {W * max(1, round(value / W))})")

    def shard_slice(self, n: int) -> slice:
        """This process's contiguous share of a step's ``n`` rows (all of them in one process)."""
        k = n // self.world_size
        r = self.acc.process_index
        return slice(r * k, (r + 1) * k)

    def all_reduce(self, values, op: str = "sum") -> list[float]:
        """Element-wise sum / max / min over the processes of a list of numbers (one collective)."""
        values = [float(v) for v in values]
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=ops[op])
        return t.tolist()

    def all_gather(self, obj) -> list:
        """Every process's ``obj`` (picklable, tensors on the CPU), in process order; ``[obj]`` in one process."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn):
        """``fn()`` run by the main process only; every process returns its result (or raises the
        CcrlError it raised), so the others do not wait on a collective that never comes."""
        if self.world_size == 1:
            return fn()
        from accelerate.utils import broadcast_object_list

        from ccrl.errors import CcrlError

        box = [None]
        if self.acc.is_main_process:
            try:
                box = [("ok", fn())]
            except CcrlError as e:
                box = [("error", e)]
        broadcast_object_list(box, from_process=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def _diverged(self, what: str, value: float):
        # The update was skipped, so the weights are those of the previous step: keep them as the
        # last good checkpoint if they are finite; otherwise leave the last saved one in place.
        finite = self._weights_finite()
        last = self.checkpoint_dir(final=False)
        if finite:
            self.save(last)
            where = f"the last good weights (before step {self.step + 1}) were saved to {last}"
        elif last.exists():
            where = f"the weights are no longer finite; the last good checkpoint is {last}"
        else:
            where = "the weights are no longer finite; the last good checkpoint is the previous stage's"
        raise TrainingDiverged(
            f"stage {self.stage.name!r}: {what} became {value} at step {self.step + 1}; the update was skipped and "
            f"{where}. Lower the learning rate (stages.{self.stage.name}.lr) or the gradient clipping threshold "
            f"(max_grad_norm), then continue with --resume.")

    def _weights_finite(self) -> bool:
        """Whether every weight is finite (under FSDP2 checked on the full weights: a collective)."""
        self.gather_full_weights()
        return all(bool(torch.isfinite(p).all()) for p in self.full_model.parameters())

    def request_stop(self) -> None:
        """Finish the current step, write a checkpoint and raise StageInterrupted (SIGINT does this):
        an interruption that ``--resume`` continues. To end the stage normally instead (final
        checkpoint, held-out scores, the next stage runs), return True from a
        ``ccrl.Callback.on_step_end``."""
        self._stop_requested = True

    # ----------------------------------------------------------------- checkpoints

    def checkpoint_dir(self, final: bool) -> Path:
        name = self.stage.name if final else f"{self.stage.name}-last"
        return Path(self.ctx.output_dir) / name

    def trainer_state(self, complete: bool) -> dict:
        return {"stage": self.stage.name, "kind": self.kind, "step": self.step, "updates": self.updates,
                "complete": complete, "stopped_early": self.stopped_early, "stopped_by": self.stopped_by,
                "train_seconds": round(self.train_seconds, 3), "extra": self.extra_state()}

    def extra_state(self) -> dict:
        """Subclass state that must survive a resume (JSON-serialisable)."""
        return {}

    def load_extra_state(self, extra: dict) -> None:
        pass

    def save(self, path: Path, complete: bool = False) -> Path:
        """Write a checkpoint of the whole model and optimizer (the main process writes; under FSDP2
        every process first joins the gathering of the full weights and optimizer state)."""
        self.acc.wait_for_everyone()
        optimizer = None
        if self.fsdp:
            self.gather_full_weights()
            optimizer = self.full_optimizer_state()
        if self.acc.is_main_process:
            ckpt.save_checkpoint(path, self.full_model, self.tokenizer, state=self.trainer_state(complete),
                                 optimizer=self.optimizer, scheduler=self.scheduler, optimizer_state=optimizer)
        del optimizer
        self.acc.wait_for_everyone()
        if Path(path) == self.checkpoint_dir(final=False):
            self._saved_step = self.step
        return path

    def resume_from(self, path: Path) -> dict:
        """Restore step, optimizer, schedule, RNG and subclass state; returns the trainer state."""
        meta = ckpt.restore_training_state(path, self.optimizer, self.scheduler,
                                           load_optimizer=self.load_full_optimizer_state)
        self.step = int(meta["step"])
        self.updates = int(meta.get("updates", self.step))
        self.load_extra_state(meta.get("extra", {}))
        self._truncate_metrics(self.step)
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        if meta.get("complete"):
            self.stopped_early = bool(meta.get("stopped_early", False))
            self.stopped_by = meta.get("stopped_by") or ("early_stop" if self.stopped_early else None)
        else:
            self._saved_step = self.step
        return meta

    def _truncate_metrics(self, step: int) -> None:
        """Drop this stage's metric lines after ``step`` (written after the checkpoint we resume from)."""
        f = self._metrics_file
        if not f.exists() or not self.acc.is_main_process:
            return
        keep = []
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("stage") == self.stage.name and rec.get("step", 0) > step:
                continue
            keep.append(line)
        f.write_text("".join(x + "\n" for x in keep))

    # ----------------------------------------------------------------- the loop

    def log(self, record: dict) -> None:
        if not self.acc.is_main_process:
            return
        rec = {"stage": self.stage.name, "kind": self.kind, "step": self.step}
        rec.update({k: _plain(v) for k, v in record.items()})
        with open(self._metrics_file, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        self.track(record)

    def track(self, record: dict, prefix: str = "") -> None:
        """Send the numbers of ``record`` to the run's experiment trackers (``report_to``) as
        ``<stage>/<prefix><key>`` at step ``step_offset + step``; nothing without trackers."""
        if not getattr(self.acc, "trackers", None):
            return
        values = {}
        for k, v in record.items():
            v = _plain(v)
            if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
                values[f"{self.stage.name}/{prefix}{k}"] = float(v)
        if values:
            self.acc.log(values, step=self.ctx.step_offset + self.step)

    def callback_state(self):
        """Where the stage is, for the callbacks' hooks (``ccrl.callbacks.StageState``)."""
        from ccrl.callbacks import StageState

        return StageState(stage=self.stage.name, kind=self.stage.kind, index=self.ctx.stage_index, step=self.step,
                          steps=self.stage.steps, elapsed_s=self.train_seconds, output_dir=Path(self.ctx.output_dir),
                          stopped_by=self.stopped_by, trainer=self)

    def train(self, resume: Path | None = None) -> dict[str, float]:
        """Run the stage to completion, save its final checkpoint (``ctx.final_checkpoint``) and
        return the held-out metrics. ``resume``: an in-progress checkpoint to continue from, or the
        stage's complete final checkpoint (then only the held-out scoring runs)."""
        self.model.train()
        complete = False
        if resume is not None:
            complete = bool(self.resume_from(resume).get("complete"))
            if not complete:
                # interrupted at the very step that reached the early-stop threshold: the same weights give
                # the same greedy accuracy, so the stage is already over
                self.stopped_early = self._early_stop_check({})
                if self.stopped_early:
                    self.stopped_by = "early_stop"
                else:
                    self.stopped_by = self.budget_spent()
        self.callbacks.stage_start(self)
        if not complete:
            with self._stop_on_signals():
                try:
                    self._loop()
                except (StageInterrupted, TrainingDiverged):
                    raise                      # their checkpoint is written and their message says so
                except (Exception, KeyboardInterrupt) as err:
                    self._failed(err)
            if self.ctx.final_checkpoint is not None:
                self._save_final(Path(self.ctx.final_checkpoint))
        else:
            self._final_saved = True
        with self.scoring_guard():
            metrics = self.evaluate()
        self.callbacks.evaluate(self, metrics)
        return metrics

    def _time_is_up(self) -> bool:
        budget = getattr(self.stage, "max_seconds", None)
        return budget is not None and self.train_seconds >= budget and self.step < self.stage.steps

    def budget_spent(self) -> str | None:
        """Why the stage's budget ends it now (``max_seconds``, or a subclass's own budget such as RL's
        ``max_samples``), or None while there is budget left (or the stage is at its last step anyway)."""
        return "max_seconds" if self._time_is_up() else None

    def _loop(self) -> None:
        bar = None
        if self.ctx.show_progress and self.acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.stage.steps, initial=self.step, desc=self.stage.name, dynamic_ncols=True,
                       leave=False)
        start = time.perf_counter() - self.train_seconds
        try:
            while self.step < self.stage.steps and self.stopped_by is None:
                t0 = time.perf_counter()
                self._in_step, self._updates_at_step = True, self.updates
                metrics = self.training_step(self.step)
                self.step += 1
                self._in_step = False
                metrics["step_time_s"] = time.perf_counter() - t0
                metrics["lr"] = self.optimizer.param_groups[0]["lr"]   # the next update's, lr_scale included
                ntok = metrics.pop("_tokens", None)
                if ntok is not None:
                    metrics["tokens_per_s"] = ntok / max(metrics["step_time_s"], 1e-9)
                end = 0   # 1: a callback ends the stage, 2: its budget is spent (budget_spent says which)
                if self.stage.eval_every and self.step % self.stage.eval_every == 0 and self.step < self.stage.steps:
                    scores = self.evaluate()
                    metrics.update({f"eval/{k}": v for k, v in scores.items()})
                    self.model.train()
                    end = int(self.callbacks.evaluate(self, scores))
                self.stopped_early = self._early_stop_check(metrics)
                self.train_seconds = time.perf_counter() - start
                metrics["elapsed_s"] = self.train_seconds   # the clock max_seconds reads (evaluations included)
                spent = self.budget_spent()
                end = max(end, 2 * (spent is not None))
                logged = self.step % self.stage.log_every == 0 or self.step == self.stage.steps or self.stopped_early
                if logged:
                    self.log(metrics)
                end = max(end, int(self.callbacks.step_end(self, metrics)))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "reward", "tokens_per_s") if k in metrics})
                stop = self._stop_requested
                if self.world_size > 1:   # a stop or an end asked for in one process (SIGINT, a callback) applies to all
                    stop, end = (bool(v) if i == 0 else int(v) for i, v in enumerate(self.all_reduce([stop, end], "max")))
                if stop:
                    path = self.save(self.checkpoint_dir(final=False))
                    raise StageInterrupted(path)
                if self.stopped_early or (end and self.step < self.stage.steps):
                    self.stopped_by = "early_stop" if self.stopped_early else ("callback", spent or "max_seconds")[end - 1]
                    if not logged:
                        self.log(metrics)
                    break
                if self.stage.save_every and self.step % self.stage.save_every == 0 and self.step < self.stage.steps:
                    self.save(self.checkpoint_dir(final=False))
        finally:
            if bar is not None:
                bar.close()

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT and SIGTERM request a stop (finish the step, save, raise StageInterrupted)."""
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, lambda *_: self.request_stop())
            except ValueError:  # not the main thread
                pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ----------------------------------------------------------------- failures keep the last good weights

    def _save_final(self, final: Path) -> None:
        """The stage's final checkpoint (complete); then its in-progress one is no longer needed."""
        last = self.checkpoint_dir(final=False)
        try:
            self.save(final, complete=True)
        except CheckpointError as e:
            kept = self._kept_sentence(last)
            if self.world_size == 1 and self.step != self._saved_step:
                try:   # another folder may still be writable (or the failure was passing)
                    self.save(last)
                    kept = f"the trained weights (after step {self.step}) were saved to {last} instead"
                except CheckpointError:
                    pass
            raise _with_message(e, f"{e}. Stage {self.stage.name!r} finished training but its final checkpoint "
                                   f"could not be saved; {kept}. Free space and continue with --resume") from e
        self._final_saved = True
        if self.acc.is_main_process and last.exists():
            shutil.rmtree(last)

    @contextlib.contextmanager
    def scoring_guard(self):
        """Around held-out scoring after the final save: a failure there says the training is kept."""
        try:
            yield
        except (Exception, KeyboardInterrupt) as err:
            if not self._final_saved or isinstance(err, KeyboardInterrupt):
                raise
            final = self.ctx.final_checkpoint
            kept = (f"stage {self.stage.name!r} finished training and its final checkpoint {final} is saved; fix "
                    f"the cause and run again with --resume, which scores it without training again")
            if isinstance(err, CcrlError):
                raise _with_message(err, f"held-out scoring failed: {err}. Nothing is lost: {kept}") from err
            err.add_note(f"ccrl: held-out scoring failed; {kept}")
            raise

    def _failed(self, err: BaseException):
        """Keep the last good weights (see the module docstring), then raise ``err`` saying so."""
        saved, kept = self._keep_last_good(err)
        where = f"stage {self.stage.name!r} stopped after {self.step} of {self.stage.steps} steps"
        if isinstance(err, KeyboardInterrupt):
            if saved is not None:
                raise StageInterrupted(saved) from err
            raise KeyboardInterrupt(f"interrupted; {where}; {kept}") from err
        again = "fix the cause, then continue with --resume"
        if isinstance(err, CcrlError):
            raise _with_message(err, f"{err}. {where[0].upper()}{where[1:]}; {kept}; {again}") from err
        err.add_note(f"ccrl: {where}; {kept}; {again}")
        raise err

    def _keep_last_good(self, err: BaseException) -> tuple[Path | None, str]:
        """(the in-progress checkpoint written now or None, a sentence saying what is kept)."""
        last = self.checkpoint_dir(final=False)
        if isinstance(err, ckpt.CheckpointWriteError) or self.world_size > 1:
            return None, self._kept_sentence(last)
        if self._in_step and self.updates != self._updates_at_step:
            return None, "the weights were mid-update when it failed, so " + self._kept_sentence(last)
        if self.step == 0 or self.step == self._saved_step:
            return None, self._kept_sentence(last)
        if not self._weights_finite():
            return None, "the weights are no longer finite, so " + self._kept_sentence(last)
        try:
            self.save(last)
        except CheckpointError as e:
            return None, f"saving the last good weights failed too ({e}); " + self._kept_sentence(last)
        return last, f"the last good weights (after step {self.step}) were saved to {last}"

    def _kept_sentence(self, last: Path) -> str:
        if (last / ckpt.STATE_JSON).exists():
            try:
                step = json.loads((last / ckpt.STATE_JSON).read_text()).get("step", "?")
            except (OSError, ValueError):
                step = "?"
            return f"the last checkpoint of this stage, {last} (after step {step}), is kept"
        if self.ctx.stage_index > 0:
            return "no checkpoint of this stage was written yet; the previous stage's checkpoint is kept"
        return "no checkpoint of this stage was written yet"


def enable_gradient_checkpointing(model, stage_name: str) -> None:
    """Turn on the activation checkpointing of a transformers model (through a PEFT wrapper too):
    ``activation_checkpointing_enable`` where the installed transformers has it, else its older name
    ``gradient_checkpointing_enable``; non-reentrant checkpoints (no input needs ``requires_grad``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise RecipeError(f"stages.{stage_name}.gradient_checkpointing: the model ({type(base).__name__}) does not "
                          f"support activation checkpointing; set it to false")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _with_message(err: CcrlError, msg: str) -> CcrlError:
    """An error of the same class as ``err`` with message ``msg`` (a CcrlError if it cannot be built)."""
    try:
        new = type(err)(msg)
    except Exception:  # a subclass with another constructor
        new = CcrlError(msg)
    return new if str(new) == msg else CcrlError(msg)


def _plain(v):
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    return v
