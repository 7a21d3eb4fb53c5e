"""Recipes: YAML mapped one-to-one onto config dataclasses, validated before anything runs.

    schema.py     the dataclasses (one per recipe section; a docstring under every field),
                  SamplingSettings, STAGE_KINDS, field_docs
    coerce.py     YAML values → dataclasses: types, unknown keys with a did-you-mean
    overrides.py  dotted-key overrides (``--set stages.rl.lr=1e-4``, a recipe's ``set:``)
    loader.py     load_recipe: read, resolve ``base:``/``set:``, override, build, validate
    validate.py   cross-field checks against the registries (tasks, objectives, rewards, files)

Validation (:func:`load_recipe`) checks, before any stage runs: unknown keys (with a
did-you-mean), wrong types, out-of-range values, unknown tasks/objectives/rewards, objective
settings the objective does not take, and missing files. Every failure is a
:class:`ccrl.errors.RecipeError` whose message names the file, the key path
(``stages[2].epsilon_high``) and what was expected; the CLI prints it and exits 2.

Why not Hydra/OmegaConf: recipes must fail with one clear paragraph naming the key, and must
stay importable without extra dependencies; a small validator over dataclasses does that.
"""

from __future__ import annotations

from ccrl.config.loader import load_recipe
from ccrl.config.overrides import apply_overrides, parse_set
from ccrl.config.schema import (
    STAGE_KINDS,
    DataConfig,
    EarlyStopConfig,
    EvalConfig,
    ModelConfig,
    PairsConfig,
    PeftConfig,
    PreferenceStage,
    PretrainStage,
    Recipe,
    RewardSpec,
    RLStage,
    SamplingSettings,
    SFTStage,
    StageConfig,
    TokenizerConfig,
    Variant,
    field_docs,
)

__all__ = [
    "STAGE_KINDS",
    "DataConfig",
    "EarlyStopConfig",
    "EvalConfig",
    "ModelConfig",
    "PairsConfig",
    "PeftConfig",
    "PreferenceStage",
    "PretrainStage",
    "RLStage",
    "Recipe",
    "RewardSpec",
    "SFTStage",
    "SamplingSettings",
    "StageConfig",
    "TokenizerConfig",
    "Variant",
    "apply_overrides",
    "field_docs",
    "load_recipe",
    "parse_set",
]
