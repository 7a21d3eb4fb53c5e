"""Checkpoints: one directory holding everything a stage needs to continue exactly.

Layout of a checkpoint directory::

    config.json, model.safetensors      the policy (``save_pretrained``; loadable by ``from_pretrained``)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    adapter/                            PEFT adapters, when the stage trains LoRA (base weights stay above)
    trainer_state.json                  step, stage, completed flag, metrics, scheduler state, RNG (python,
                                        numpy) and the optimizer's non-tensor state
    trainer_state.safetensors           optimizer tensors and the torch RNG states

Nothing is pickled: tensors go to safetensors, everything else to JSON, so loading a checkpoint
never executes code from it. Saving is atomic: the directory is written under a temporary name
and renamed into place; the previous version is moved aside first and deleted only after the
rename, so a crash mid-save leaves either the old or the new checkpoint complete (``load`` also
recovers the moved-aside copy if a crash happened between the two renames).

Failures while writing (a full disk, a read-only folder: ``OSError``, or ``SafetensorError`` from
the safetensors writer) remove the temporary folder and raise :class:`CheckpointWriteError` (a
:class:`~ccrl.errors.CheckpointError`, so the CLI exits 2), whose message says which checkpoint
could not be written, why, and that the previous version at that path (if any) is unchanged.
A process killed mid-save leaves its temporary folder behind; :func:`clean_interrupted_saves`
(called by the pipeline when a run starts) removes it and settles a moved-aside ``.old`` copy.

Loading a checkpoint whose weights file is missing, truncated or corrupt raises
:class:`~ccrl.errors.CheckpointError` naming the file (:func:`check_weights_file`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ccrl.errors import CheckpointError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
ADAPTER_DIR = "adapter"
WEIGHTS = "model.safetensors"
_WEIGHT_FILES = (WEIGHTS, "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TMP_MARK = ".tmp-"       # ``.<name>.tmp-<pid>-<ns>``: a checkpoint being written


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, no permission); nothing half-written is left."""


def write_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "writing a file failed" (rather than a bug)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        return (OSError,)
    return (OSError, SafetensorError)


# --------------------------------------------------------------------------- optimizer / rng (no pickle)


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        meta_state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
                meta_state[str(pid)][k] = {"tensor": f"optim.{pid}.{k}"}
            else:
                meta_state[str(pid)][k] = {"value": v}
    return tensors, {"state": meta_state, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    import numpy as np

    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    import numpy as np

    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    path: str | os.PathLike,
    model,
    tokenizer=None,
    *,
    state: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    save_model_fn=None,
    optimizer_state: dict | None = None,
) -> Path:
    """Atomically write a checkpoint directory. ``model`` may be a PEFT model (adapters go to
    ``adapter/``, the base model beside them). ``state`` is JSON-serialisable trainer state.
    ``optimizer_state``: the optimizer's state dict when it is not ``optimizer.state_dict()`` (one
    gathered from FSDP2 shards, in the one-process layout)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{time.monotonic_ns()}")
    old = path.with_name(f".{path.name}.old")
    existed = path.exists()
    try:
        tmp.mkdir()
        (save_model_fn or save_model)(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = dict(state or {})
        tensors: dict[str, torch.Tensor] = {}
        if optimizer_state is None and optimizer is not None:
            optimizer_state = optimizer.state_dict()
        if optimizer_state is not None:
            t, m = _flatten_optimizer(optimizer_state)
            tensors.update(t)
            meta["optimizer"] = m
        if scheduler is not None:
            meta["scheduler"] = scheduler.state_dict()
        rng_meta, rng_tensors = capture_rng()
        meta["rng"] = rng_meta
        tensors.update(rng_tensors)
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1, default=_json_default))
        _fsync_dir(tmp)
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    except write_errors() as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CheckpointError):
            raise
        kept = ("the previous checkpoint there is unchanged" if existed or old.exists()
                else "nothing was written there")
        raise CheckpointWriteError(
            f"{path}: writing the checkpoint failed ({type(e).__name__}: {e}); is the disk full or the folder "
            f"read-only? The temporary folder was removed and {kept}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def clean_interrupted_saves(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders of saves interrupted in ``folder`` (the process died mid-save)
    and settle moved-aside copies: a ``.<name>.old`` beside a complete ``<name>`` is stale and
    deleted, one without it is renamed back. Returns the paths removed. Call it only while no
    other process saves into ``folder`` (the pipeline holds the run folder's lock)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if not (p.name.startswith(".") and p.is_dir()) or p.is_symlink():
            continue
        if _TMP_MARK in p.name:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.name.endswith(".old"):
            target = p.with_name(p.name[1:-len(".old")])
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            else:
                os.replace(p, target)
    return removed


def save_model(model, out: Path) -> None:
    """``save_pretrained`` in safetensors; a PEFT model saves its base beside ``adapter/``."""
    if _is_peft(model):
        model.save_pretrained(out / ADAPTER_DIR)
        base = model.get_base_model()
        with _adapters_removed(model):
            base.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)


class _adapters_removed:
    """Temporarily unwrap LoRA layers so the base saves with its original parameter names."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.swaps = []
        base = self.model.get_base_model()
        for _name, module in list(base.named_modules()):
            for cname, child in list(module.named_children()):
                if isinstance(child, BaseTunerLayer):
                    self.swaps.append((module, cname, child))
                    setattr(module, cname, child.get_base_layer())
        return self

    def __exit__(self, *exc):
        for module, cname, child in self.swaps:
            setattr(module, cname, child)


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint directory to read, recovering a copy moved aside by an interrupted save."""
    path = Path(path)
    if not path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            os.replace(old, path)
        else:
            raise CheckpointError(f"{path}: checkpoint directory not found")
    if not ((path / "config.json").exists() or (path / "council_head.json").exists()):
        raise CheckpointError(f"{path}: not a checkpoint (no config.json); expected the directory a stage wrote")
    return path


def check_weights_file(path: str | os.PathLike) -> None:
    """Raise CheckpointError naming the file when a checkpoint's ``model.safetensors`` is missing,
    truncated or corrupt (its header is read; the tensors are not). Directories holding another
    weight format (sharded, ``pytorch_model.bin``) are left to ``from_pretrained``; a checkpoint a
    stage wrote (it has ``trainer_state.json``) must hold ``model.safetensors``."""
    path = Path(path)
    f = path / WEIGHTS
    if not f.exists():
        if (path / STATE_JSON).exists() or not any((path / n).exists() for n in _WEIGHT_FILES):
            raise CheckpointError(f"{f}: missing; the checkpoint has no weights (an interrupted copy?). Use "
                                  f"another checkpoint, or rerun the stage that wrote it")
        return
    check_safetensors(f)


def check_safetensors(f: str | os.PathLike) -> None:
    """Raise CheckpointError naming ``f`` when it is not a complete safetensors file."""
    from safetensors import SafetensorError, safe_open

    f = Path(f)
    try:
        with safe_open(str(f), framework="pt"):   # checks that the file covers every tensor the header lists
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: truncated or corrupt weights file ({e}); use another checkpoint (e.g. the "
                              f"stage's -last one), or rerun the stage that wrote it") from None


def read_state(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer_state.json, trainer_state.safetensors) of a checkpoint; empty when it has none."""
    from safetensors.torch import load_file

    path = resolve(path)
    js, st = path / STATE_JSON, path / STATE_TENSORS
    if not js.exists():
        return {}, {}
    try:
        meta = json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{js}: corrupt trainer state ({e})") from None
    try:
        return meta, (load_file(str(st)) if st.exists() else {})
    except write_errors() as e:
        raise CheckpointError(f"{st}: truncated or corrupt trainer state ({type(e).__name__}: {e})") from None


def restore_training_state(path, optimizer=None, scheduler=None, load_optimizer=None) -> dict:
    """Load optimizer, scheduler and RNG state from a checkpoint; returns the trainer state dict.
    ``load_optimizer(state_dict)`` loads the optimizer's state (default ``optimizer.load_state_dict``;
    FSDP2 passes one that shards it)."""
    meta, tensors = read_state(path)
    if not meta:
        raise CheckpointError(f"{path}: has no trainer state to resume from")
    settings = _group_settings(optimizer) if optimizer is not None else None
    if optimizer is not None and "optimizer" in meta:
        try:
            (load_optimizer or optimizer.load_state_dict)(_unflatten_optimizer(meta["optimizer"], tensors))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not match this model ({e})") from None
    if scheduler is not None and "scheduler" in meta:
        base_lrs = list(scheduler.base_lrs)
        scheduler.load_state_dict(meta["scheduler"])
        scheduler.base_lrs = base_lrs
    if settings is not None:
        keep_current_settings(optimizer, scheduler, settings)
    if "rng" in meta:
        restore_rng(meta["rng"], tensors)
    return meta


def _group_settings(optimizer) -> list[dict]:
    """The hyper-parameters of each param group (everything but the parameters themselves)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def keep_current_settings(optimizer, scheduler, settings: list[dict]) -> None:
    """After loading a checkpoint's optimizer and scheduler state, put back the hyper-parameters
    the optimizer was built with (the recipe as it is now: peak lr, betas, weight decay) and set
    each group's lr to the current schedule at the restored step.

    ``Optimizer.load_state_dict`` and ``LRScheduler.load_state_dict`` also restore the saved
    learning rates, so without this a ``--resume`` with a changed ``lr`` or ``steps`` would keep
    the old schedule while the run's recipe claimed the new one. With an unchanged recipe the
    values put back are the ones loaded, bit for bit (the same product ``base_lr * f(step)``)."""
    groups = optimizer.param_groups
    if len(groups) != len(settings):   # load_state_dict already refuses a different group count
        return
    for g, s in zip(groups, settings):
        g.update(s)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if scheduler is None or lambdas is None or len(lambdas) != len(groups):
        return
    step = scheduler.last_epoch
    for g, base, f in zip(groups, scheduler.base_lrs, lambdas):
        g["lr"] = base * f(step)
    scheduler._last_lr = [g["lr"] for g in groups]


def _json_default(o):
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fsync_dir(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
