"""What ``--resume`` continues: the recipe a run started with, and what a resume may change.

A run records the recipe it started with, every default filled in and every inherited value
resolved (a stage's ``data`` taken from the stage before, the top-level ``rewards`` copied into
the stages that name none), in ``output_dir/recipe.lock.yaml``. That file is written once, when
the run starts fresh, and never rewritten by a resume.

``ccrl run --resume`` compares the recipe it is given (after ``--set``) with the recipe in effect
(the lock plus the changes earlier resumes applied, see below), key by key:

- **Refused (exit 2), listing the changed keys:** the run's identity — ``name``, ``seed``,
  ``model.*``, ``tokenizer.*``, any stage's ``data.*`` or ``kind``, the order and names of the
  stages that have started. The weights and data of the run belong to these values; continuing
  with others would mix two experiments in one folder (and a different model width cannot
  even load the saved weights).
- **Refused as well:** any setting of a stage that has completed (it can no longer take
  effect), and in the interrupted stage the settings that change which parameters train or
  how they are grouped (``peft``, ``quantized_lr_scale``), or ``steps`` below the steps it has
  already run.
- **Applied and recorded:** every other change — the interrupted stage's training settings
  (``lr``, ``steps``, ``lr_schedule``, ``warmup_steps``, ``batch_size``, sampling and objective
  settings, rewards ...), stages not yet started, added stages, and run-wide settings such as
  ``eval``, ``device`` or ``threads``. The interrupted stage continues from its saved step
  with the optimizer's moments, and its learning rate follows the new schedule from that step
  on (the schedule recomputed over the new ``steps``, as if it had been planned so from the
  start). Each resume appends an entry to ``resume_history`` in ``summary.json``: when, the
  command, the stage and step it continued from, and each changed key with its old and new
  value and the stage and step from which the new value applies.

Why apply rather than refuse training settings: lowering the learning rate after a divergence
and continuing is what the divergence message itself advises, and a user who passes ``--set
stages.sft.lr=1e-4`` together with ``--resume`` expects the new value to be used. PyTorch
Lightning (``ckpt_path=``) and transformers' ``Trainer(resume_from_checkpoint=)`` restore the
optimizer and scheduler state, learning rates included, so a changed learning rate is silently
ignored there (a long-standing source of confusion in both issue trackers); ccrl neither ignores
the change nor hides it. ``recipe.yaml`` holds the recipe in effect since the latest start, with
a header pointing at the lock and the history, so it never stands alone as a claim about steps
trained before a change.

A run folder written before the lock existed is compared with its ``recipe.yaml`` (the recipe of
its latest start) when that still loads, and resumed unchecked otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from ccrl.errors import RecipeError

LOCK = "recipe.lock.yaml"
_NOT_COMPARED = ("output_dir", "variants", "seeds", "report_dir", "shared_stages", "raw", "source")
_IDENTITY = ("name", "seed", "model", "tokenizer")
_FIXED_IN_STAGE = ("peft", "quantized_lr_scale", "kind")
_MISSING = "<not set>"


class ResumeMismatch(RecipeError):
    """``--resume`` was given a recipe whose model, tokenizer or data differ from the run's."""


def resolved(rec) -> dict[str, Any]:
    """The recipe as the run uses it: every field with its value, JSON-plain (no tuples)."""
    d = {k: v for k, v in dataclasses.asdict(rec).items() if k not in _NOT_COMPARED}
    return json.loads(json.dumps(d, default=str))


def flatten(res: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as ``--set`` writes them; stages are addressed by name (``stages.sft.lr``)."""
    out: dict[str, Any] = {"stages": [s["name"] for s in res.get("stages", [])]}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        else:
            out[prefix] = v

    for k, v in res.items():
        if k == "stages":
            for s in v:
                for sk, sv in s.items():
                    if sk != "name":
                        walk(f"stages.{s['name']}.{sk}", sv)
        else:
            walk(k, v)
    return out


def stage_progress(out: Path, name: str) -> tuple[str, int]:
    """("complete" | "started" | "new", steps run) of stage ``name`` in run folder ``out``."""
    for folder, state in ((out / name, "complete"), (out / f"{name}-last", "started")):
        f = folder / "trainer_state.json"
        if f.exists():
            try:
                meta = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if state == "started" or meta.get("complete"):
                return state, int(meta.get("step", 0))
    return "new", 0


# --------------------------------------------------------------------------- comparing


def recipe_in_effect(out: Path) -> dict[str, Any] | None:
    """Flat keys of the recipe in effect in run folder ``out``: the lock with every change an
    earlier resume applied; None when the folder records no recipe (or one that no longer loads)."""
    import yaml

    lock = out / LOCK
    if lock.exists():
        try:
            doc = yaml.safe_load(lock.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RecipeError(f"{lock}: cannot read the recipe this run started with ({e}); restore the file, or "
                              f"start a new run with --overwrite") from None
        flat = flatten(doc["recipe"])
        for entry in _history(out):
            for c in entry.get("changes", []):
                if c.get("to") == _MISSING:
                    flat.pop(c["key"], None)
                else:
                    flat[c["key"]] = c.get("to")
        return flat
    legacy = out / "recipe.yaml"
    if not legacy.exists():
        return None
    try:
        from ccrl.config import load_recipe

        return flatten(resolved(load_recipe(yaml.safe_load(legacy.read_text(encoding="utf-8")))))
    except Exception:  # an old recipe that no longer validates: nothing to compare with
        return None


def resume_changes(rec, out: Path) -> list[dict[str, Any]] | None:
    """The changes ``rec`` makes to the run in ``out``, each ``{key, from, to, applies_from}``;
    raises :class:`ResumeMismatch` listing the changes a resume cannot apply. None when the folder
    records no recipe to compare with."""
    before = recipe_in_effect(out)
    if before is None:
        return None
    now = flatten(resolved(rec))
    progress = {n: stage_progress(out, n) for n in before["stages"]}
    # the tokenizer is trained on every stage's data unless it is the built-in one or a checkpoint's
    corpus_tokenizer = rec.model.checkpoint is None and not (
        rec.tokenizer.kind == "char" and all(s.data.task is not None for s in rec.stages))
    refused, applied = [], []
    for key in sorted(set(before) | set(now), key=_order(now, before)):
        old, new = before.get(key, _MISSING), now.get(key, _MISSING)
        if old == new:
            continue
        change = {"key": key, "from": old, "to": new}
        why = _refusal(key, old, new, progress, corpus_tokenizer)
        if why:
            refused.append((change, why))
        else:
            change["applies_from"] = _applies_from(key, progress)
            applied.append(change)
    if refused:
        refused.sort(key=lambda r: r[0]["key"].split(".")[0] not in _IDENTITY)   # model, tokenizer... first
        lines = "; ".join(f"{c['key']}: {_short(c['from'])} -> {_short(c['to'])} ({why})" for c, why in refused)
        raise ResumeMismatch(
            f"{out}: --resume refuses to continue this run with a different recipe: {lines}. Undo these changes to "
            f"continue the run, or start a new one (--overwrite, or another output_dir). Settings of the stage "
            f"that was interrupted and of later stages may change on --resume (the change is recorded in "
            f"summary.json's resume_history)")
    return applied


def _refusal(key: str, old: Any, new: Any, progress: dict[str, tuple[str, int]], corpus_tokenizer: bool) -> str | None:
    parts = key.split(".")
    if key == "stages":
        started = [n for n in old if progress.get(n, ("new", 0))[0] != "new"]
        k = max((old.index(n) for n in started), default=-1) + 1
        if list(new[:k]) != list(old[:k]):
            return "the stages that have run must keep their names and order"
        return None
    if parts[0] in _IDENTITY:
        return "the run's model, tokenizer, seed and name are fixed"
    if parts[0] != "stages" or len(parts) < 3:
        return None
    stage, field = parts[1], parts[2]
    state, step = progress.get(stage, ("new", 0))
    if field == "data":
        if old != _MISSING:
            return "a stage's data is fixed once the run has started"
        if corpus_tokenizer:
            return "the tokenizer was trained on the data of the stages the run started with"
        return None
    if state == "complete":
        return f"stage {stage} has completed; its settings can no longer take effect"
    if state == "started":
        if field in _FIXED_IN_STAGE:
            return f"stage {stage} was interrupted at step {step}; {field} cannot change in the middle of a stage"
        if field == "steps" and isinstance(new, int) and new < step:
            return f"stage {stage} has already run {step} steps"
    return None


def _applies_from(key: str, progress: dict[str, tuple[str, int]]) -> str:
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) >= 3:
        state, step = progress.get(parts[1], ("new", 0))
        return f"stage {parts[1]}, step {step + 1}" if state == "started" else f"stage {parts[1]}, from its start"
    return "the stages still to run or score"


def _order(now: dict, before: dict):
    keys = list(now) + [k for k in before if k not in now]
    pos = {k: i for i, k in enumerate(keys)}
    return lambda k: pos[k]


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


# --------------------------------------------------------------------------- recording


def write_lock(rec, out: Path) -> None:
    """Record the recipe the run starts with (a fresh run; never called by a resume)."""
    import yaml

    doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "recipe": resolved(rec)}
    header = ("# The recipe this run started with, every default filled in. Written once; changes applied by\n"
              "# `ccrl run --resume` are listed in summary.json under resume_history.\n")
    _write_text(out / LOCK, header + yaml.safe_dump(doc, sort_keys=False))


def record_resume(out: Path, summary: dict, changes: list[dict] | None, progress: str) -> dict:
    """Append this resume to ``summary['resume_history']`` (the caller writes the summary)."""
    entry = {"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
             "continued_from": progress, "changes": changes if changes is not None else [],
             **({"note": "the folder records no recipe to compare with; changes unknown"} if changes is None else {})}
    summary.setdefault("resume_history", []).append(entry)
    return summary


def resume_point(rec, out: Path) -> str:
    """Where a resume continues: the first stage that is not complete, and its step."""
    for s in rec.stages:
        state, step = stage_progress(out, s.name)
        if state != "complete":
            return f"stage {s.name}, step {step}"
    return "every stage complete (held-out scoring only)"


def recipe_header(resumed_with_changes: bool) -> str:
    if not resumed_with_changes:
        return ""
    return ("# The recipe in effect since the latest `ccrl run --resume`, which changed some settings: steps\n"
            "# run before that used the values in recipe.lock.yaml and summary.json's resume_history.\n")


def _history(out: Path) -> list[dict]:
    f = out / "summary.json"
    try:
        return list(json.loads(f.read_text()).get("resume_history", [])) if f.exists() else []
    except (OSError, ValueError, AttributeError):
        return []


def _write_text(path: Path, text: str) -> None:
    import os

    from ccrl.checkpoint import CheckpointWriteError

    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"{path}: could not be written ({e}); is the disk full or the folder read-only? "
                                   f"Nothing in the run folder was changed") from None
