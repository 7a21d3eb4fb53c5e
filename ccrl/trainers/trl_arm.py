"""TRL's ``GRPOTrainer`` as an arm of ccrl: an rl stage with ``trainer: trl``.

Why. A comparison of ccrl's objectives needs an outside reference: the same RL stage trained by
the trainer most people use. With ``trainer: trl`` the stage is trained by TRL's own
``GRPOTrainer`` (trl 1.16 or newer) from the same checkpoint, on the same prompts, with the same
reward functions and the same budget as ccrl's RL trainer, and it leaves what ccrl's trainer
leaves: ``metrics.jsonl`` lines under ccrl's names, held-out accuracy every ``eval_every`` steps
from ccrl's own evaluation, a normal ccrl checkpoint (``ccrl eval`` and the next stage read it)
and the stage's summary entry. ``ccrl compare`` then reports it like any other arm.

How.

- Settings: :func:`grpo_config_kwargs` maps the stage to ``GRPOConfig`` (docs/trl-mapping.md):
  ``steps`` → ``max_steps``; ``prompts_per_step · group_size`` completions per optimizer step →
  ``per_device_train_batch_size`` (or ``micro_batch_size`` per pass, with gradient accumulation
  over the rest) and ``num_generations = group_size``; ``max_new_tokens`` →
  ``max_completion_length``; ``temperature``, ``top_p``, ``top_k``; the objective's resolved
  settings (``ccrl.objectives`` registry) → ``epsilon``, ``epsilon_high``, ``beta`` (``kl_beta``),
  ``scale_rewards``, ``importance_sampling_level`` and ``loss_type`` from the aggregation
  (sequence → ``"grpo"``, token → ``"dapo"``, constant → ``"dr_grpo"``; so ``objective: grpo``,
  ``dapo`` / ``trl_dapo``, ``dr_grpo`` and ``gspo`` map); ``max_grad_norm``,
  ``gradient_checkpointing``, ``router_aux_coef``; the recipe's seed, device and mixed precision.
- Optimizer and schedule: ccrl's own, handed to ``GRPOTrainer(optimizers=...)``: AdamW over the
  same parameter groups (``quantized_lr_scale``), ``adam_betas``, ``adam_epsilon``,
  ``weight_decay``, and ``lr_schedule`` / ``warmup_steps`` / ``min_lr_ratio`` through
  ``ccrl.trainers.base.lr_lambda``, so these keys mean what they mean for ccrl's trainer.
- Rewards: each recipe reward is one TRL reward function of the same name (:class:`RewardBridge`),
  its weight in ``reward_weights`` (a cost such as ``ice`` with its weight negated, as V_Ω
  subtracts it), called with the keyword arguments ccrl's trainer passes (the dataset's columns,
  ``completion_ids``, ``completion_lengths``, ``max_completion_length``, ``answer_ids``,
  ``eos_token_id``, ``trainer_state``, the policy's parameter counts, ``log_metric``,
  ``log_extra``); DAPO's overlong shaping (``overlong_cache`` > 0) is ccrl's ``overlong`` reward
  with weight ``overlong_weight``. TRL's ``reward`` metric is then V_Ω as ccrl logs it.
- A council policy (Quillan, ``CouncilHead``): TRL's fused LM head would score
  log_softmax(lm_head(h)) instead of the council mixture π_Ω the policy samples from;
  :func:`score_with_model_logits` makes the training forward (and the KL reference's) use the
  model's own logits.
- A ``TrainerCallback`` (:func:`_arm_callback_class`) times each step, runs ccrl's held-out evaluation every
  ``eval_every`` steps, writes the ``metrics.jsonl`` lines (TRL's logged values under ccrl's
  names, :data:`TRL_METRICS`; the others as ``trl/<name>``; plus ``accuracy``, ``lr``,
  ``step_time_s``, ``tokens_per_s``, ``elapsed_s``, ``samples``), calls the recipe's
  ``ccrl.Callback`` hooks, and ends training at the budget by setting
  ``control.should_training_stop``: ``max_seconds`` against the training clock started at
  ``on_train_begin`` (evaluations included, as for ccrl's trainer), ``max_samples`` against the
  completions generated.

Refused (``ccrl check`` exits 2 naming each key, :func:`check_trl_stage`): ``objective: ccrl``
(its council entropy bonus has no TRL loss; named as ``stages[i].trainer``), dynamic sampling
(``dapo`` turns it on: set ``dynamic_sampling: false``), ``advantage_clip``, ``ppo_epochs`` other
than 1, ``early_stop``, ``save_every``, ``log_completions_every``, an explicit
``routing_replay: true``, ``packed_rollout: true``, ``cuda_graph: true``, a ``micro_batch_size``
that does not divide the step's completions, and rewards that read the rollout's council
statistics (``council_weights``, ``chosen_token_probs``: TRL's generation does not record them).
At run time: more than one process.

Differences that are not refused: TRL samples with ``model.generate`` and tokenizes prompts
itself (its tokenizer's special tokens), draws its own random numbers from the seed, routes the
training forward afresh (no routing replay), logs ``kl`` only with ``kl_beta`` > 0 and no council
entropy or persona usage, and keeps no in-progress checkpoint: an interrupted stage is trained
again from its start by ``--resume``.

TRL is imported only when a stage with ``trainer: trl`` runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ccrl.errors import CcrlError, RecipeError

LOSS_TYPES = {"sequence": "grpo", "token": "dapo", "constant": "dr_grpo"}
"""ccrl's loss aggregation → TRL's ``loss_type`` with that normaliser"""

TRL_METRICS = {
    "loss": "loss", "grad_norm": "grad_norm", "reward": "reward", "reward_std": "reward_std",
    "frac_reward_zero_std": "frac_reward_zero_std", "kl": "kl", "entropy": "entropy", "aux_loss": "aux_loss",
    "completions/mean_length": "completion_tokens", "completions/clipped_ratio": "truncated_frac",
    "clip_ratio/low_mean": "clip_frac/low", "clip_ratio/high_mean": "clip_frac/high",
    "clip_ratio/region_mean": "clip_frac",
}
"""TRL's logged name → ccrl's ``metrics.jsonl`` name (``rewards/<name>/mean`` becomes ``reward/<name>``;
other numbers TRL logs are kept as ``trl/<name>``)"""

COUNCIL_STATISTICS = ("council_weights", "chosen_token_probs")
"""reward arguments that come from the rollout's council record, which TRL's generation does not keep"""


# --------------------------------------------------------------------------- what maps, what is refused


def trl_problems(stage, raw: dict, where: str, rewards: list | None = None,
                 rewards_key: str | None = None) -> list[str]:
    """What the TRL arm cannot honour in rl stage ``stage`` (``raw``: the keys the recipe wrote for
    it; ``rewards``: its reward specs, default ``stage.rewards``, found at ``rewards_key``, default
    ``<where>.rewards``), one ``"<key>: why"`` clause each; empty when the stage maps onto ``GRPOConfig``."""
    from ccrl.objectives import get_objective
    from ccrl.trainers.rl import resolve_hparams

    spec = get_objective(stage.objective)
    if spec.council:
        return [f"{where}.trainer: trl cannot train objective {stage.objective!r}: its council entropy bonus has no "
                f"TRL loss_type; use trainer: ccrl, or objective grpo, dapo, trl_dapo, dr_grpo or gspo"]
    hp = resolve_hparams(stage, spec)
    out = []

    def refuse(key: str, why: str) -> None:
        out.append(f"{where}.{key}: {why}")

    if hp["dynamic_sampling"]:
        refuse("dynamic_sampling", f"TRL's GRPOTrainer has no dynamic sampling (objective {stage.objective!r} turns "
                                   f"it on); set dynamic_sampling: false")
    if hp["advantage_clip"] is not None:
        refuse("advantage_clip", "TRL's GRPOTrainer does not clip advantages; remove the key")
    if stage.ppo_epochs != 1:
        refuse("ppo_epochs", f"the TRL arm runs one update per rollout (num_iterations 1), got {stage.ppo_epochs}")
    if stage.early_stop is not None:
        refuse("early_stop", "the TRL arm has no early stop; use max_seconds or max_samples")
    if stage.kl_guard:
        refuse("kl_guard", "TRL's GRPOTrainer has no trust region on the update's KL; remove the key")
    if stage.save_every:
        refuse("save_every", "the TRL arm keeps no in-progress checkpoints (an interrupted stage is trained again "
                             "from its start); set save_every: 0")
    if stage.log_completions_every:
        refuse("log_completions_every", "the TRL arm does not write ccrl's completions table; set it to 0")
    if raw.get("routing_replay") is True:
        refuse("routing_replay", "TRL's training forward routes afresh (no routing replay); set routing_replay: false")
    if stage.packed_rollout is True:
        refuse("packed_rollout", "TRL samples with model.generate, not ccrl's packed rollout; set it to auto or false")
    if stage.cuda_graph is True:
        refuse("cuda_graph", "TRL samples with model.generate, not ccrl's CUDA-graph decoding; set it to auto or false")
    n = stage.prompts_per_step * stage.group_size
    if stage.micro_batch_size is not None and n % stage.micro_batch_size:
        refuse("micro_batch_size", f"must divide the step's {n} completions (prompts_per_step × group_size) for "
                                   f"TRL's gradient accumulation, got {stage.micro_batch_size}")
    rewards_key = rewards_key or f"{where}.rewards"
    for j, r in enumerate(stage.rewards if rewards is None else rewards):
        read = _council_arguments(r.name)
        if read:
            out.append(f"{rewards_key}[{j}]: reward {r.name!r} reads {', '.join(read)}, which TRL's generation does "
                       f"not record; {where} (trainer: trl) needs rewards without it")
    return out


def check_trl_stage(stage, raw: dict, where: str, source: str, rewards: list | None = None,
                    rewards_key: str | None = None) -> None:
    """Raise :class:`RecipeError` listing every key of an rl stage with ``trainer: trl`` that TRL's
    GRPOTrainer cannot honour (``ccrl check`` and the run call it before anything trains)."""
    problems = trl_problems(stage, raw, where, rewards, rewards_key)
    if len(problems) == 1:
        raise RecipeError(f"{source}: {problems[0]}")
    if problems:
        raise RecipeError(f"{source}: {where}.trainer: trl cannot honour {len(problems)} keys of this stage: "
                          + "; ".join(problems))


def _council_arguments(name: str) -> list[str]:
    import rewards

    try:
        params = inspect.signature(rewards.resolve(name)).parameters
    except (TypeError, ValueError, CcrlError):
        return []
    return [p for p in COUNCIL_STATISTICS if p in params]


def grpo_config_kwargs(stage, hp: dict, *, seed: int, output_dir: str, cpu: bool, mixed_precision: str) -> dict:
    """The ``GRPOConfig`` arguments of an rl stage (``hp``: its resolved objective settings,
    ``ccrl.trainers.rl.resolve_hparams``). The optimizer and schedule are passed separately."""
    n = stage.prompts_per_step * stage.group_size
    mb = stage.micro_batch_size or n
    kwargs = dict(
        output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_vllm=False, use_cpu=cpu, bf16=mixed_precision == "bf16", fp16=mixed_precision == "fp16",
        seed=seed, dataloader_num_workers=0,
        loss_type=LOSS_TYPES[hp["aggregation"]], scale_rewards=hp["scale"],
        epsilon=hp["eps_low"], epsilon_high=hp["eps_high"], beta=hp["kl_beta"],
        importance_sampling_level=hp["importance_sampling_level"], num_iterations=1,
        num_generations=stage.group_size, per_device_train_batch_size=mb, gradient_accumulation_steps=n // mb,
        max_steps=stage.steps, max_completion_length=stage.max_new_tokens,
        temperature=stage.temperature, top_p=stage.top_p, top_k=stage.top_k,
        learning_rate=stage.lr, warmup_steps=stage.warmup_steps, weight_decay=stage.weight_decay,
        adam_beta1=stage.adam_betas[0], adam_beta2=stage.adam_betas[1], adam_epsilon=stage.adam_epsilon,
        max_grad_norm=stage.max_grad_norm, gradient_checkpointing=stage.gradient_checkpointing,
    )
    if stage.router_aux_coef is not None:
        kwargs["router_aux_loss_coef"] = stage.router_aux_coef
    from trl import GRPOConfig

    if "activation_checkpointing" in {f.name for f in dataclasses.fields(GRPOConfig)}:
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")   # its newer name
    return kwargs


# --------------------------------------------------------------------------- the council policy under TRL


def score_with_model_logits(model, temperature: float) -> None:
    """Make TRL's training forward score completions with the model's own distribution.

    TRL 1.16's ``GRPOTrainer`` patches the model (``trl.trainer.utils.add_fused_lm_head``): called
    with ``fused_lm_head=True`` it runs the backbone (``model.base_model``) and computes the
    log-probabilities as log_softmax(lm_head(h) / T). For a plain causal LM that is the model's
    distribution. A council policy's distribution is the mixture (its ``logits`` are log π_Ω from
    the overseer and persona heads on top of h), so the patch would train a different
    distribution than the one ``generate`` samples (the overseer and persona heads get no
    gradient) and skip the council head's work. This replaces the patch with the model's own
    forward, as TRL scored before the fused head: ``logits_to_keep`` = the labelled positions + 1,
    log_softmax(logits / T) gathered at the labels, the entropy alongside (no gradient), the
    model's own load-balance ``aux_loss``; returned in TRL's ``FusedCausalLMOutput``."""
    import functools
    import types

    from trl.trainer.utils import FusedCausalLMOutput

    own = type(model).forward

    @functools.wraps(own)                       # generate validates its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            return own(self, *args, **kwargs)
        target = labels[:, 1:]                                                    # (B, S-1) label of each next token
        mask = target != -100
        keep = target.shape[1] - int(mask.any(0).int().argmax())                  # trailing labelled columns
        out = own(self, *args, use_cache=False, logits_to_keep=keep + 1, **kwargs)
        logp = (out.logits[:, :-1].float() / temperature).log_softmax(-1)         # (B, keep, V)
        tail, tail_mask = target[:, -keep:], mask[:, -keep:]
        lp = logp.gather(-1, tail.clamp(min=0).unsqueeze(-1)).squeeze(-1)         # (B, keep)
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)                                    # (B, keep)
        pad = target.shape[1] - keep
        log_probs = torch.cat([lp.new_zeros(lp.shape[0], pad), lp.masked_fill(~tail_mask, 0.0)], dim=1)
        entropy = torch.cat([ent.new_zeros(ent.shape[0], pad), ent.masked_fill(~tail_mask, 0.0)], dim=1)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy,
                                   label_mask=mask, aux_loss=out.aux_loss)

    model.forward = types.MethodType(forward, model)


@contextlib.contextmanager
def _reference_from(model):
    """While TRL builds its KL reference (``beta`` > 0, no adapters), hand it a frozen copy of the
    stage's starting weights instead of reloading ``config._name_or_path`` (a model built from a
    preset has no such folder): what ccrl's trainer keeps as its reference."""
    import trl.trainer.grpo_trainer as grpo

    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    original = grpo.create_model_from_path
    grpo.create_model_from_path = lambda *_args, **_kwargs: frozen
    try:
        yield
    finally:
        grpo.create_model_from_path = original


# --------------------------------------------------------------------------- rewards


class RewardBridge:
    """The stage's ccrl rewards as TRL reward functions, one per recipe reward (and ``overlong`` for
    DAPO's shaping), with ccrl's keyword arguments.

    TRL calls each function with the batch's prompts, completions, ``completion_ids`` and the
    dataset's columns; the dataset has a ``ccrl_row`` column (the index of the training example),
    from which the ccrl arguments are rebuilt once per batch (the functions of one batch get the
    same ``completion_ids`` list). The first function of a batch also records the batch's task
    accuracy, logged as ``accuracy`` as ccrl's trainer does."""

    def __init__(self, stage, ctx, model, hp: dict):
        from ccrl.scoring import RewardSet, parameter_counts

        self.stage, self.ctx = stage, ctx
        self.set = RewardSet(stage.rewards)
        self.counts = parameter_counts(model)
        self.device = next(model.parameters()).device
        self.step = 0                                   # completed optimizer steps (the callback keeps it)
        self._ids = None
        self._kwargs: dict = {}
        self._correct: list[float] = []
        self.functions, self.weights = [], []
        for name, fn, weight in zip(self.set.names, self.set.fns, self.set.weights):
            self.functions.append(self._wrap(name, fn))
            self.weights.append(weight)
        self.overlong_cache = hp["overlong_cache"]
        if self.overlong_cache > 0:
            import rewards

            self.functions.append(self._wrap("overlong", rewards.get("overlong"), overlong=True))
            self.weights.append(float(stage.overlong_weight))

    def _wrap(self, name: str, fn, overlong: bool = False):
        import rewards

        def reward(prompts, completions, completion_ids, **kwargs):
            kw = self.kwargs(prompts, completions, completion_ids, kwargs)
            if overlong:
                kw = {**kw, "overlong_cache": self.overlong_cache}
                prompts = [e.prompt for e in kw["_examples"]]
            kw = {k: v for k, v in kw.items() if k != "_examples"}
            return rewards.call_reward(fn, name, prompts, completions, **kw)

        reward.__name__ = reward.__qualname__ = name
        return reward

    def kwargs(self, prompts, completions, completion_ids, trl_kwargs: dict) -> dict:
        """ccrl's reward arguments for this batch (computed by its first function, reused by the rest)."""
        if completion_ids is self._ids:
            return self._kwargs
        from ccrl.scoring import RewardState, answer_ids

        examples = [self.ctx.train_examples[int(i)] for i in trl_kwargs["ccrl_row"]]
        ids = [list(x) for x in completion_ids]
        kw: dict[str, Any] = {
            "answer": [e.answer for e in examples], "completion_ids": ids,
            "completion_lengths": [len(x) for x in ids], "max_completion_length": self.stage.max_new_tokens,
        }
        for key in sorted({k for e in examples for k in e.extra}):
            kw[key] = [e.extra.get(key) for e in examples]
        tok = self.ctx.tokenizer
        kw.update(trainer_state=RewardState(global_step=self.step, max_steps=self.stage.steps, stage=self.stage.name),
                  answer_ids=answer_ids(tok, kw["answer"]), eos_token_id=tok.eos_token_id,
                  log_metric=self.set.log_metric, log_extra=self.set.log_extra, policy_device=self.device)
        if self.counts is not None:
            kw["active_params_per_token"], kw["total_params"] = self.counts
        kw["_examples"] = examples
        self._ids, self._kwargs = completion_ids, kw
        self._record_accuracy(completions, examples)
        return kw

    def _record_accuracy(self, completions, examples) -> None:
        task = self.ctx.task
        if task is None or any(e.answer is None for e in examples):
            return
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        self._correct.extend(float(task.is_correct(t, e)) for t, e in zip(texts, examples))

    def pop_step_metrics(self) -> dict[str, float]:
        """The step's ``accuracy`` and the means of what the rewards passed to ``log_metric``."""
        from ccrl.scoring import merge_logged

        out = merge_logged([self.set.pop_logged()])
        if self._correct:
            out["accuracy"] = sum(self._correct) / len(self._correct)
        self._correct = []
        return out


# --------------------------------------------------------------------------- the trainer


class TRLArmTrainer:
    """An rl stage trained by TRL's ``GRPOTrainer``; the pipeline drives it as it drives
    ``ccrl.trainers.rl.RLTrainer`` (``train``, ``step``, ``stopped_by``, ``track``, ``callbacks``,
    ``load_weights``). See the module docstring."""

    kind = "rl"

    def __init__(self, stage, model, ctx):
        from ccrl.callbacks import CallbackHandler
        from ccrl.objectives import get_objective
        from ccrl.trainers.rl import resolve_hparams

        if ctx.accelerator.num_processes > 1:
            raise RecipeError(f"stages.{stage.name}.trainer: trl runs in one process; launch without accelerate's "
                              f"several processes, or use trainer: ccrl")
        problems = trl_problems(stage, {}, f"stages.{stage.name}")
        if problems:
            raise RecipeError("; ".join(problems))
        self.stage, self.ctx, self.model = stage, ctx, model
        self.tokenizer = ctx.tokenizer
        self.hp = resolve_hparams(stage, get_objective(stage.objective))
        self.callbacks = CallbackHandler(ctx.callbacks)
        self.step = 0
        self.samples = 0
        self.train_seconds = 0.0
        self.stopped_by: str | None = None
        self.stopped_early = False
        self.early_stop_last = None
        self.early_stop_sample: list = []
        self.per_step = stage.prompts_per_step * stage.group_size
        self._metrics_file = Path(ctx.output_dir) / "metrics.jsonl"
        self._stop_requested = False
        self.trl = None                      # the GRPOTrainer, while the stage trains
        self.optimizer = self.scheduler = None

    # ----------------------------------------------------------------- what the pipeline reads

    @property
    def unwrapped(self):
        return self.model

    @property
    def sampling_model(self):
        return self.model

    def callback_state(self):
        from ccrl.callbacks import StageState

        return StageState(stage=self.stage.name, kind=self.stage.kind, index=self.ctx.stage_index, step=self.step,
                          steps=self.stage.steps, elapsed_s=self.train_seconds, output_dir=Path(self.ctx.output_dir),
                          stopped_by=self.stopped_by, trainer=self)

    def request_stop(self) -> None:
        """Interrupt the run after the current step (as SIGINT does); the TRL arm keeps no in-progress
        checkpoint, so ``--resume`` trains the stage again from its start."""
        self._stop_requested = True

    def track(self, record: dict, prefix: str = "") -> None:
        """The numbers of ``record`` to the run's experiment trackers, as ``Trainer.track`` sends them."""
        acc = self.ctx.accelerator
        if not getattr(acc, "trackers", None):
            return
        values = {f"{self.stage.name}/{prefix}{k}": float(v) for k, v in record.items()
                  if isinstance(v, (bool, int, float)) and math.isfinite(float(v))}
        if values:
            acc.log(values, step=self.ctx.step_offset + self.step)

    def load_weights(self, path) -> None:
        from ccrl.models import load_weights_into

        load_weights_into(self.model, path)

    def evaluate(self) -> dict[str, float]:
        """ccrl's held-out evaluation of the current weights (greedy decoding, task accuracy, V_Ω terms)."""
        from ccrl.evaluation import evaluate_policy
        from ccrl.scoring import RewardState

        was_training = self.model.training
        self.model.eval()
        try:
            state = RewardState(global_step=self.step, max_steps=self.stage.steps, stage=self.stage.name)
            return evaluate_policy(self.model, self.ctx, state=state)
        finally:
            self.model.train(was_training)

    # ----------------------------------------------------------------- the stage

    def train(self, resume: Path | None = None) -> dict[str, float]:
        """Train the stage with GRPOTrainer (or, given the stage's complete final checkpoint, only
        score it), save the final checkpoint, return the held-out metrics."""
        if resume is not None:
            self._restore(Path(resume))
        else:
            self._forget_earlier_lines()
            self.callbacks.stage_start(self)
            self._train()
            if self.ctx.final_checkpoint is not None:
                self._save(Path(self.ctx.final_checkpoint))
        metrics = self.evaluate()
        self.callbacks.evaluate(self, metrics)
        return metrics

    def _train(self) -> None:
        with tempfile.TemporaryDirectory(prefix="ccrl-trl-") as scratch, warnings.catch_warnings():
            # TRL's own calls of transformers' renamed gradient-checkpointing API
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
            trainer = self._grpo_trainer(scratch)
            self.trl = trainer
            try:
                trainer.train()
            except KeyboardInterrupt as err:
                raise KeyboardInterrupt(f"interrupted; {self._where()}") from err
            except CcrlError as err:
                from ccrl.trainers.base import _with_message

                raise _with_message(err, f"{err}. {self._where()[0].upper()}{self._where()[1:]}") from err
            except Exception as err:
                err.add_note(f"ccrl: {self._where()}")
                raise
            finally:
                self.trl = None
        self.model = trainer.accelerator.unwrap_model(trainer.model)
        if self._stop_requested:
            raise KeyboardInterrupt(f"interrupted; {self._where()}")

    def _grpo_trainer(self, scratch: str):
        """GRPOTrainer on the stage's model, data and rewards, with ccrl's optimizer and schedule and the
        arm's callback; its output folder is ``scratch`` (it saves nothing there)."""
        from transformers import PrinterCallback, ProgressCallback
        from trl import GRPOConfig, GRPOTrainer

        from policies import interface as policy_api

        is_peft = hasattr(self.model, "disable_adapter") and hasattr(self.model, "get_base_model")
        self.optimizer, self.scheduler = self._optimizer()
        bridge = RewardBridge(self.stage, self.ctx, self.model, self.hp)
        acc = self.ctx.accelerator
        kwargs = grpo_config_kwargs(self.stage, self.hp, seed=self.ctx.seed, output_dir=scratch,
                                    cpu=acc.device.type == "cpu", mixed_precision=str(acc.mixed_precision))
        config = GRPOConfig(**kwargs, reward_weights=bridge.weights)
        with _reference_from(self.model) if self.hp["kl_beta"] > 0 and not is_peft else contextlib.nullcontext():
            trainer = GRPOTrainer(model=self.model, reward_funcs=bridge.functions, args=config,
                                  train_dataset=self._dataset(), processing_class=self.tokenizer,
                                  callbacks=[_arm_callback_class()(self, bridge)],
                                  optimizers=(self.optimizer, self.scheduler))
        for cls in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cls)
        if policy_api.has_council(self.model):
            score_with_model_logits(trainer.model, trainer.temperature)
            if trainer.ref_model is not None:
                score_with_model_logits(trainer.ref_model, trainer.temperature)
        return trainer

    def _where(self) -> str:
        return (f"stage {self.stage.name!r} (trainer: trl) stopped after {self.step} of {self.stage.steps} steps; "
                f"the TRL arm keeps no in-progress checkpoint, so --resume trains the stage again from the previous "
                f"stage's checkpoint")

    def _optimizer(self):
        """ccrl's AdamW (same parameter groups, betas, eps, weight decay) and learning-rate schedule."""
        from ccrl.trainers.base import Trainer, lr_lambda

        st = self.stage
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {st.name}: the model has no trainable parameters")
        groups = Trainer.param_groups(self, self.model, params)   # reads only self.stage: the same groups
        optimizer = torch.optim.AdamW(groups, lr=st.lr, weight_decay=st.weight_decay, betas=tuple(st.adam_betas),
                                      eps=st.adam_epsilon, foreach=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(st.lr_schedule, st.warmup_steps, st.steps, st.min_lr_ratio))
        return optimizer, scheduler

    def _dataset(self):
        """The stage's training examples as TRL rows: ``prompt`` (text, or messages for conversational
        data) and ``ccrl_row`` (the example's index, from which the rewards' arguments are rebuilt)."""
        from datasets import Dataset

        rows = [{"prompt": e.messages if e.messages is not None else e.prompt, "ccrl_row": i}
                for i, e in enumerate(self.ctx.train_examples)]
        return Dataset.from_list(rows)

    def log_step(self, metrics: dict) -> None:
        """One ``metrics.jsonl`` line (the main process writes), and the trackers."""
        rec = {"stage": self.stage.name, "kind": self.kind, "step": self.step}
        rec.update(metrics)
        if self.ctx.accelerator.is_main_process:
            with open(self._metrics_file, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        self.track(metrics)

    def _forget_earlier_lines(self) -> None:
        """A stage started again (after an interruption) drops the lines its earlier attempt wrote."""
        f = self._metrics_file
        if not f.exists() or not self.ctx.accelerator.is_main_process:
            return
        keep = [x for x in f.read_text().splitlines() if x.strip() and json.loads(x).get("stage") != self.stage.name]
        f.write_text("".join(x + "\n" for x in keep))

    def trainer_state(self) -> dict:
        return {"stage": self.stage.name, "kind": self.kind, "step": self.step, "updates": self.step,
                "complete": True, "stopped_early": False, "stopped_by": self.stopped_by,
                "train_seconds": round(self.train_seconds, 3),
                "extra": {"trainer": "trl", "samples": self.samples}}

    def _save(self, path: Path) -> None:
        from ccrl import checkpoint as ckpt

        if self.ctx.accelerator.is_main_process:
            ckpt.save_checkpoint(path, self.model, self.tokenizer, state=self.trainer_state(),
                                 optimizer=self.optimizer, scheduler=self.scheduler)

    def _restore(self, path: Path) -> None:
        """The stage's complete final checkpoint: what it recorded (its weights are loaded already)."""
        from ccrl.checkpoint import STATE_JSON

        meta = json.loads((path / STATE_JSON).read_text())
        self.step = int(meta.get("step", 0))
        self.stopped_by = meta.get("stopped_by")
        self.train_seconds = float(meta.get("train_seconds", 0.0))
        self.samples = int(meta.get("extra", {}).get("samples", 0))


def _arm_callback_class():
    """The arm's ``TrainerCallback`` subclass (defined when a stage runs: transformers loads lazily)."""
    from transformers import TrainerCallback

    class ArmCallback(TrainerCallback):
        """Times each step, evaluates, writes the metrics lines and ends training at the budget."""

        def __init__(self, arm: TRLArmTrainer, bridge: RewardBridge):
            self.arm, self.bridge = arm, bridge
            self.t0 = self.step_t0 = 0.0
            self.step_time = 0.0
            self.evals: dict = {}
            self.stopping = False
            self.logged = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            arm, st = self.arm, self.arm.stage
            self.step_time = time.perf_counter() - self.step_t0
            arm.step = self.bridge.step = state.global_step
            arm.samples += arm.per_step
            self.evals = {}
            if st.eval_every and arm.step % st.eval_every == 0 and arm.step < st.steps:
                scores = arm.evaluate()
                self.evals = {f"eval/{k}": v for k, v in scores.items()}
                if arm.callbacks.evaluate(arm, scores):
                    self._stop(control, "callback")
            arm.train_seconds = time.perf_counter() - self.t0
            if arm.step < st.steps:
                if st.max_seconds is not None and arm.train_seconds >= st.max_seconds:
                    self._stop(control, "max_seconds")
                elif st.max_samples is not None and arm.samples >= st.max_samples:
                    self._stop(control, "max_samples")
            if arm._stop_requested:
                control.should_training_stop = True
                self.stopping = True
            return control

        def _stop(self, control, why: str) -> None:
            self.arm.stopped_by = self.arm.stopped_by or why
            control.should_training_stop = True
            self.stopping = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            arm, st = self.arm, self.arm.stage
            if not logs or "loss" not in logs or state.global_step <= self.logged:
                return control
            self.logged = state.global_step
            metrics = trl_row(logs)
            metrics.update(self.bridge.pop_step_metrics())
            metrics["lr"] = arm.scheduler.get_last_lr()[0]
            metrics["step_time_s"] = self.step_time
            if "completion_tokens" in metrics:
                metrics["tokens_per_s"] = metrics["completion_tokens"] * arm.per_step / max(self.step_time, 1e-9)
            metrics.update(self.evals)
            metrics["elapsed_s"] = arm.train_seconds
            metrics["samples"] = arm.samples
            if arm.step % st.log_every == 0 or arm.step == st.steps or self.stopping:
                arm.log_step(metrics)
            if arm.callbacks.step_end(arm, metrics) and arm.step < st.steps:
                self._stop(control, "callback")
            return control

    return ArmCallback


def trl_row(logs: dict) -> dict[str, float]:
    """TRL's logged values of one step under ccrl's ``metrics.jsonl`` names (:data:`TRL_METRICS`):
    ``rewards/<name>/mean`` → ``reward/<name>``, ``value`` = ``reward`` (V_Ω, as ccrl logs both),
    every other number as ``trl/<name>``; ``learning_rate`` is left to the caller's ``lr``.

    >>> trl_row({"loss": 0.5, "reward": 1.0, "rewards/exact_match/mean": 1.0, "num_tokens": 7.0})
    {'loss': 0.5, 'reward': 1.0, 'reward/exact_match': 1.0, 'trl/num_tokens': 7.0, 'value': 1.0}
    """
    out: dict[str, float] = {}
    for key, value in logs.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "learning_rate":
            continue
        if key in TRL_METRICS:
            out[TRL_METRICS[key]] = float(value)
        elif key.startswith("rewards/") and key.endswith("/mean"):
            out["reward/" + key[len("rewards/"):-len("/mean")]] = float(value)
        else:
            out[f"trl/{key}"] = float(value)
    if "reward" in out:
        out["value"] = out["reward"]
    return out
