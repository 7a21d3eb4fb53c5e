"""Recipes: YAML mapped one-to-one onto config dataclasses, validated before anything runs.

A recipe names a seed, a model, an output directory and a list of stages. Each section is
one dataclass below; every field is documented once, by the string under it (cleanrl's
habit), and ``__post_init__`` enforces the invariants that cannot be expressed by a type.

Validation (``load_recipe``) checks, before any stage runs: unknown keys (with a
did-you-mean), wrong types, out-of-range values, unknown tasks/objectives/rewards and missing
files. Every failure is a :class:`ccrl.errors.RecipeError` whose message names the file, the
key path (``stages[2].epsilon_high``) and what was expected; the CLI prints it and exits 2.

Overrides (``ccrl run R.yaml --set stages.rl.lr=1e-4``) are applied to the raw mapping before
validation. A dotted key addresses a stage by its ``name`` (which defaults to its ``kind``) or
by its index: ``stages.rl.lr`` and ``stages.2.lr`` are the same key in a recipe whose third
stage is the only ``rl`` stage. Values are parsed as YAML scalars (``1e-4``, ``true``, ``[1, 2]``).

Why not Hydra/OmegaConf: recipes must fail with one clear paragraph naming the key, and must
stay importable without extra dependencies; a 300-line validator over dataclasses does that.

Recipes build on one another: a file with ``base: quickstart.yaml`` (a path relative to that
file) starts from the base recipe's mapping, deep-merges its own top-level keys over it
(mappings merge key by key; lists and scalars replace) and then applies its ``set:`` mapping of
dotted overrides, the same keys ``--set`` takes (``set: {stages.rl.objective: grpo}``), so a
variant names only what differs. Bases may themselves have bases; a cycle is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from ccrl.errors import RecipeError

# --------------------------------------------------------------------------- sections


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

    def __post_init__(self):
        if (self.task is None) == (self.path is None):
            raise ValueError("exactly one of 'task' or 'path' must be given")
        _positive(self, "num_examples", "heldout_size")


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

    def __post_init__(self):
        _positive(self, "steps", "batch_size", "log_every")
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
class RLStage(StageConfig):
    """Online RL: GRPO / DAPO / Dr. GRPO / GSPO / CCRL. Fields left unset take the objective's defaults."""

    objective: str = "ccrl"
    """grpo | dapo | dr_grpo | gspo | ccrl"""
    prompts_per_step: int = 16
    """distinct prompts per optimizer step"""
    group_size: int = 8
    """completions sampled per prompt (G)"""
    max_new_tokens: int = 16
    """length limit of a completion (L_max)"""
    temperature: float = 1.0
    """sampling temperature (also applied to the training log-probs, as TRL does)"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
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
    length (ICE counts tokens): on the quickstart it kept 45-100% of the groups"""
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
    cuda_graph: bool | Literal["auto"] = "auto"
    """decode rollouts with one CUDA graph of the decode step on a static KV cache (auto: on CUDA
    when the policy's decode step can be captured; ``ccrl.rollout.engine``)"""

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "prompts_per_step", "max_new_tokens", "ppo_epochs", "max_resample_tries")
        if self.group_size < 2:
            raise ValueError(_msg("group_size", self.group_size, "an integer >= 2 (a group needs a baseline)"))
        _in_range(self, "temperature", 0.0, 100.0, low_open=True)
        _in_range(self, "top_p", 0.0, 1.0, low_open=True)
        _non_negative(self, "top_k", "overlong_weight")
        for name in ("epsilon", "epsilon_high", "kl_beta", "council_beta"):
            if getattr(self, name) is not None:
                _non_negative(self, name)
        if self.overlong_cache is not None and not 0 <= self.overlong_cache < self.max_new_tokens:
            raise ValueError(_msg("overlong_cache", self.overlong_cache, f"an integer in [0, max_new_tokens={self.max_new_tokens})"))
        if self.advantage_clip is not None and (len(self.advantage_clip) != 2 or self.advantage_clip[0] > self.advantage_clip[1]):
            raise ValueError(_msg("advantage_clip", self.advantage_clip, "a list [lo, hi] with lo <= hi"))


@dataclass
class PairsConfig:
    """Preference pairs: from a file, or built online from the policy's own ranked samples."""

    from_policy: bool = True
    """sample group_size completions per prompt, score with the rewards, keep best vs worst"""
    num_prompts: int = 256
    """prompts used to build pairs from the policy"""
    group_size: int = 8
    """completions sampled per prompt when building pairs"""
    temperature: float = 1.0
    """sampling temperature when building pairs"""
    max_new_tokens: int = 16
    """completion length limit when building pairs"""
    heldout_pairs: int = 64
    """pairs kept aside to measure preference accuracy"""

    def __post_init__(self):
        _positive(self, "num_prompts", "max_new_tokens", "heldout_pairs")
        if self.group_size < 2:
            raise ValueError(_msg("group_size", self.group_size, "an integer >= 2"))


@dataclass
class PreferenceStage(StageConfig):
    """DPO (sigmoid, ipo) or ORPO, usually through PEFT adapters."""

    beta: float = 0.1
    """DPO β (strength of the implicit KL) or ORPO λ (weight of the odds-ratio term)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO loss (ignored by ORPO)"""
    pairs: PairsConfig = field(default_factory=PairsConfig)
    """where the pairs come from (a file given in data.path takes precedence)"""
    rewards: list[RewardSpec] = field(default_factory=list)
    """rewards ranking self-generated pairs; empty means the recipe's top-level rewards"""

    def __post_init__(self):
        super().__post_init__()
        _in_range(self, "beta", 0.0, 100.0, low_open=True)


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
class Variant:
    """One arm of ``ccrl compare``: a name and dotted-key overrides."""

    name: str
    """label in the report"""
    set: dict[str, Any] = field(default_factory=dict)
    """overrides applied to the base recipe, e.g. ``{stages.rl.objective: grpo}``"""


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
    variants: list[Variant] = field(default_factory=list)
    """``ccrl compare``: the arms"""
    seeds: list[int] = field(default_factory=list)
    """``ccrl compare``: seeds per arm (empty: [seed])"""
    report_dir: str | None = None
    """``ccrl compare``: where the report goes (default reports/<name>)"""
    shared_stages: list[str] = field(default_factory=list)
    """``ccrl compare``: leading stages (by name) run once per seed and shared by every variant, which
    then starts from their last checkpoint; variants may not change them"""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    """the validated recipe as a plain mapping (what summary.json records)"""
    source: str = "<recipe>"
    """the file the recipe came from"""

    def __post_init__(self):
        if not self.stages:
            raise ValueError("'stages' must list at least one stage")
        if not self.output_dir:
            self.output_dir = os.path.join("runs", self.name)
        if not self.seeds:
            self.seeds = [self.seed]
        if self.report_dir is None:
            self.report_dir = os.path.join("reports", self.name)

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


# --------------------------------------------------------------------------- loading


def load_recipe(recipe: str | os.PathLike | dict, overrides: dict | list[str] | None = None) -> Recipe:
    """Read (if a path), apply overrides, validate; returns a :class:`Recipe` or raises RecipeError."""
    if isinstance(recipe, (str, os.PathLike)):
        source = str(recipe)
        raw = _resolve_base(_read_yaml(source), source, ())
    elif isinstance(recipe, dict):
        source, raw = "<recipe>", _deepcopy(recipe)
    else:
        raise RecipeError(f"a recipe must be a YAML path or a mapping, got {type(recipe).__name__}")
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: the recipe must be a mapping of keys to values, got {type(raw).__name__}")
    if overrides:
        raw = apply_overrides(raw, overrides, source=source)
    rec = _build_recipe(raw, source)
    _check_semantics(rec, source)
    return rec


def _read_yaml(path: str) -> Any:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def _resolve_base(raw: Any, path: str, seen: tuple[str, ...]) -> Any:
    """Apply ``base:`` (deep merge under this file's keys) and ``set:`` (dotted overrides)."""
    if not isinstance(raw, dict) or ("base" not in raw and "set" not in raw):
        return raw
    raw = dict(raw)
    base, sets = raw.pop("base", None), raw.pop("set", None)
    if base is not None:
        if not isinstance(base, str):
            raise RecipeError(f"{path}: base: expected the path of another recipe file, got {_value_repr(base)}")
        base_path = str(Path(path).parent / base)
        real = os.path.realpath(base_path)
        if real in seen or real == os.path.realpath(path):
            raise RecipeError(f"{path}: base: {base!r} leads back to a recipe already being read (a cycle)")
        if not Path(base_path).is_file():
            raise RecipeError(f"{path}: base: recipe file {base_path!r} not found")
        parent = _resolve_base(_read_yaml(base_path), base_path, seen + (os.path.realpath(path),))
        if not isinstance(parent, dict):
            raise RecipeError(f"{base_path}: the recipe must be a mapping of keys to values, got {type(parent).__name__}")
        raw = _deep_merge(parent, raw)
    if sets is not None:
        if not isinstance(sets, dict):
            raise RecipeError(f"{path}: set: expected a mapping of dotted keys to values, "
                              f"e.g. {{stages.rl.lr: 1.0e-4}}, got {_value_repr(sets)}")
        raw = apply_overrides(raw, {str(k): v for k, v in sets.items()}, source=path)
    return raw


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces."""
    out = _deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else _deepcopy(v)
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["a.b=1e-4", "c=true"]`` → ``{"a.b": 1e-4, "c": True}`` (values parsed as YAML)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stages.rl.lr=1e-4")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str):  # YAML 1.1 leaves "1e-4" (no dot) a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def apply_overrides(raw: dict, overrides: dict | list[str], source: str = "<recipe>") -> dict:
    """Return a copy of ``raw`` with dotted-key overrides applied (stages addressed by name or index)."""
    if isinstance(overrides, list):
        overrides = parse_set(overrides)
    raw = _deepcopy(raw)
    for key, value in overrides.items():
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                idx = _stage_index(node, part, key, source) if node is raw.get("stages") else _list_index(node, part, key, source)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError(f"{source}: override {key!r}: {where!r} is a {type(node).__name__}, not a section")
    return raw


def _stage_index(stages: list, part: str, key: str, source: str) -> int:
    if part.isdigit():
        return _list_index(stages, part, key, source)
    names = [_stage_name(s, i, stages) for i, s in enumerate(stages)]
    if part in names:
        return names.index(part)
    raise RecipeError(f"{source}: override {key!r}: no stage named {part!r}; stages are {names}"
                      + _did_you_mean(part, names))


def _list_index(node: list, part: str, key: str, source: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"{source}: override {key!r}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _stage_name(stage: Any, i: int, stages: list) -> str:
    if isinstance(stage, dict) and stage.get("name"):
        return str(stage["name"])
    kind = stage.get("kind", "stage") if isinstance(stage, dict) else "stage"
    same = [j for j, s in enumerate(stages) if isinstance(s, dict) and s.get("kind") == kind and not s.get("name")]
    return kind if len(same) == 1 else f"{kind}{same.index(i) + 1}"


def _build_recipe(raw: dict, source: str) -> Recipe:
    raw = _deepcopy(raw)
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list):
        raise RecipeError(f"{source}: key 'stages': expected a list of stages, got "
                          + ("nothing" if stages_raw is None else type(stages_raw).__name__))
    stages = []
    for i, s in enumerate(stages_raw):
        where = f"stages[{i}]"
        if not isinstance(s, dict):
            raise RecipeError(f"{source}: {where}: expected a mapping with a 'kind', got {type(s).__name__}")
        kind = s.get("kind")
        if kind not in STAGE_KINDS:
            raise RecipeError(f"{source}: {where}.kind: expected one of {sorted(STAGE_KINDS)}, got {kind!r}"
                              + _did_you_mean(str(kind), list(STAGE_KINDS)))
        s = dict(s)
        s["name"] = _stage_name(s, i, stages_raw)
        for key in ("rewards",):
            if key in s:
                s[key] = _reward_entries(s[key], f"{where}.{key}", source)
        stages.append(_from_dict(STAGE_KINDS[kind], s, where, source))
    names = [s.name for s in stages]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RecipeError(f"{source}: stages: stage names must be unique, {sorted(dup)} repeated")
    model = raw.get("model")
    if not isinstance(model, dict):
        raise RecipeError(f"{source}: key 'model': expected a mapping like {{preset: small}}, "
                          f"{{checkpoint: path}} or {{hf_config: {{model_type: llama, ...}}}}")
    model = dict(model)
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"overrides"}
    model["overrides"] = {k: model.pop(k) for k in list(model) if k not in known}
    body = {k: v for k, v in raw.items() if k not in ("stages", "model")}
    if "rewards" in body:
        body["rewards"] = _reward_entries(body["rewards"], "rewards", source)
    body["stages"] = stages
    body["model"] = _from_dict(ModelConfig, model, "model", source)
    body["source"] = source
    rec = _from_dict(Recipe, body, "", source, prebuilt=("stages", "model"))
    rec.raw = raw
    return rec


def _reward_entries(entries: Any, where: str, source: str) -> list:
    if not isinstance(entries, list):
        raise RecipeError(f"{source}: {where}: expected a list of {{name: ..., weight: ...}}, got {type(entries).__name__}")
    out = []
    for j, e in enumerate(entries):
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, dict) or "name" not in e:
            raise RecipeError(f"{source}: {where}[{j}]: expected a mapping with a 'name' (and optional 'weight')")
        e = dict(e)
        params = dict(e.pop("params", {}) or {})
        params.update({k: e.pop(k) for k in list(e) if k not in ("name", "weight")})
        e["params"] = params
        out.append(e)
    return out


def _check_semantics(rec: Recipe, source: str) -> None:
    """Cross-field checks that need the registries: tasks, objectives, rewards, files."""
    from ccrl import data as ccrl_data
    from ccrl import objectives

    prev_data = None
    for i, st in enumerate(rec.stages):
        where = f"stages[{i}] ({st.name})"
        if st.data is None:
            if prev_data is None:
                raise RecipeError(f"{source}: {where}.data: the first stage must say where its data comes from, "
                                  f"e.g. data: {{task: arithmetic}}")
            st.data = prev_data
        prev_data = st.data
        d = st.data
        if d.task is not None:
            try:
                ccrl_data.get_task(d.task, **d.options)
            except Exception as e:  # DataError, TypeError from bad options
                raise RecipeError(f"{source}: {where}.data: {e}") from None
        elif not Path(d.path).exists():
            raise RecipeError(f"{source}: {where}.data.path: file not found: {d.path}")
        if isinstance(st, RLStage):
            try:
                spec = objectives.get_objective(st.objective)
            except Exception as e:
                raise RecipeError(f"{source}: {where}.objective: {e}") from None
            if spec.kind != "online":
                raise RecipeError(f"{source}: {where}.objective: {st.objective!r} is a preference objective; "
                                  f"use a stage of kind {st.objective!r} instead")
        if isinstance(st, (RLStage, PreferenceStage)):
            if st.kind == "orpo" and st.loss_type != "sigmoid":
                raise RecipeError(f"{source}: {where}.loss_type: only DPO stages take a loss_type")
            if not st.rewards:
                st.rewards = list(rec.rewards)
            if isinstance(st, RLStage) and not st.rewards:
                raise RecipeError(f"{source}: {where}.rewards: an rl stage needs at least one reward "
                                  f"(here or at the recipe's top level), e.g. rewards: [{{name: exact_match}}]")
            _check_rewards(st.rewards, f"{where}.rewards", source)
    _check_rewards(rec.rewards, "rewards", source)
    if rec.model.checkpoint is not None and not Path(rec.model.checkpoint).exists():
        raise RecipeError(f"{source}: model.checkpoint: directory not found: {rec.model.checkpoint}")
    if rec.model.preset is not None:
        from policies import QuillanConfig

        presets = ["toy", "small", "base"]
        if rec.model.preset not in presets:
            raise RecipeError(f"{source}: model.preset: expected one of {presets}, got {rec.model.preset!r}"
                              + _did_you_mean(rec.model.preset, presets))
        fields = QuillanConfig().to_dict()
        for k in rec.model.overrides:
            if k not in fields:
                raise RecipeError(f"{source}: model.{k}: not a QuillanConfig field" + _did_you_mean(k, list(fields)))
    names = [s.name for s in rec.stages]
    if rec.shared_stages:
        if rec.shared_stages != names[: len(rec.shared_stages)] or len(rec.shared_stages) == len(names):
            raise RecipeError(f"{source}: shared_stages: expected leading stage names followed by at least one "
                              f"more stage (stages are {names}), got {rec.shared_stages}")
        for j, v in enumerate(rec.variants):
            for key in v.set:
                parts = key.split(".")
                touched = parts[0] in ("model", "tokenizer", "seed") or (
                    parts[0] == "stages" and len(parts) > 1 and (parts[1] in rec.shared_stages or parts[1].isdigit()))
                if touched:
                    raise RecipeError(f"{source}: variants[{j}] ({v.name}).set.{key}: a variant may not change a shared "
                                      f"stage, the model or the tokenizer (shared_stages: {rec.shared_stages}); "
                                      f"address later stages by name")
    for j, v in enumerate(rec.variants):
        try:
            load_recipe({k: val for k, val in rec.raw.items() if k not in ("variants", "shared_stages")}, v.set)
        except RecipeError as e:
            raise RecipeError(f"{source}: variants[{j}] ({v.name}): {e}") from None


def _check_rewards(specs: list[RewardSpec], where: str, source: str) -> None:
    import rewards
    from ccrl.errors import CcrlError

    for j, r in enumerate(specs):
        try:
            rewards.bind(r.name, **r.params)
        except CcrlError as e:
            raise RecipeError(f"{source}: {where}[{j}]: {e}") from None


# --------------------------------------------------------------------------- generic dataclass validation


def _from_dict(cls, data: Any, where: str, source: str, prebuilt: tuple = ()):
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where or 'recipe'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            public = [f for f in fields if f not in ("raw", "source")]
            raise RecipeError(f"{source}: {path}: unknown key" + _did_you_mean(str(key), public)
                              + f" (valid keys: {', '.join(sorted(public))})")
        kwargs[key] = value if key in prebuilt else _coerce(value, hints[key], path, source)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{source}: {where + '.' if where else ''}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise RecipeError(f"{source}: {where or 'recipe'}: {e}") from None


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, source)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:   # X | None: X's own error names the inner key (stages[1].peft.r)
            raise errors[0]
        raise RecipeError(f"{source}: {path}: expected {_type_name(tp)}, got {_value_repr(value)}")
    if origin is Literal:
        if value in args:
            return value
        raise RecipeError(f"{source}: {path}: expected one of {list(args)}, got {value!r}"
                          + _did_you_mean(str(value), [str(a) for a in args]))
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {path}: expected a list, got {_value_repr(value)}")
        return [_coerce(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {path}: expected a mapping, got {_value_repr(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise RecipeError(f"{source}: {path}: expected {_type_name(tp)}, got {_value_repr(value)}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + (
            " (or null)" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _value_repr(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if value is not None else "null"


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


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


def _deepcopy(x: Any) -> Any:
    import copy

    return copy.deepcopy(x)


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
