"""Running a recipe: its stages in order, each starting from the previous stage's checkpoint.

Under the recipe's ``output_dir``::

    recipe.yaml         the validated recipe (after overrides)
    metrics.jsonl       one line per optimizer step of every stage
    summary.json        per stage: checkpoint, steps run (fewer than ``steps`` after an ``early_stop``),
                        wall time and held-out metrics (rewritten after each stage)
    <stage>/            the stage's final checkpoint
    <stage>-last/       the latest in-progress checkpoint (periodic, SIGINT, or the last good one
                        before a divergence); removed when the stage completes

``resume=True`` (``ccrl run --resume``) skips completed stages (their final checkpoint says so)
and continues an interrupted stage from ``<stage>-last`` exactly where it stopped.

Under ``accelerate launch -m ccrl run`` every process runs this function; only the main process
writes files and prints (see ``ccrl.trainers.base`` for how the processes share a step). DDP is
set up with ``find_unused_parameters`` (a routed expert may see no token in a micro-batch) and
without buffer broadcasts (the router load counts are summed by the trainer instead).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ccrl.config import Recipe, load_recipe
from ccrl.errors import CcrlError, DataError


def trainer_class(kind: str):
    if kind == "pretrain":
        from ccrl.trainers.supervised import PretrainTrainer as cls
    elif kind == "sft":
        from ccrl.trainers.supervised import SFTTrainer as cls
    elif kind == "rl":
        from ccrl.trainers.rl import RLTrainer as cls
    else:
        from ccrl.trainers.preference import PreferenceTrainer as cls
    return cls


def run_recipe(recipe, overrides=None, resume: bool = False, callbacks=None, show_progress: bool | None = None,
               log=print) -> dict[str, Any]:
    """Run every stage of a recipe; returns the summary (also written to summary.json)."""
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    _quiet_libraries()
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    out = Path(rec.output_dir)
    if rec.threads:
        torch.set_num_threads(rec.threads)
    accelerator = _accelerator(rec)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _write_recipe(rec, out)
        if not resume:
            for f in ("metrics.jsonl", "summary.json"):
                (out / f).unlink(missing_ok=True)
    else:
        log = _silent
    accelerator.wait_for_everyone()
    tokenizer = _tokenizer(rec)
    summary = _load_summary(out) if resume else None
    if summary is None or summary.get("recipe") != rec.name:
        summary = {"recipe": rec.name, "seed": rec.seed, "output_dir": str(out), "stages": [],
                   "versions": versions(), "hardware": hardware(), "command": " ".join(sys.argv)}
    done = {s["name"]: s for s in summary["stages"]}
    prev_ckpt: Path | None = None
    for i, stage in enumerate(rec.stages):
        final = out / stage.name
        if resume and stage.name in done and _complete(final):
            log(f"[{stage.name}] already complete, skipped")
            prev_ckpt = final
            continue
        t0 = time.perf_counter()
        model = _stage_model(rec, stage, prev_ckpt, tokenizer, i)
        ctx = _context(rec, stage, i, out, accelerator, tokenizer, callbacks, show_progress)
        trainer = trainer_class(stage.kind)(stage, model, ctx)
        last = out / f"{stage.name}-last"
        resume_from = last if resume and (last / "trainer_state.json").exists() else None
        if resume_from is not None:
            from ccrl.models import load_weights_into

            load_weights_into(trainer.unwrapped, resume_from)
            log(f"[{stage.name}] resuming from {resume_from}")
        log(f"[{stage.name}] {stage.kind}: {stage.steps} steps")
        metrics = trainer.train(resume=resume_from)
        metrics.update(trainer.final_metrics() if hasattr(trainer, "final_metrics") else {})
        trainer.save(final, complete=True)
        if accelerator.is_main_process and last.exists():
            shutil.rmtree(last)
        entry = {"name": stage.name, "kind": stage.kind, "checkpoint": str(final), "steps": trainer.step,
                 "wall_time_s": round(time.perf_counter() - t0, 3), "metrics": metrics}
        if trainer.stopped_early:
            log(f"[{stage.name}] early stop at step {trainer.step} of {stage.steps}: greedy accuracy "
                f"{trainer.early_stop_last:.3f} on {len(trainer.early_stop_sample)} training prompts "
                f">= {stage.early_stop.accuracy}")
        summary["stages"] = [s for s in summary["stages"] if s["name"] != stage.name] + [entry]
        if accelerator.is_main_process:
            _write_json(out / "summary.json", summary)
        log(f"[{stage.name}] done in {entry['wall_time_s']:.1f}s: " + format_metrics(metrics))
        prev_ckpt = final
        del trainer, model
    return summary


def _silent(*_args, **_kwargs) -> None:
    """The log of every process but the main one."""


def _quiet_libraries() -> None:
    """Checkpoint save/load progress bars of transformers would drown our own progress output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def format_metrics(m: dict) -> str:
    keys = ["heldout_accuracy", "preference_accuracy", "value"] + sorted(k for k in m if k.startswith("reward/"))
    return ", ".join(f"{k}={m[k]:.3f}" for k in keys if k in m and isinstance(m[k], (int, float)))


# --------------------------------------------------------------------------- pieces


def _accelerator(rec: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = rec.device == "cpu" or (rec.device == "auto" and not torch.cuda.is_available())
    if rec.device == "cuda" and not torch.cuda.is_available():
        raise CcrlError("recipe: device is 'cuda' but no CUDA device is available; use device: auto or cpu")
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
    return Accelerator(cpu=cpu, mixed_precision=rec.mixed_precision, kwargs_handlers=[ddp])


def _tokenizer(rec: Recipe):
    from ccrl import data

    if rec.model.checkpoint is not None:
        from ccrl.models import load_tokenizer

        return load_tokenizer(rec.model.checkpoint)
    if rec.tokenizer.kind == "char" and all(s.data.task is not None for s in rec.stages):
        return data.default_tokenizer()
    corpus: list[str] = []
    for s in rec.stages:
        if s.data.task is not None:
            corpus.extend(data.get_task(s.data.task, **s.data.options).corpus())
        else:
            for row in _file_rows(s):
                corpus.extend(str(v) for v in row.values() if isinstance(v, str))
    return data.build_tokenizer(corpus, kind=rec.tokenizer.kind, vocab_size=rec.tokenizer.vocab_size)


def _file_kind(stage) -> str:
    return {"pretrain": "pretrain", "sft": "sft", "rl": "rl"}.get(stage.kind, "preference")


def _file_rows(stage) -> list[dict]:
    from ccrl.data.files import load_rows

    return load_rows(stage.data.path, _file_kind(stage), stage.data.columns)


def _examples(rec: Recipe, stage):
    """(task or None, train examples, held-out examples) of a stage."""
    from ccrl import data

    d = stage.data
    if d.task is not None:
        task = data.get_task(d.task, **d.options)
        return task, task.examples("train", d.num_examples, seed=rec.seed), task.examples("heldout", d.heldout_size, seed=0)
    from ccrl.data.files import examples_from_rows, load_rows

    kind = _file_kind(stage)
    train = examples_from_rows(load_rows(d.path, kind, d.columns, split="train"))
    heldout = examples_from_rows(load_rows(d.path, kind, d.columns, split="heldout"))[: d.heldout_size]
    if not train:
        raise DataError(f"{d.path}: no rows fall in the training split (rows are split by a hash of the prompt)")
    return None, train, heldout


def _context(rec, stage, i, out, accelerator, tokenizer, callbacks, show_progress):
    from ccrl.trainers.base import RunContext

    task, train, heldout = _examples(rec, stage)
    specs = getattr(stage, "rewards", None) or rec.rewards
    return RunContext(output_dir=out, seed=rec.seed, stage_index=i, stage_name=stage.name, accelerator=accelerator,
                      tokenizer=tokenizer, task=task, heldout=heldout, train_examples=train, reward_specs=list(specs),
                      eval_config=rec.eval, callbacks=list(callbacks or []), show_progress=show_progress)


def _stage_model(rec: Recipe, stage, prev_ckpt: Path | None, tokenizer, i: int):
    from ccrl.models import build_model, load_policy

    if prev_ckpt is None:
        model = build_model(rec.model, tokenizer, seed=rec.seed)
    else:
        model, _ = load_policy(prev_ckpt)
    if stage.peft is not None:
        model = apply_peft(model, stage.peft)
    return model


def apply_peft(model, peft_cfg):
    """Wrap ``model`` with LoRA adapters (BitLinear layers are nn.Linear, so they are adaptable)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                     target_modules=peft_cfg.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise CcrlError(f"peft: cannot apply LoRA adapters: {e}") from None


def _complete(path: Path) -> bool:
    f = path / "trainer_state.json"
    if not f.exists():
        return False
    try:
        return bool(json.loads(f.read_text()).get("complete"))
    except json.JSONDecodeError:
        return False


def _load_summary(out: Path) -> dict | None:
    f = out / "summary.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _write_recipe(rec: Recipe, out: Path) -> None:
    import yaml

    (out / "recipe.yaml").write_text(yaml.safe_dump(rec.raw, sort_keys=False))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for pkg in ("ccrl", "torch", "transformers", "trl", "peft", "accelerate"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = "not installed"
    return v


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["gpus"] = torch.cuda.device_count()
    return hw
