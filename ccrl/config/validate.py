"""Cross-field checks of a built recipe that need the registries: tasks, objectives, rewards, files.

Run by ``load_recipe`` after the recipe's mapping has become dataclasses, so ``ccrl check`` and
``ccrl run`` refuse the same recipes before anything trains. An rl stage's objective settings
go through the objective registry here (``ObjectiveSpec.loss_kwargs``), the same call the
trainer makes, so an invalid combination (``council_beta`` for an objective other than ccrl)
fails at check time, naming the stage's key.
"""

from __future__ import annotations

from pathlib import Path

from ccrl.config.coerce import did_you_mean
from ccrl.config.schema import PreferenceStage, Recipe, RewardSpec, RLStage
from ccrl.errors import RecipeError


def check_semantics(rec: Recipe, source: str) -> None:
    """Cross-field checks that need the registries: tasks, objectives, rewards, files."""
    from ccrl import data as ccrl_data

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
        else:
            _check_text_file(d.path, f"{where}.data.path", source)
        if getattr(st, "optimizer_state_dtype", None) == "bfloat16" and rec.model.dtype != "bfloat16":
            raise RecipeError(f"{source}: {where}.optimizer_state_dtype: bfloat16 keeps AdamW's state in the "
                              f"weights' dtype and needs bf16 weights (model.dtype: bfloat16); with "
                              f"model.dtype: {rec.model.dtype} the state is float32")
        if isinstance(st, RLStage):
            _check_objective(st, i, source)
            if st.trainer == "trl":   # TRL's GRPOTrainer trains it: what it cannot honour is refused here
                from ccrl.trainers.trl_arm import check_trl_stage

                raw_stage = rec.raw.get("stages", [{}] * (i + 1))[i]
                check_trl_stage(st, raw_stage if isinstance(raw_stage, dict) else {}, f"stages[{i}]", source,
                                rewards=st.rewards or rec.rewards,
                                rewards_key=f"stages[{i}].rewards" if st.rewards else "rewards")
            _check_council(rec, st, i, source)
        if isinstance(st, (RLStage, PreferenceStage)):
            if st.kind == "orpo" and st.loss_type != "sigmoid":
                raise RecipeError(f"{source}: {where}.loss_type: only DPO stages take a loss_type")
            own = bool(st.rewards)   # else the stage takes the top-level rewards, which errors then name
            if not own:
                st.rewards = list(rec.rewards)
            if isinstance(st, RLStage) and not st.rewards:
                raise RecipeError(f"{source}: {where}.rewards: an rl stage needs at least one reward "
                                  f"(here or at the recipe's top level), e.g. rewards: [{{name: exact_match}}]")
            _check_rewards(st.rewards, f"{where}.rewards" if own else "rewards", source)
    _check_rewards(rec.rewards, "rewards", source)
    if rec.model.checkpoint is not None and not Path(rec.model.checkpoint).exists():
        raise RecipeError(f"{source}: model.checkpoint: directory not found: {rec.model.checkpoint}")
    if rec.model.checkpoint is not None:
        from ccrl.errors import CheckpointError
        from ccrl.models import check_safetensors_only

        try:
            check_safetensors_only(rec.model.checkpoint)
        except CheckpointError as e:
            raise RecipeError(f"{source}: model.checkpoint: {e}") from None
    if rec.model.preset is not None:
        from policies import QuillanConfig

        presets = ["toy", "small", "base"]
        if rec.model.preset not in presets:
            raise RecipeError(f"{source}: model.preset: expected one of {presets}, got {rec.model.preset!r}"
                              + did_you_mean(rec.model.preset, presets))
        fields = QuillanConfig().to_dict()
        for k in rec.model.overrides:
            if k not in fields:
                raise RecipeError(f"{source}: model.{k}: not a QuillanConfig field" + did_you_mean(k, list(fields)))
    _check_lengths(rec, model_context(rec, source, build=True), source)
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
    if rec.budget is not None:
        _check_budget(rec, names, source)


def _check_budget(rec: Recipe, names: list[str], source: str) -> None:
    """A compare's budget applies to the rl stages after the shared ones, which variants then leave alone."""
    targets = [s.name for s in rec.stages if s.kind == "rl" and s.name not in rec.shared_stages]
    if not targets:
        raise RecipeError(f"{source}: budget: sets the budget of the rl stages after the shared stages, and this "
                          f"recipe has none (stages are {names}, shared_stages {rec.shared_stages})")
    for j, v in enumerate(rec.variants):
        for key in v.set:
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "stages" and parts[1] in targets and parts[2] in (
                    "max_seconds", "max_samples"):
                raise RecipeError(f"{source}: variants[{j}] ({v.name}).set.{key}: the compare's budget "
                                  f"({rec.budget.kind}: {rec.budget.value}) sets the budget of every arm's rl "
                                  f"stages; remove the key from the variant")


def _check_objective(st: RLStage, i: int, source: str) -> None:
    """The stage's objective exists, is online, and takes the settings the stage gives it: the
    registry call the trainer makes (``loss_kwargs``), so a recipe it would refuse fails here."""
    from ccrl.objectives import HyperParameterError, get_objective

    where = f"stages[{i}] ({st.name})"
    try:
        spec = get_objective(st.objective)
    except RecipeError as e:
        raise RecipeError(f"{source}: {where}.objective: {e}") from None
    if spec.kind != "online":
        raise RecipeError(f"{source}: {where}.objective: {st.objective!r} is a preference objective; "
                          f"use a stage of kind {st.objective!r} instead")
    try:
        spec.loss_kwargs(**st.objective_settings())
    except HyperParameterError as e:
        raise RecipeError(f"{source}: stages[{i}].{e.key}: {e}") from None


def _check_council(rec: Recipe, st: RLStage, i: int, source: str) -> None:
    """A council objective (ccrl) needs a policy with an overseer: refused here, not at run time."""
    from ccrl.models import spec_has_council
    from ccrl.objectives import get_objective

    if get_objective(st.objective).council and not spec_has_council(rec.model):
        raise RecipeError(
            f"{source}: stages[{i}] ({st.name}).objective: {st.objective!r} needs a council policy (an overseer over "
            f"personas), and this recipe's model has none; set model.council_head: true to wrap the model in "
            f"policies.CouncilHead, use a Quillan preset, or choose another objective (grpo, dapo, dr_grpo, gspo)")


def _check_rewards(specs: list[RewardSpec], where: str, source: str) -> None:
    import rewards
    from ccrl.errors import CcrlError

    for j, r in enumerate(specs):
        try:
            rewards.bind(r.name, **r.params)
        except CcrlError as e:
            raise RecipeError(f"{source}: {where}[{j}]: {e}") from None



# --------------------------------------------------------------------------- files, model, context


def _check_text_file(path: str, key: str, source: str) -> None:
    """A json/jsonl/csv data file must be UTF-8: named with the byte offset at check time."""
    from ccrl.data.files import FORMATS, check_utf8
    from ccrl.errors import DataError

    if Path(path).is_file() and FORMATS.get(Path(path).suffix.lower()) in ("json", "csv"):
        try:
            check_utf8(path)
        except DataError as e:
            raise RecipeError(f"{source}: {key}: {e}") from None
        except OSError as e:
            raise RecipeError(f"{source}: {key}: cannot read {path} ({e.strerror or e})") from None


def model_context(rec: Recipe, source: str = "<recipe>", build: bool = False) -> int | None:
    """The policy's context length (``max_position_embeddings``), or None when it has none.

    With ``build``, an ``hf_config`` model is also built on the meta device (no memory, no
    weights), so a configuration transformers refuses (heads that do not divide the width, an
    unknown field value) fails at check time, naming ``model.hf_config``."""
    m = rec.model
    if m.preset is not None:
        from policies import QuillanConfig

        try:
            cfg = QuillanConfig.preset(m.preset, **m.overrides)
        except Exception as e:  # noqa: BLE001 - any refusal of the config is bad input
            raise RecipeError(f"{source}: model: invalid Quillan configuration: {_one_line(e)}") from None
    elif m.hf_config is not None:
        cfg = _hf_config(m.hf_config, source, build)
    else:
        cfg = _checkpoint_config(Path(m.checkpoint))
    if cfg is None:
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _hf_config(hf: dict, source: str, build: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(hf)
    model_type = hf.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **hf)
        if build:
            with torch.device("meta"):
                AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, KeyError, its own validation errors
        raise RecipeError(f"{source}: model.hf_config: cannot build a {model_type!r} causal LM: {_one_line(e)}") from None
    return cfg


def _checkpoint_config(path: Path) -> dict | None:
    import json

    from policies.council_head import HEAD_CONFIG

    council = (path / HEAD_CONFIG).exists()                # a council-head folder: the wrapped model's config
    f = path / "base" / "config.json" if council else path / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_lengths(rec: Recipe, ctx: int | None, source: str) -> None:
    """Lengths fixed by the recipe alone (no data needed) against the model's context."""
    if ctx is None:
        return
    checks = [("eval.max_new_tokens", rec.eval.max_new_tokens)]
    for i, st in enumerate(rec.stages):
        if st.kind == "pretrain":
            checks.append((f"stages[{i}].seq_len", st.seq_len))
        elif isinstance(st, RLStage):
            checks.append((f"stages[{i}].max_new_tokens", st.max_new_tokens))
        elif isinstance(st, PreferenceStage) and st.pairs.from_policy:
            checks.append((f"stages[{i}].pairs.max_new_tokens", st.pairs.max_new_tokens))
    for key, n in checks:
        block = key.endswith("seq_len")
        if n > ctx or (n == ctx and not block):
            raise RecipeError(f"{source}: {key}: {n} tokens do not fit the model's context of {ctx} positions "
                              f"(max_position_embeddings)" + ("" if block else ", which must also hold the prompt")
                              + f"; lower {key.split('.')[-1]} or use a model with a longer context")


def check_prompt_lengths(rec: Recipe, tokenizer, examples_of) -> None:
    """Each stage's prompts plus the tokens generated or taught after them fit the model's context.

    Run when the run starts, before any stage trains (the tokenizer is needed to count tokens).
    ``examples_of(stage)`` returns the stage's (train, held-out) examples; a file's rows are
    named by their row number, a task's by the prompt. Raises RecipeError (exit 2)."""
    ctx = model_context(rec, rec.source)
    if ctx is None:
        return
    for i, st in enumerate(rec.stages):
        if st.kind == "pretrain":
            continue          # packed into blocks of seq_len (checked against the context with the recipe)
        if isinstance(st, RLStage):
            gen, key = st.max_new_tokens, f"stages[{i}].max_new_tokens"
        elif isinstance(st, PreferenceStage) and st.pairs.from_policy and st.data.task is not None:
            gen, key = st.pairs.max_new_tokens, f"stages[{i}].pairs.max_new_tokens"
        else:
            gen, key = 0, None
        train, heldout = examples_of(st)
        _check_split(rec, i, st, "training", train, gen, key, tokenizer, ctx)
        _check_split(rec, i, st, "held-out", heldout, max(gen, rec.eval.max_new_tokens),
                     key if gen >= rec.eval.max_new_tokens else None, tokenizer, ctx)


def _check_split(rec, i, st, split, examples, gen, key, tokenizer, ctx) -> None:
    examples = [e for e in examples if isinstance(e.prompt, str)]   # message lists: rendered by the trainer
    if not examples:
        return
    prompt_ids = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    taught = st.kind == "sft" and split == "training"
    answer_ids = (tokenizer([e.answer or "" for e in examples], add_special_tokens=False)["input_ids"]
                  if taught else [[]] * len(examples))
    for e, ids, ans in zip(examples, prompt_ids, answer_ids):
        n = len(ids) + 1 + (len(ans) + 1 if taught else 0)     # + bos (and eos after a taught answer)
        if n + gen <= ctx:
            continue
        where = (f"data file {st.data.path}, {_row_of(st, e.prompt)}" if st.data.path
                 else f"task {st.data.task!r}, {split} prompt {_clip(e.prompt)}")
        what = (f"{len(ids)} prompt tokens" + (f" and {len(ans)} answer tokens" if taught else "")
                + (f" plus {gen} generated tokens ({key or 'eval.max_new_tokens'})" if gen else ""))
        raise RecipeError(f"{rec.source}: stages[{i}] ({st.name}).data: {where}: {what} need {n + gen} positions, "
                          f"more than the model's context of {ctx} (max_position_embeddings); shorten or drop the "
                          f"row, lower max_new_tokens, or use a model with a longer context")


def _row_of(st, prompt: str) -> str:
    """"row N (prompt '...')": the 1-based data row of a file whose prompt is ``prompt``."""
    from ccrl.data.files import load_rows

    kind = {"pretrain": "pretrain", "sft": "sft", "rl": "rl"}.get(st.kind, "preference")
    rows = load_rows(st.data.path, kind, st.data.columns)
    row = next((k for k, r in enumerate(rows, start=1) if r.get("prompt", r.get("text")) == prompt), None)
    return f"row {row} (prompt {_clip(prompt)})" if row else f"the row with prompt {_clip(prompt)}"


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
