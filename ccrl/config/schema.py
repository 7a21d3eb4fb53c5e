"""The recipe schema: one dataclass per section, every field documented once.

A recipe names a seed, a model, an output directory and a list of stages. Each section is one
dataclass below; every field is documented by the string under it (cleanrl's habit), and
``__post_init__`` enforces the invariants that a type cannot express. YAML maps one-to-one onto
these classes (``ccrl.config.loader``); the checks that need the registries (tasks, objectives,
rewards, files) are in ``ccrl.config.validate``.

Sampling settings are declared once, in :class:`SamplingSettings`: the rl stage and the
preference stage's ``pairs`` section inherit its keys (a recipe keeps writing them flat, e.g.
``temperature: 1.0`` in the stage) and hand the rollout one ``ccrl.rollout.SamplingConfig``
through :meth:`SamplingSettings.sampling_config`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DataConfig:
    """Where a stage's examples come from: a built-in task or a local file."""

    task: str | None = None
    """built-in task name (``arithmetic``, ``reverse``, ``sort``, ``rules``); see ``ccrl.data.list_tasks()``"""
    options: dict[str, Any] = field(default_factory=dict)
    """task parameters, e.g. ``{digits: 2, ops: "+-"}`` for arithmetic"""
    path: str | None = None
    """a local json/jsonl/parquet/csv file instead of a task (prompt/answer, prompt/chosen/rejected or text)"""
    columns: dict[str, str] = field(default_factory=dict)
    """column mapping from the file's names to ours, e.g. ``{question: prompt, solution: answer}``"""
    num_examples: int = 20000
    """training examples drawn from the task (ignored for files)"""
    heldout_size: int = 200
    """held-out prompts used to measure accuracy and reward terms after the stage"""
    # --- which rows of a file are held out (the built-in tasks take ``options.heldout_fraction``)
    eval_path: str | None = None
    """a separate held-out file (same format and columns as ``path``): it gives the held-out rows and
    every row of ``path`` is trained on"""
    heldout_fraction: float | None = None
    """share of the rows of ``path`` held out, chosen by a stable hash of the prompt (``text`` for
    pretraining) so that no prompt is in both splits; unset: 0.1; 0: train on every row (no held-out
    scores unless ``eval_path`` is given)"""

    def __post_init__(self):
        if (self.task is None) == (self.path is None):
            raise ValueError("exactly one of 'task' or 'path' must be given")
        _positive(self, "num_examples", "heldout_size")
        if self.task is not None and (self.eval_path is not None or self.heldout_fraction is not None):
            key = "eval_path" if self.eval_path is not None else "heldout_fraction"
            raise ValueError(f"{key}: applies to a data file (path); a built-in task holds out its own problems "
                             f"(options: {{heldout_fraction: ...}})")
        if self.heldout_fraction is not None:
            if self.eval_path is not None:
                raise ValueError("heldout_fraction: with eval_path every row of path is trained on; give one of them")
            _in_range(self, "heldout_fraction", 0.0, 1.0)
            if self.heldout_fraction == 1.0:
                raise ValueError(_msg("heldout_fraction", 1.0, "a number in [0, 1) (1 leaves no row to train on)"))
        if self.eval_path is not None and not os.path.isfile(self.eval_path):
            raise ValueError(f"eval_path: file not found: {self.eval_path}")

    def split_fraction(self) -> float:
        """The share of ``path``'s rows held out by hash (0 with ``eval_path``)."""
        from ccrl.data.tasks import DEFAULT_HELDOUT_FRACTION

        if self.eval_path is not None:
            return 0.0
        return DEFAULT_HELDOUT_FRACTION if self.heldout_fraction is None else self.heldout_fraction


@dataclass
class PeftConfig:
    """LoRA adapters (PEFT) for a stage; the base weights stay frozen."""

    r: int = 8
    """adapter rank"""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)"""
    dropout: float = 0.0
    """dropout on the adapter input"""
    target_modules: list[str] | str = "all-linear"
    """module names to adapt (BitLinear included), or "all-linear" """

    def __post_init__(self):
        _positive(self, "r", "alpha")
        _in_range(self, "dropout", 0.0, 1.0)


@dataclass
class EarlyStopConfig:
    """End a stage before ``steps`` once its greedy accuracy reaches a threshold.

    Lightning's ``EarlyStopping(stopping_threshold=...)`` for a task with answers: every
    ``every`` steps the stage greedy-decodes a fixed sample of its own *training* prompts and
    ends at the first check whose accuracy is at least ``accuracy``. The held-out prompts the
    stage is scored on are not looked at, so the held-out accuracy after the stage stays an
    unbiased estimate. The learning-rate schedule is still the one planned over ``steps``.
    Use it to hand a half-trained policy to the next stage at the same accuracy whatever the
    seed, rather than after a fixed number of steps that leaves different seeds in different
    places.
    """

    accuracy: float = 0.5
    """threshold in (0, 1]: the stage ends at the first check with accuracy >= this"""
    every: int = 25
    """check every N optimizer steps"""
    prompts: int = 200
    """training prompts in the fixed sample that is decoded (distinct prompts; fewer if the data has fewer)"""
    min_steps: int = 0
    """no check before this step"""

    def __post_init__(self):
        _in_range(self, "accuracy", 0.0, 1.0, low_open=True)
        _positive(self, "every", "prompts")
        _non_negative(self, "min_steps")


@dataclass
class RewardSpec:
    """One reward term of V_Ω: a registered name or ``package.module:function``, its weight and params."""

    name: str
    """registered reward (``exact_match``, ``vir``, ``ice`` ...) or ``package.module:function``"""
    weight: float = 1.0
    """w in V_Ω; ``ice`` is a cost and enters with its weight subtracted (w_E)"""
    params: dict[str, Any] = field(default_factory=dict)
    """extra keyword arguments bound to the reward function (any other key of the entry lands here)"""


@dataclass
class StageConfig:
    """Fields shared by every stage."""

    kind: str = ""
    """pretrain | sft | rl | dpo | orpo"""
    name: str = ""
    """unique stage name (defaults to the kind, numbered when repeated); addresses the stage in overrides"""
    data: DataConfig | None = None
    """the examples (defaults to the previous stage's data)"""
    steps: int = 100
    """optimizer steps"""
    lr: float = 1e-3
    """peak learning rate (AdamW)"""
    batch_size: int = 32
    """sequences per optimizer step (pretrain/sft/dpo/orpo)"""
    micro_batch_size: int | None = None
    """sequences per forward/backward; the step accumulates gradients over batch_size / micro_batch_size"""
    warmup_steps: int = 0
    """linear warm-up steps before the schedule"""
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    """decay after warm-up (cosine to min_lr_ratio · lr)"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of lr"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 disables)"""
    quantized_lr_scale: float = 1.0
    """learning-rate multiplier of the latent weights behind ternary/binary layers (BitLinear,
    persona experts, micro-agent tables); the other weights train at ``lr``. Adam moves every
    weight by about ``lr`` per step whatever the gradient's size, and a latent weight within that
    distance of its rounding threshold flips its ternary value, so noisy RL gradients at a full
    learning rate rewrite the quantised layers at random; below 1 they move slower"""
    log_every: int = 1
    """write a metrics line every N steps"""
    eval_every: int = 0
    """held-out accuracy every N steps (0: only at the end of the stage)"""
    save_every: int = 0
    """checkpoint every N steps (0: only at the end of the stage)"""
    peft: PeftConfig | None = None
    """train LoRA adapters instead of all weights"""
    early_stop: EarlyStopConfig | None = None
    """end the stage once greedy accuracy on its training prompts reaches a threshold (EarlyStopConfig)"""
    max_seconds: float | None = None
    """wall-clock budget of the stage's training loop in seconds (summed over resumes): the stage ends
    at the first step boundary past it and finishes normally (final checkpoint, held-out scores,
    summary entry with the steps run; the next stage runs). The learning-rate schedule stays the one
    planned over ``steps``"""
    # --- the optimizer (AdamW) beyond lr and weight_decay; TRL's defaults are in docs/trl-mapping.md
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (β1, β2); ccrl's default β2 0.95 is the LLM-pretraining choice, TRL's (torch's) is 0.999"""
    adam_epsilon: float = 1e-8
    """AdamW ε added to the denominator"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass instead of keeping them (transformers' activation
    checkpointing of the model's layers): less memory, about one more forward per backward, same gradients"""
    optimizer_state_dtype: Literal["float32", "bfloat16"] | None = None
    """precision of AdamW's state. Unset: the parameters' dtype (torch's AdamW; with ``model.dtype:
    bfloat16`` its moments are bf16 too, and an update smaller than a weight's bf16 resolution, about
    2⁻⁸ of it, is lost). ``float32`` with bf16 weights: AdamW steps float32 master copies of the
    weights with float32 moments and rounds them into the bf16 weights after every update (4 + 8
    bytes of state per parameter instead of 4; the checkpoint keeps the master copies, so a resumed
    run continues exactly). ``bfloat16`` needs bf16 weights (it is then the unset case)"""

    def __post_init__(self):
        _positive(self, "steps", "batch_size", "log_every")
        if self.max_seconds is not None:
            _in_range(self, "max_seconds", 0.0, math.inf, low_open=True)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(_msg("adam_betas", self.adam_betas, "a list [beta1, beta2] of numbers in [0, 1)"))
        _in_range(self, "adam_epsilon", 0.0, 1.0, low_open=True)
        _non_negative(self, "warmup_steps", "weight_decay", "max_grad_norm", "eval_every", "save_every")
        _in_range(self, "lr", 0.0, 1.0, low_open=True)
        _in_range(self, "min_lr_ratio", 0.0, 1.0)
        _non_negative(self, "quantized_lr_scale")
        if self.micro_batch_size is not None:
            _positive(self, "micro_batch_size")


@dataclass
class PretrainStage(StageConfig):
    """Causal LM on the task's text (prompt + answer + eos), packed into blocks of seq_len."""

    seq_len: int = 128
    """tokens per training block"""

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "seq_len")


@dataclass
class SFTStage(StageConfig):
    """Supervised fine-tuning: loss on completion tokens only (answer + eos)."""


@dataclass
class SamplingSettings:
    """How completions are sampled: the keys a section that samples (an rl stage, a preference
    stage's ``pairs``) inherits and a recipe writes flat in that section.

    Each field is the field of ``ccrl.rollout.SamplingConfig`` of the same name;
    :meth:`sampling_config` hands every one of them over by name.
    """

    max_new_tokens: int = 16
    """length limit of a completion (L_max)"""
    temperature: float = 1.0
    """sampling temperature (an rl stage also applies it to the training log-probs, as TRL does)"""
    top_p: float = 1.0
    """nucleus sampling (1: off)"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    cuda_graph: bool | Literal["auto"] = "auto"
    """decode with one CUDA graph of the decode step on a static KV cache (auto: on CUDA when the
    policy's decode step can be captured; ``ccrl.rollout``)"""
    attend_window: int = 128
    """static decoding (the CUDA graph path): attention runs over the prompt and the completion
    columns decoded so far rounded up to a multiple of this many, one graph per window; 0: over
    the whole preallocated cache at every step, one graph (``ccrl.rollout.decode_graph``)"""
    decode_kernel: Literal["auto", "sdpa"] = "auto"
    """attention of an HF policy's decode step: auto: the Triton split-K kernel on CUDA in bf16 /
    fp16 where Triton is installed, else SDPA; sdpa: always SDPA (``ccrl.rollout.decode_kernel``)"""

    def __post_init__(self):
        _positive(self, "max_new_tokens")
        _non_negative(self, "attend_window")
        _in_range(self, "temperature", 0.0, 100.0, low_open=True)
        _in_range(self, "top_p", 0.0, 1.0, low_open=True)
        _non_negative(self, "top_k")

    def sampling_config(self, **changes: Any):
        """These settings as the rollout's ``SamplingConfig`` (``changes`` replace fields of it)."""
        from ccrl.rollout import SamplingConfig

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingSettings)}
        return SamplingConfig(**{**values, **changes})


OBJECTIVE_KEYS = ("epsilon", "epsilon_high", "kl_beta", "council_beta", "scale_rewards", "aggregation",
                  "importance_sampling_level", "advantage_clip", "dynamic_sampling")
"""the rl stage's keys that are hyper-parameters of its objective (``ccrl.objectives`` registry)"""


OBJECTIVE_PRESETS: dict[str, dict[str, Any]] = {
    "trl_dapo": {"objective": "dapo", "epsilon_high": 0.2, "dynamic_sampling": False, "overlong_cache": 0},
}
"""``objective:`` names that stand for a registered objective plus settings. ``trl_dapo`` is what TRL's
GRPOTrainer computes with its default ``loss_type="dapo"``: the token-level loss of DAPO with TRL's
``epsilon_high=None`` (= ``epsilon``, 0.2), without dynamic sampling (not in TRL) and without overlong
shaping (a separate reward function in TRL). ccrl's own ``dapo`` is the paper's: clip-higher 0.28,
dynamic sampling and overlong shaping (docs/trl-mapping.md)."""


@dataclass
class RLStage(SamplingSettings, StageConfig):
    """Online RL: GRPO / DAPO / Dr. GRPO / GSPO / CCRL. Fields left unset take the objective's defaults.

    The sampling keys (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``cuda_graph``,
    ``attend_window``, ``decode_kernel``)
    come from :class:`SamplingSettings`; the objective's hyper-parameters (``OBJECTIVE_KEYS``)
    are merged with its defaults and checked by the objective registry, the same call for
    ``ccrl check`` and for the trainer (:meth:`objective_settings`).
    """

    objective: str = "ccrl"
    """grpo | dapo | dr_grpo | gspo | ccrl, or the preset ``trl_dapo``: TRL GRPOTrainer's default
    ``loss_type="dapo"`` (``OBJECTIVE_PRESETS``)"""
    prompts_per_step: int = 16
    """distinct prompts per optimizer step"""
    group_size: int = 8
    """completions sampled per prompt (G)"""
    epsilon: float | None = None
    """lower ratio clip ε_low (objective default: 0.2; GSPO 3e-4)"""
    epsilon_high: float | None = None
    """upper ratio clip ε_high (GRPO 0.2, DAPO/CCRL clip-higher 0.28)"""
    kl_beta: float | None = None
    """β_KL of the k3 KL to the reference policy (0: no reference is kept)"""
    council_beta: float | None = None
    """β of the council entropy bonus H_Ω (CCRL 0.05; 0 for the others)"""
    scale_rewards: Literal["group", "batch", "none"] | None = None
    """advantage scaling: group std (GRPO), batch std, or none (Dr. GRPO)"""
    aggregation: Literal["sequence", "token", "constant"] | None = None
    """loss aggregation: sequence (GRPO), token (DAPO), constant (Dr. GRPO)"""
    importance_sampling_level: Literal["token", "sequence"] | None = None
    """token ratio (GRPO/DAPO) or length-normalised sequence ratio (GSPO)"""
    advantage_clip: list[float] | None = None
    """clamp advantages to [lo, hi] after normalising (e.g. [0, 1]; off by default)"""
    ppo_epochs: int = 1
    """μ: optimisation passes over each rollout batch (π_old = the rollout's log-probs)"""
    dynamic_sampling: bool | None = None
    """DAPO: drop groups whose rewards are all equal and sample again (bounded tries)"""
    max_resample_tries: int = 4
    """rollout rounds per step when dynamic sampling is on"""
    dynamic_sampling_signal: Literal["rewards", "value"] = "rewards"
    """what a group must vary in to be kept: ``rewards``, the weighted sum of the reward terms with
    the costs (ICE) and the overlong penalty left out, i.e. what the completions earned (DAPO's
    constraint 0 < #correct < G when the task reward is the only term); or ``value``, the whole V_Ω.
    With ``value`` a cost keeps every all-wrong or all-right group whose completions differ in
    length (ICE counts tokens; docs/objectives-notes.md)"""
    overlong_cache: int | None = None
    """DAPO overlong shaping: soft penalty in the last L_cache tokens before max_new_tokens (0: off;
    unset: the objective's default, DAPO and CCRL use round(0.2 · max_new_tokens))"""
    overlong_weight: float = 1.0
    """weight of the overlong penalty added to V_Ω"""
    routing_replay: bool = True
    """reuse the rollout's persona routes in the training forward (R3)"""
    router_aux_coef: float | None = None
    """load-balance loss weight (default: the model config's router_aux_loss_coef)"""
    rewards: list[RewardSpec] = field(default_factory=list)
    """the V_Ω terms; empty means the recipe's top-level rewards"""
    packed_rollout: bool | Literal["auto"] = "auto"
    """sample from a packed ternary snapshot of the weights (C++ kernel) when it is faster (auto: timed
    at the start of the stage on CPU; off on other devices, where the kernel does not run)"""
    kl_guard: float | None = None
    """a trust region on each update, in nats: after the step's update the policy is scored again on
    the trained completions and the mean per-token KL(π_old ‖ π_new) (k3 estimate) is measured; the
    learning rate is then scaled by √(kl_guard / KL), clamped to [0.1, 1.5], and never above the
    scheduled one (``lr_scale`` and ``update_kl`` are logged). KL grows with the square of the step
    size, so one correction brings the next update near the target whatever ``lr`` was set to. The
    stage starts at 0.1 × the rate (Adam's first updates are its largest) and rises at most 1.5× per
    update. One extra no-grad forward over the trained rows per step. None or 0: off"""
    logprob_chunk_size: int | Literal["auto"] = "auto"
    """tokens per chunk when the training passes and the reference score the completion tokens of a
    plain causal LM: its output head runs on the final hidden states one chunk of tokens at a time,
    with logsumexp in float32 per chunk, and the backward recomputes each chunk, so no (rows, T, V)
    logits exist (``ccrl.objectives.chunked_token_logprobs``; TRL 1.16's fused LM head does the same).
    ``auto``: chunks whose float32 logits take at most 256 MiB (441 tokens at a vocabulary of
    151,936). ``0``: the model's own logits of the completion positions (the path council policies,
    Quillan and CouncilHead, always take: their logits are the persona mixture)"""
    log_completions_every: int = 0
    """every N steps, append the step's completions table to ``<output_dir>/completions/<stage>.jsonl``:
    one line per trained completion with its prompt, completion, each reward, V_Ω, advantage and the
    columns rewards passed to ``log_extra`` (TRL's ``log_completions``). 0: off, and ``log_extra``
    values are dropped"""
    max_samples: int | None = None
    """budget of sampled completions (every completion generated, those dynamic sampling drops
    included): the stage ends at the first step boundary at or past it and finishes normally, as
    with ``max_seconds``; ``ccrl compare``'s ``budget: {kind: samples}`` sets it for every arm"""
    trainer: Literal["ccrl", "trl"] = "ccrl"
    """who trains the stage: ccrl's own RL trainer, or ``trl``: TRL's ``GRPOTrainer`` on the same
    model, data, rewards and budget, with the stage's settings mapped to ``GRPOConfig``
    (``ccrl.trainers.trl_arm``; docs/trl-mapping.md lists what maps and what is refused)"""

    def __post_init__(self):
        self._expand_preset()
        StageConfig.__post_init__(self)
        SamplingSettings.__post_init__(self)
        _positive(self, "prompts_per_step", "ppo_epochs", "max_resample_tries")
        if self.max_samples is not None:
            _positive(self, "max_samples")
        if self.group_size < 2:
            raise ValueError(_msg("group_size", self.group_size, "an integer >= 2 (a group needs a baseline)"))
        _non_negative(self, "overlong_weight", "log_completions_every")
        if self.kl_guard is not None:
            _non_negative(self, "kl_guard")
        if self.logprob_chunk_size != "auto" and (isinstance(self.logprob_chunk_size, bool)
                                                  or not isinstance(self.logprob_chunk_size, int)
                                                  or self.logprob_chunk_size < 0):
            raise ValueError(_msg("logprob_chunk_size", self.logprob_chunk_size,
                                  "'auto' or an integer >= 0 (0: the model's own logits)"))
        for name in ("epsilon", "epsilon_high", "kl_beta", "council_beta"):
            if getattr(self, name) is not None:
                _non_negative(self, name)
        if self.overlong_cache is not None and not 0 <= self.overlong_cache < self.max_new_tokens:
            raise ValueError(_msg("overlong_cache", self.overlong_cache, f"an integer in [0, max_new_tokens={self.max_new_tokens})"))
        if self.advantage_clip is not None and (len(self.advantage_clip) != 2 or self.advantage_clip[0] > self.advantage_clip[1]):
            raise ValueError(_msg("advantage_clip", self.advantage_clip, "a list [lo, hi] with lo <= hi"))

    def _expand_preset(self) -> None:
        """``objective: <preset>`` becomes the preset's objective, and the preset's settings fill the
        keys the stage leaves unset (a key the stage gives wins)."""
        preset = OBJECTIVE_PRESETS.get(self.objective)
        if preset is None:
            return
        self.objective = preset["objective"]
        for key, value in preset.items():
            if key != "objective" and getattr(self, key) is None:
                setattr(self, key, value)

    def objective_settings(self) -> dict[str, Any]:
        """The objective's hyper-parameters as this stage gives them, under their recipe keys (None:
        the objective's default), for ``get_objective(self.objective).hparams(**...)`` / ``loss_kwargs``."""
        return {key: getattr(self, key) for key in OBJECTIVE_KEYS}


@dataclass
class PairsConfig(SamplingSettings):
    """Preference pairs: from a file, or built online from the policy's own ranked samples.

    The sampling keys (``max_new_tokens``, ``temperature``, ...) come from :class:`SamplingSettings`
    and say how the policy's completions are drawn when building pairs.
    """

    from_policy: bool = True
    """sample group_size completions per prompt, score with the rewards, keep best vs worst"""
    num_prompts: int = 256
    """prompts used to build pairs from the policy"""
    group_size: int = 8
    """completions sampled per prompt when building pairs"""
    heldout_pairs: int = 64
    """pairs kept aside to measure preference accuracy"""

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "num_prompts", "heldout_pairs")
        if self.group_size < 2:
            raise ValueError(_msg("group_size", self.group_size, "an integer >= 2"))


@dataclass
class PreferenceStage(StageConfig):
    """DPO (sigmoid, ipo) or ORPO, usually through PEFT adapters."""

    beta: float = 0.1
    """DPO β (strength of the implicit KL) or ORPO λ (weight of the odds-ratio term)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO loss (ignored by ORPO)"""
    nll_weight: float = 0.0
    """DPO: weight of the chosen completions' NLL added to the loss (RPO; TRL's loss_type
    [sigmoid, sft] with loss_weights [1, nll_weight]); 0 is plain DPO. ORPO has its own NLL term"""
    pairs: PairsConfig = field(default_factory=PairsConfig)
    """where the pairs come from (a file given in data.path takes precedence)"""
    rewards: list[RewardSpec] = field(default_factory=list)
    """rewards ranking self-generated pairs; empty means the recipe's top-level rewards"""

    def __post_init__(self):
        super().__post_init__()
        _in_range(self, "beta", 0.0, 100.0, low_open=True)
        _in_range(self, "nll_weight", 0.0, 100.0)
        if self.kind == "orpo" and self.nll_weight:
            raise ValueError(_msg("nll_weight", self.nll_weight, "0 for an orpo stage (ORPO's loss has its NLL "
                                  "term already; beta weighs its odds-ratio term)"))


STAGE_KINDS: dict[str, type] = {
    "pretrain": PretrainStage,
    "sft": SFTStage,
    "rl": RLStage,
    "dpo": PreferenceStage,
    "orpo": PreferenceStage,
}


@dataclass
class ModelConfig:
    """The policy: a Quillan preset plus field overrides, a checkpoint, or any HF config."""

    preset: str | None = None
    """Quillan preset: toy | small | base (other keys of this section override its fields)"""
    checkpoint: str | None = None
    """a ccrl or Hugging Face checkpoint directory"""
    hf_config: dict[str, Any] | None = None
    """a transformers config (must contain model_type), built with random weights"""
    council_head: bool = False
    """wrap the model in policies.CouncilHead (overseer + 32 persona heads)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """the parameters' dtype in every stage (a checkpoint is converted on loading). ``bfloat16``
    halves the memory of the weights, their gradients and, by default, AdamW's state (the stages'
    ``optimizer_state_dtype`` keeps float32 master weights and state instead); ``mixed_precision``
    is autocast on top of either"""
    overrides: dict[str, Any] = field(default_factory=dict)
    """QuillanConfig field overrides (any other key of this section lands here)"""

    def __post_init__(self):
        given = [k for k in ("preset", "checkpoint", "hf_config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of 'preset', 'checkpoint' or 'hf_config' must be given"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.hf_config is not None and "model_type" not in self.hf_config:
            raise ValueError("'hf_config' must contain 'model_type' (e.g. llama)")
        if self.overrides and self.preset is None:
            raise ValueError(f"field overrides ({', '.join(sorted(self.overrides))}) only apply to a preset")


@dataclass
class TokenizerConfig:
    """The tokenizer trained on the task corpus (ignored when starting from a checkpoint)."""

    kind: Literal["char", "bpe"] = "char"
    """character-level or a small BPE"""
    vocab_size: int | None = None
    """BPE vocabulary size"""

    def __post_init__(self):
        if self.vocab_size is not None:
            _positive(self, "vocab_size")


@dataclass
class EvalConfig:
    """Held-out evaluation after each stage."""

    max_new_tokens: int = 16
    """greedy decoding length limit"""
    batch_size: int = 128
    """prompts decoded together"""

    def __post_init__(self):
        _positive(self, "max_new_tokens", "batch_size")


@dataclass
class BudgetConfig:
    """``ccrl compare``: the same training budget for every arm's rl stages (those after the shared
    stages), so that arms are compared at equal cost rather than at equal steps."""

    kind: Literal["seconds", "samples"] = "seconds"
    """``seconds``: wall-clock seconds of training (sets each rl stage's ``max_seconds``);
    ``samples``: sampled completions (sets each rl stage's ``max_samples``)"""
    value: float = 0.0
    """the budget, in seconds or completions; the stage still stops at its ``steps`` if it gets
    there first, so give the rl stage enough steps for the budget to bind"""

    def __post_init__(self):
        _in_range(self, "value", 0.0, math.inf, low_open=True)
        if self.kind == "samples":
            if self.value != int(self.value):
                raise ValueError(_msg("value", self.value, "a whole number of completions"))
            self.value = int(self.value)

    def stage_key(self) -> str:
        """The rl stage key the budget sets."""
        return "max_seconds" if self.kind == "seconds" else "max_samples"


@dataclass
class Variant:
    """One arm of ``ccrl compare``: a name and dotted-key overrides."""

    name: str
    """label in the report"""
    set: dict[str, Any] = field(default_factory=dict)
    """overrides applied to the base recipe, e.g. ``{stages.rl.objective: grpo}``"""


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
"""the package each ``report_to`` tracker imports (accelerate's trackers load them lazily)"""


@dataclass
class Recipe:
    """A whole recipe."""

    name: str
    """run name (used for report folders)"""
    stages: list[StageConfig]
    """stages run in order, each starting from the previous stage's checkpoint"""
    model: ModelConfig
    """the policy"""
    seed: int = 0
    """global seed: data order, sampling and initialisation are functions of it"""
    output_dir: str = ""
    """where checkpoints, metrics.jsonl and summary.json go (default runs/<name>)"""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """tokenizer trained on the task corpus"""
    rewards: list[RewardSpec] = field(default_factory=list)
    """default V_Ω terms for scoring every stage and for rl/dpo/orpo stages that name none"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """held-out evaluation settings"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to train (auto: cuda when available)"""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """autocast precision for training (accelerate)"""
    threads: int = 0
    """CPU threads for torch (0: leave torch's default)"""
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] | Literal[
        "none", "tensorboard", "wandb", "trackio", "mlflow"] = field(default_factory=list)
    """experiment trackers (accelerate's) that receive every metrics.jsonl value as ``<stage>/<key>`` at a
    step counted over the whole run, and each stage's held-out scores as ``<stage>/eval/<key>``; empty or
    ``none``: metrics.jsonl only. TensorBoard writes under ``<output_dir>/tensorboard``; the other
    trackers need their own package (``pip install wandb`` ...)"""
    variants: list[Variant] = field(default_factory=list)
    """``ccrl compare``: the arms"""
    seeds: list[int] = field(default_factory=list)
    """``ccrl compare``: seeds per arm (empty: [seed])"""
    report_dir: str | None = None
    """``ccrl compare``: where the report goes (default reports/<name>)"""
    shared_stages: list[str] = field(default_factory=list)
    """``ccrl compare``: leading stages (by name) run once per seed and shared by every variant, which
    then starts from their last checkpoint; variants may not change them"""
    budget: BudgetConfig | None = None
    """``ccrl compare``: one training budget for every arm's rl stages, ``{kind: seconds | samples,
    value: N}`` (sets their ``max_seconds`` or ``max_samples``; a variant may not set those itself)"""
    baseline: str | None = None
    """``ccrl compare``: the variant every other arm is compared with, seed by seed (paired
    differences of final held-out accuracy with a 95% t-interval in the report)"""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    """the validated recipe as a plain mapping (what summary.json records)"""
    source: str = "<recipe>"
    """the file the recipe came from"""

    def __post_init__(self):
        if not self.stages:
            raise ValueError("'stages' must list at least one stage")
        _non_negative(self, "threads")
        if not self.output_dir:
            self.output_dir = os.path.join("runs", self.name)
        if not self.seeds:
            self.seeds = [self.seed]
        if self.report_dir is None:
            self.report_dir = os.path.join("reports", self.name)
        if self.baseline is not None and self.variants:   # (a variant's own run recipe drops the variants)
            names = [v.name for v in self.variants]
            if self.baseline not in names:
                raise ValueError(f"baseline: expected the name of one of the variants {names}, got {self.baseline!r}")
        self._check_trackers()

    def _check_trackers(self) -> None:
        """``report_to`` as a list, each tracker's package importable (checked before anything runs)."""
        import importlib.util

        names = [] if self.report_to == "none" else [self.report_to] if isinstance(self.report_to, str) \
            else list(self.report_to)
        self.report_to = list(dict.fromkeys(names))
        for name in self.report_to:
            if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
                raise ValueError(f"report_to: {name!r} needs the {TRACKER_PACKAGES[name]} package, which is not "
                                 f"installed; install it (pip install {TRACKER_PACKAGES[name]}) or remove "
                                 f"{name!r} from report_to")

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)



# --------------------------------------------------------------------------- range checks of __post_init__


def _msg(name: str, value: Any, expected: str) -> str:
    return f"{name}: expected {expected}, got {value!r}"


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise ValueError(_msg(n, v, "a positive number"))


def _non_negative(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v < 0:
            raise ValueError(_msg(n, v, "a number >= 0"))


def _in_range(obj: Any, name: str, lo: float, hi: float, low_open: bool = False) -> None:
    v = getattr(obj, name)
    if v > hi or v < lo or (low_open and v == lo):
        raise ValueError(_msg(name, v, f"a number in {'(' if low_open else '['}{lo}, {hi}]"))



def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (for ``ccrl explain`` and the README)."""
    import ast
    import inspect
    import textwrap

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
                out[a.target.id] = str(b.value.value).strip()
    return out

