"""Dotted-key overrides: ``ccrl run R.yaml --set stages.rl.lr=1e-4`` and a recipe's ``set:``.

Overrides are applied to the raw mapping before validation. A dotted key addresses a stage by
its ``name`` (which defaults to its ``kind``, numbered when a kind repeats) or by its index:
``stages.rl.lr`` and ``stages.2.lr`` are the same key in a recipe whose third stage is the only
``rl`` stage. Values are parsed as YAML scalars (``1e-4``, ``true``, ``[1, 2]``).
"""

from __future__ import annotations

import copy
from typing import Any

from ccrl.config.coerce import did_you_mean
from ccrl.errors import RecipeError


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
    raw = copy.deepcopy(raw)
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
    names = [stage_name(s, i, stages) for i, s in enumerate(stages)]
    if part in names:
        return names.index(part)
    raise RecipeError(f"{source}: override {key!r}: no stage named {part!r}; stages are {names}"
                      + did_you_mean(part, names))


def _list_index(node: list, part: str, key: str, source: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"{source}: override {key!r}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def stage_name(stage: Any, i: int, stages: list) -> str:
    if isinstance(stage, dict) and stage.get("name"):
        return str(stage["name"])
    kind = stage.get("kind", "stage") if isinstance(stage, dict) else "stage"
    same = [j for j, s in enumerate(stages) if isinstance(s, dict) and s.get("kind") == kind and not s.get("name")]
    return kind if len(same) == 1 else f"{kind}{same.index(i) + 1}"

