"""Running a recipe: its stages in order, each starting from the previous stage's checkpoint.

Under the recipe's ``output_dir``::

    recipe.yaml         the validated recipe (after overrides): the one in effect since the latest start
    recipe.lock.yaml    the recipe the run started with, resolved (written once; ``ccrl.resume``)
    metrics.jsonl       one line per optimizer step of every stage
    summary.json        per stage: checkpoint, steps run (fewer than ``steps`` when ``stopped_by`` says
                        early_stop, max_seconds, max_samples or callback), wall time and held-out metrics
                        (rewritten after each stage)
    tensorboard/        with ``report_to: [tensorboard]``: the event files of the run's metrics
    completions/        with an rl stage's ``log_completions_every``: ``<stage>.jsonl``, its completions tables
    <stage>/            the stage's final checkpoint
    <stage>-last/       the latest in-progress checkpoint (periodic, SIGINT, or the last good one
                        before a divergence); removed when the stage completes

``resume=True`` (``ccrl run --resume``) skips completed stages (their final checkpoint says so)
and continues an interrupted stage from ``<stage>-last`` exactly where it stopped; a stage whose
final checkpoint was saved but whose held-out scoring failed is scored again, not retrained.
It first compares the recipe with the one the run started with (``ccrl.resume``): a changed
model, tokenizer or data is refused, other changes apply from the resumed step and are recorded
in ``summary.json``'s ``resume_history``. Before any stage trains, every stage's prompts are
checked against the model's context (``ccrl.config.validate.check_prompt_lengths``).

Safety of the run folder (what a run never does to ``output_dir``):

- two runs never write it at once. A run holds an exclusive ``fcntl.flock`` on
  ``output_dir/.ccrl-run.lock`` (which records the pid and host) from before its first write to
  its end; the OS releases it when the process dies, however it dies. A second ``ccrl run``
  (with or without ``--resume``) on the folder is refused with :class:`RunFolderBusy` (exit 2),
  naming the pid that holds it. The lock file itself stays (it is not a result).
- a new run never erases the results of an earlier one. When ``output_dir`` holds
  ``summary.json``, ``metrics.jsonl``, ``completions/``, ``tensorboard/`` or stage checkpoints, a run without
  ``resume`` is refused (exit 2) unless ``overwrite=True`` (``ccrl run --overwrite``). With it, the old results (those
  files, every stage checkpoint folder and ``recipe.yaml``; nothing else in the folder) are moved
  into ``output_dir/.overwritten/`` only once the new run has started successfully (lock taken,
  recipe valid, its data files readable, tokenizer built), and that folder is deleted when a run in the folder
  completes every stage. Until then they can be moved back by hand; a later ``--overwrite``
  replaces them with the results it moves aside.
- ``output_dir`` must be a folder: an existing file there is refused when the recipe is checked
  (``ccrl check``) and when the run starts (exit 2).
- temporary folders of a checkpoint save that was interrupted (the process killed mid-save) are
  removed when the next run on the folder starts (``ccrl.checkpoint.clean_interrupted_saves``).

What a failing stage keeps is described in ``ccrl.trainers.base``: the last good weights are
saved to ``<stage>-last`` (or the existing one is kept) and ``--resume`` continues from them; the
final checkpoint is written before held-out scoring, so a reward failing there loses no training.

Under ``accelerate launch -m ccrl run`` every process runs this function; only the main process
writes files and prints (see ``ccrl.trainers.base`` for how the processes share a step). DDP is
set up with ``find_unused_parameters`` (a routed expert may see no token in a micro-batch) and
without buffer broadcasts (the router load counts are summed by the trainer instead).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ccrl.config import Recipe, load_recipe
from ccrl.errors import CcrlError, DataError, RecipeError

LOCK_FILE = ".ccrl-run.lock"
LOCK_RECIPE = "recipe.lock.yaml"   # the recipe the run started with (ccrl.resume)
OVERWRITTEN = ".overwritten"
RESULT_FILES = ("summary.json", "metrics.jsonl", "completions", "tensorboard")
_PEFT_SALT = 2_711   # LoRA initialisation's random stream: ccrl.trainers.base.stream_seed(seed, stage, 0, salt)


class RunFolderError(CcrlError):
    """``output_dir`` cannot take this run: it holds an earlier run's results, or is a file."""


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder's lock (it is running a recipe into it)."""


def trainer_class(kind: str, trainer: str = "ccrl"):
    """The trainer class of a stage kind; an rl stage with ``trainer: trl`` gets TRL's GRPOTrainer
    behind ``ccrl.trainers.trl_arm.TRLArmTrainer``."""
    if kind == "pretrain":
        from ccrl.trainers.supervised import PretrainTrainer as cls
    elif kind == "sft":
        from ccrl.trainers.supervised import SFTTrainer as cls
    elif kind == "rl" and trainer == "trl":
        from ccrl.trainers.trl_arm import TRLArmTrainer as cls
    elif kind == "rl":
        from ccrl.trainers.rl import RLTrainer as cls
    else:
        from ccrl.trainers.preference import PreferenceTrainer as cls
    return cls


def run_recipe(recipe, overrides=None, resume: bool = False, callbacks=None, show_progress: bool | None = None,
               log=print, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage of a recipe; returns the summary (also written to summary.json).

    ``resume`` continues the run in ``output_dir``; ``overwrite`` replaces the results of an
    earlier run there (see the module docstring); without either, such results are refused.
    ``callbacks``: ``ccrl.Callback`` objects (or functions of ``(trainer, step, metrics)``) whose
    hooks run at the points ``ccrl.callbacks`` lists."""
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides, check_variants=False)
    if resume and overwrite:
        raise RecipeError("--resume and --overwrite contradict each other: continue the run, or replace it")
    _quiet_libraries()
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    out = Path(rec.output_dir)
    check_output_dir(out)
    if rec.threads:
        torch.set_num_threads(rec.threads)
    accelerator = _accelerator(rec)
    main = accelerator.is_main_process
    with run_lock(out) if main else contextlib.nullcontext():
        if main:
            old = existing_results(out, rec)
            if old and not resume and not overwrite:
                raise RunFolderError(
                    f"{out}: holds the results of an earlier run ({', '.join(p.name for p in old[:4])}"
                    f"{', ...' if len(old) > 4 else ''}); continue it with --resume, replace it with --overwrite "
                    f"(its results are moved aside, then deleted when the new run completes), or choose another "
                    f"output_dir")
            if overwrite:
                _check_not_needed(rec, old)
            clean_interrupted_saves_in(out)
            changes = _resume_changes(rec, out, resume and bool(old))
        else:
            log = _silent
        accelerator.wait_for_everyone()
        tokenizer = _tokenizer(rec)
        _check_prompt_lengths(rec, tokenizer)
        if main:
            if overwrite and old:
                set_aside(out, old)
            _record_start(rec, out, resume and bool(old), changes)
        accelerator.wait_for_everyone()
        with trackers(accelerator, rec):
            summary = _run_stages(rec, out, accelerator, tokenizer, resume, callbacks, show_progress, log)
        if main and (out / OVERWRITTEN).exists():
            shutil.rmtree(out / OVERWRITTEN, ignore_errors=True)
    return summary


def _run_stages(rec, out: Path, accelerator, tokenizer, resume: bool, callbacks, show_progress, log) -> dict:
    summary = _load_summary(out) if resume else None
    if summary is None or summary.get("recipe") != rec.name:
        summary = _new_summary(rec, out)
    done = {s["name"]: s for s in summary["stages"]}
    prev_ckpt: Path | None = None
    for i, stage in enumerate(rec.stages):
        final = out / stage.name
        trained = resume and _complete(final)
        if trained and stage.name in done:
            log(f"[{stage.name}] already complete, skipped")
            prev_ckpt = final
            continue
        t0 = time.perf_counter()
        model = _stage_model(rec, stage, prev_ckpt, tokenizer, i)
        ctx = _context(rec, stage, i, out, accelerator, tokenizer, callbacks, show_progress)
        trainer = trainer_class(stage.kind, getattr(stage, "trainer", "ccrl"))(stage, model, ctx)
        last = out / f"{stage.name}-last"
        resume_from = last if resume and (last / "trainer_state.json").exists() else None
        if trained:   # trained and saved, but its held-out scoring did not finish
            resume_from = final
        if resume_from is not None:
            _load_resume_weights(trainer, resume_from)
            log(f"[{stage.name}] " + ("trained earlier; held-out scoring" if trained else f"resuming from {resume_from}"))
        trl = " with TRL's GRPOTrainer" if getattr(stage, "trainer", "ccrl") == "trl" else ""
        log(f"[{stage.name}] {stage.kind}: {stage.steps} steps{trl}")
        metrics = trainer.train(resume=resume_from)   # saves ``final`` before scoring (ctx.final_checkpoint)
        if hasattr(trainer, "final_metrics"):
            with trainer.scoring_guard():
                metrics.update(trainer.final_metrics())
        entry = {"name": stage.name, "kind": stage.kind, "checkpoint": str(final), "steps": trainer.step,
                 "stopped_by": trainer.stopped_by, "wall_time_s": round(time.perf_counter() - t0, 3), "metrics": metrics}
        if getattr(trainer, "samples", None) is not None:   # rl stages: completions sampled
            entry["samples"] = trainer.samples
        _log_stop(trainer, log)
        trainer.track(metrics, prefix="eval/")
        trainer.callbacks.stage_end(trainer, metrics)
        summary["stages"] = [s for s in summary["stages"] if s["name"] != stage.name] + [entry]
        if accelerator.is_main_process:
            _write_json(out / "summary.json", summary)
        log(f"[{stage.name}] done in {entry['wall_time_s']:.1f}s: " + format_metrics(metrics))
        prev_ckpt = final
        del trainer, model
    return summary


def _log_stop(trainer, log) -> None:
    """Say why a stage ended before its planned steps (``trainer.stopped_by``)."""
    stage, why = trainer.stage, trainer.stopped_by
    if why is None:
        return
    where = f"[{stage.name}] {why.replace('_', ' ')} at step {trainer.step} of {stage.steps}"
    if why == "early_stop" and trainer.early_stop_last is not None:
        log(f"{where}: greedy accuracy {trainer.early_stop_last:.3f} on {len(trainer.early_stop_sample)} training "
            f"prompts >= {stage.early_stop.accuracy}")
    elif why == "max_seconds":
        log(f"{where}: {trainer.train_seconds:.1f}s of training >= max_seconds {stage.max_seconds}")
    elif why == "max_samples":
        log(f"{where}: {trainer.samples} completions sampled >= max_samples {stage.max_samples}")
    else:
        log(f"{where}" + (": a callback ended the stage" if why == "callback" else ""))


@contextlib.contextmanager
def trackers(accelerator, rec: Recipe):
    """The recipe's experiment trackers (``report_to``) for the ``with`` block: accelerate's
    ``init_trackers`` with the recipe as the run's configuration, ``end_training`` after it."""
    if not rec.report_to:
        yield
        return
    accelerator.init_trackers(rec.name, config=_flat_config(rec.raw))
    try:
        yield
    finally:
        accelerator.end_training()


def _flat_config(raw: dict, prefix: str = "") -> dict:
    """The recipe as ``{dotted.key: scalar}`` (what every tracker takes as hyper-parameters); stages
    are addressed by name, lists are written as text."""
    out = {}
    for k, v in raw.items():
        if k == "stages" and isinstance(v, list) and not prefix:
            for i, st in enumerate(v):
                if isinstance(st, dict):
                    from ccrl.config.overrides import stage_name

                    out.update(_flat_config(st, f"stages.{stage_name(st, i, v)}."))
            continue
        if isinstance(v, dict):
            out.update(_flat_config(v, f"{prefix}{k}."))
        elif isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
        elif v is not None:
            out[f"{prefix}{k}"] = json.dumps(v, default=str)
    return out


# --------------------------------------------------------------------------- the run folder


def check_output_dir(out) -> None:
    """Refuse an ``output_dir`` that cannot be a run folder (an existing file, or below one)."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"output_dir: {out} cannot be a run folder: {p} is an existing file. Remove it or "
                              f"set output_dir to a folder")
        if p.exists():
            break


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold the exclusive lock of run folder ``out`` (created if needed) for the ``with`` block.

    ``fcntl.flock`` on ``out/.ccrl-run.lock``: released by the OS when the process ends, however
    it ends, so a crashed run never leaves the folder locked. Raises :class:`RunFolderBusy`
    naming the holder's pid and host when another process holds it."""
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / LOCK_FILE, "a+")
    except OSError as e:
        raise RunFolderError(f"output_dir: cannot create the run folder {out}: {e}") from None
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = _lock_holder(fh.read())
            raise RunFolderBusy(
                f"{out}: another ccrl run is writing this folder ({holder}); wait for it to finish or stop it, "
                f"or choose another output_dir. Two runs in one folder would mix their checkpoints and metrics") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        fh.flush()
        yield
    finally:
        fh.close()   # closing the file releases the lock


def _lock_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info.get('started', '?')}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet recorded its pid"


def existing_results(out: Path, rec=None) -> list[Path]:
    """What an earlier run left in ``out``: summary.json, metrics.jsonl and stage checkpoint
    folders (any folder holding ``trainer_state.json``, and the recipe's ``<stage>`` / ``<stage>-last``)."""
    if not out.is_dir():
        return []
    names = {n for s in (rec.stages if rec is not None else []) for n in (s.name, f"{s.name}-last")}
    found = []
    for p in sorted(out.iterdir()):
        if p.name.startswith("."):
            continue
        if p.name in RESULT_FILES or (p.is_dir() and (p.name in names or (p / "trainer_state.json").exists())):
            found.append(p)
    return found


def _check_not_needed(rec, old: list[Path]) -> None:
    """--overwrite must not move aside the checkpoint the new run starts from."""
    start = getattr(rec.model, "checkpoint", None)
    if start is None:
        return
    s = Path(start).resolve()
    for p in old:
        if s == p.resolve() or p.resolve() in s.parents:
            raise RunFolderError(f"model.checkpoint {start}: is one of the results --overwrite would replace; "
                                 f"copy it elsewhere first, or choose another output_dir")


def set_aside(out: Path, results: list[Path]) -> None:
    """Move an earlier run's results (and its recipe.yaml) into ``out/.overwritten/``."""
    aside = out / OVERWRITTEN
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    for p in [*results, out / "recipe.yaml", out / LOCK_RECIPE]:
        if p.exists():
            os.replace(p, aside / p.name)


def clean_interrupted_saves_in(out: Path) -> None:
    from ccrl.checkpoint import clean_interrupted_saves

    clean_interrupted_saves(out)
    (out / "summary.json.tmp").unlink(missing_ok=True)   # an interrupted summary write


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
    tracking = {}
    if rec.report_to:   # tensorboard writes under <output_dir>/tensorboard/<recipe name>
        from accelerate.utils import ProjectConfiguration

        tracking = {"log_with": list(rec.report_to), "project_config": ProjectConfiguration(
            project_dir=str(rec.output_dir), logging_dir=os.path.join(str(rec.output_dir), "tensorboard"))}
    return Accelerator(cpu=cpu, mixed_precision=rec.mixed_precision, kwargs_handlers=[ddp], **tracking)


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
                corpus.extend(data.files.row_texts(row))
            if s.data.eval_path is not None:
                for row in data.files.load_rows(s.data.eval_path, _file_kind(s), s.data.columns):
                    corpus.extend(data.files.row_texts(row))
    return data.build_tokenizer(corpus, kind=rec.tokenizer.kind, vocab_size=rec.tokenizer.vocab_size)


def _file_kind(stage) -> str:
    return {"pretrain": "pretrain", "sft": "sft", "rl": "rl"}.get(stage.kind, "preference")


def _file_rows(stage) -> list[dict]:
    from ccrl.data.files import load_rows

    return load_rows(stage.data.path, _file_kind(stage), stage.data.columns)


def _examples(rec: Recipe, stage, tokenizer=None):
    """(task or None, train examples, held-out examples) of a stage; conversational file rows are
    rendered with ``tokenizer``'s chat template."""
    from ccrl import data

    d = stage.data
    if d.task is not None:
        task = data.get_task(d.task, **d.options)
        return task, task.examples("train", d.num_examples, seed=rec.seed), task.examples("heldout", d.heldout_size, seed=0)
    from ccrl.data.files import examples_from_rows, load_rows

    kind, fraction = _file_kind(stage), d.split_fraction()
    train = examples_from_rows(load_rows(d.path, kind, d.columns, split="train", heldout_fraction=fraction),
                               tokenizer, d.path)
    if d.eval_path is not None:
        heldout = examples_from_rows(load_rows(d.eval_path, kind, d.columns), tokenizer, d.eval_path)
    else:
        heldout = examples_from_rows(load_rows(d.path, kind, d.columns, split="heldout", heldout_fraction=fraction),
                                     tokenizer, d.path)
    if not train:
        raise DataError(f"{d.path}: no rows fall in the training split (rows are split by a hash of the prompt; "
                        f"data.heldout_fraction: 0 trains on every row)")
    return None, train, heldout[: d.heldout_size]


def _context(rec, stage, i, out, accelerator, tokenizer, callbacks, show_progress):
    from ccrl.trainers.base import RunContext

    task, train, heldout = _examples(rec, stage, tokenizer)
    specs = getattr(stage, "rewards", None) or rec.rewards
    return RunContext(output_dir=out, seed=rec.seed, stage_index=i, stage_name=stage.name, accelerator=accelerator,
                      tokenizer=tokenizer, task=task, heldout=heldout, train_examples=train, reward_specs=list(specs),
                      eval_config=rec.eval, callbacks=list(callbacks or []), show_progress=show_progress,
                      final_checkpoint=out / stage.name, step_offset=sum(s.steps for s in rec.stages[:i]))


def _stage_model(rec: Recipe, stage, prev_ckpt: Path | None, tokenizer, i: int):
    from ccrl.models import build_model, cast_parameters, load_policy

    if prev_ckpt is None:
        model = build_model(rec.model, tokenizer, seed=rec.seed)
    else:
        model, _ = load_policy(prev_ckpt)
    cast_parameters(model, getattr(torch, rec.model.dtype))                # model.dtype, in every stage
    if stage.peft is not None:
        # LoRA's A matrices are drawn from torch's global generator: seed it from (seed, stage) so
        # the adapters start the same whether the stages before ran in this process or a resume
        # skipped them
        from ccrl.trainers.base import stream_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(rec.seed, i, salt=_PEFT_SALT))
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
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        from ccrl.checkpoint import CheckpointWriteError

        raise CheckpointWriteError(f"{path}: could not be written ({e}); is the disk full or the folder read-only? "
                                   f"The previous version of the file and every checkpoint in {path.parent} are "
                                   f"kept; free space and continue with --resume") from None


def _write_recipe(rec: Recipe, out: Path, header: str = "") -> None:
    import yaml

    from ccrl.resume import _write_text

    _write_text(out / "recipe.yaml", header + yaml.safe_dump(rec.raw, sort_keys=False))


# --------------------------------------------------------------------------- what a resume continues (ccrl.resume)


def _new_summary(rec: Recipe, out: Path) -> dict:
    return {"recipe": rec.name, "seed": rec.seed, "output_dir": str(out), "stages": [],
            "versions": versions(), "hardware": hardware(), "command": " ".join(sys.argv)}


def _resume_changes(rec: Recipe, out: Path, resuming: bool) -> list[dict] | None:
    """The recipe changes a resume applies (see ``ccrl.resume``); raises ResumeMismatch (exit 2)
    for a changed model, tokenizer or data. None when not resuming or nothing was recorded."""
    if not resuming:
        return None
    from ccrl.resume import resume_changes

    return resume_changes(rec, out)


def _record_start(rec: Recipe, out: Path, resuming: bool, changes: list[dict] | None) -> None:
    """A fresh run records its recipe in ``recipe.lock.yaml``; a resume appends to the summary's
    ``resume_history``. Then ``recipe.yaml`` gets the recipe in effect."""
    from ccrl.resume import recipe_header, record_resume, resume_point, write_lock

    if not resuming:
        write_lock(rec, out)
        _write_recipe(rec, out)
        return
    summary = _load_summary(out)
    if summary is None or summary.get("recipe") != rec.name:
        summary = _new_summary(rec, out)
    record_resume(out, summary, changes, resume_point(rec, out))
    _write_json(out / "summary.json", summary)
    changed = any(e.get("changes") for e in summary["resume_history"])
    _write_recipe(rec, out, recipe_header(changed))


def _load_resume_weights(trainer, path: Path) -> None:
    """The weights of the checkpoint a stage resumes from, into ``trainer``'s model
    (``Trainer.load_weights``); one whose tensors do not fit the model (a run folder written before
    ``recipe.lock.yaml`` existed, resumed with another model) is a CheckpointError naming it, not a
    traceback."""
    from ccrl.errors import CheckpointError

    try:
        trainer.load_weights(path)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit the recipe's model ({' '.join(str(e).split())[:200]}); "
                              f"resume with the model the run started with, or start a new run (--overwrite)") from None


def _check_prompt_lengths(rec: Recipe, tokenizer, examples_of=None) -> None:
    """Every stage's prompts (and what is generated after them) fit the model's context, before
    any stage trains (``ccrl.config.validate.check_prompt_lengths``)."""
    from ccrl.config.validate import check_prompt_lengths

    check_prompt_lengths(rec, tokenizer, examples_of or (lambda stage: _examples(rec, stage, tokenizer)[1:]))


def check_data(rec: Recipe) -> dict[str, tuple[int, int]]:
    """Read every stage's data as ``ccrl run`` does before any stage trains (``ccrl check``): the
    tokenizer, each file's rows and columns, conversations through the chat template, and each
    prompt's length against the model's context. Returns {stage: (training examples, held-out
    examples)}; a bad row raises DataError naming the file and row, as the run would."""
    tokenizer = _tokenizer(rec)
    examples = {st.name: _examples(rec, st, tokenizer)[1:] for st in rec.stages}
    _check_prompt_lengths(rec, tokenizer, lambda stage: examples[stage.name])
    return {name: (len(train), len(heldout)) for name, (train, heldout) in examples.items()}


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
