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
        if isinstance(st, RLStage):
            _check_objective(st, i, source)
            _check_council(rec, st, i, source)
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
            from ccrl.config.loader import load_recipe

            load_recipe({k: val for k, val in rec.raw.items() if k not in ("variants", "shared_stages")}, v.set)
        except RecipeError as e:
            raise RecipeError(f"{source}: variants[{j}] ({v.name}): {e}") from None


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

