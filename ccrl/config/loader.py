"""Loading a recipe: read the YAML, resolve ``base:`` and ``set:``, apply overrides, build, validate.

Recipes build on one another: a file with ``base: quickstart.yaml`` (a path relative to that
file) starts from the base recipe's mapping, deep-merges its own top-level keys over it
(mappings merge key by key; lists and scalars replace) and then applies its ``set:`` mapping of
dotted overrides, the same keys ``--set`` takes (``set: {stages.rl.objective: grpo}``), so a
variant names only what differs. Bases may themselves have bases; a cycle is an error.

Every failure is a :class:`ccrl.errors.RecipeError` whose message names the file, the key path
(``stages[2].epsilon_high``) and what was expected; the CLI prints it and exits 2.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from ccrl.config.coerce import did_you_mean, from_dict, value_repr
from ccrl.config.overrides import apply_overrides, stage_name
from ccrl.config.schema import STAGE_KINDS, ModelConfig, Recipe
from ccrl.config.validate import check_semantics
from ccrl.errors import RecipeError


def load_recipe(recipe: str | os.PathLike | dict, overrides: dict | list[str] | None = None, *,
                check_variants: bool = True) -> Recipe:
    """Read (if a path), apply overrides, validate; returns a :class:`Recipe` or raises RecipeError.

    ``check_variants``: also validate each compare variant as the recipe it runs (the base with the
    variant's ``set``). ``ccrl run`` turns it off: it runs the base alone, and with a variant's
    overrides already applied (the reproduce line of a compare's run) another variant's ``set`` on
    top of them need not make a valid recipe (``objective: ccrl`` over ``trainer: trl``)."""
    if isinstance(recipe, (str, os.PathLike)):
        source = str(recipe)
        raw = _resolve_base(_read_yaml(source), source, ())
    elif isinstance(recipe, dict):
        source, raw = "<recipe>", copy.deepcopy(recipe)
    else:
        raise RecipeError(f"a recipe must be a YAML path or a mapping, got {type(recipe).__name__}")
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: the recipe must be a mapping of keys to values, got {type(raw).__name__}")
    if overrides:
        raw = apply_overrides(raw, overrides, source=source)
    check_finite(raw, source)
    rec = _build_recipe(raw, source)
    check_semantics(rec, source)
    if check_variants:
        _check_variants(rec, source)
    return rec


def _check_variants(rec: Recipe, source: str) -> None:
    """Each compare variant is a recipe of its own: the base recipe with the variant's ``set`` applied."""
    base = {k: val for k, val in rec.raw.items() if k not in ("variants", "shared_stages", "budget", "baseline")}
    for j, v in enumerate(rec.variants):
        try:
            load_recipe(base, v.set)
        except RecipeError as e:
            raise RecipeError(f"{source}: variants[{j}] ({v.name}): {e}") from None


def _read_yaml(path: str) -> Any:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        from ccrl.data.files import utf8_message

        raise RecipeError(utf8_message(path, raw, e, "recipe file")) from None
    try:
        return yaml.safe_load(text)
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
            raise RecipeError(f"{path}: base: expected the path of another recipe file, got {value_repr(base)}")
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
                              f"e.g. {{stages.rl.lr: 1.0e-4}}, got {value_repr(sets)}")
        raw = apply_overrides(raw, {str(k): v for k, v in sets.items()}, source=path)
    return raw


def check_finite(value: Any, source: str, path: str = "") -> None:
    """No NaN or infinity anywhere in a recipe (YAML reads ``.nan`` and ``.inf`` as numbers, and
    NaN passes every range check, since every comparison with it is false)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{source}: {path or 'recipe'}: expected a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, source, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, source, f"{path}[{i}]")


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else copy.deepcopy(v)
    return out


def _build_recipe(raw: dict, source: str) -> Recipe:
    raw = copy.deepcopy(raw)
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
                              + did_you_mean(str(kind), list(STAGE_KINDS)))
        s = dict(s)
        s["name"] = stage_name(s, i, stages_raw)
        for key in ("rewards",):
            if key in s:
                s[key] = _reward_entries(s[key], f"{where}.{key}", source)
        stages.append(from_dict(STAGE_KINDS[kind], s, where, source))
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
    body["model"] = from_dict(ModelConfig, model, "model", source)
    body["source"] = source
    rec = from_dict(Recipe, body, "", source, prebuilt=("stages", "model"))
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

