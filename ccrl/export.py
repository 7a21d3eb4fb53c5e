"""``ccrl export``: a standalone checkpoint for inference or sharing.

- default: the policy and tokenizer without trainer state; LoRA adapters stay separate in
  ``adapter/`` (loadable with ``PeftModel.from_pretrained(base, OUT/adapter)``);
- ``--merge``: adapters merged into the base weights (a plain ``from_pretrained`` checkpoint);
- ``--packed``: ternary layers, micro-agent tables and (where quantised) micro-agent query nets
  and persona heads packed to 2 bits per weight (``model.pack_ternary()``); ``from_pretrained`` of the result builds the packed layers again
  and decodes the QAT model's greedy tokens. The full-precision tensors are kept as they are;
  ``--fp-dtype bfloat16`` stores them in bfloat16 (a smaller file, cast back on load, but
  rounded: greedy tokens then no longer match the QAT model's exactly).

Every export loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` after ``import policies``;
a ``council_head`` policy's folder (``base/`` and the head) has a top-level ``config.json`` of
model_type ``ccrl_council_head`` for that (one written for a checkpoint from before that file).

What an export never does:

- destroy a folder it did not write. Every export holds ``ccrl_export.json`` (what it was made
  from, and how); the target ``OUT`` may be new, an empty folder or an earlier export. Any other
  non-empty folder is refused (exit 2) unless ``overwrite=True`` (``--overwrite``). A file at
  ``OUT``, a symbolic link, a target inside the source checkpoint or holding it are always refused;
- leave a half-written target. The export is written into a temporary folder beside ``OUT``
  (``.OUT.export-<pid>-<ns>``), then the old target is renamed aside, the new one renamed in, and
  the old one deleted. A failure while writing (a full disk: ``OSError`` / ``SafetensorError``, or
  any exception) removes the temporary folder and leaves ``OUT`` as it was; a failure of the
  second rename puts the old target back. Only a process killed between the two renames can leave
  ``OUT`` missing, its previous content then being in ``.OUT.export-old-*`` beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ccrl.checkpoint import ADAPTER_DIR, STATE_JSON, STATE_TENSORS, resolve, write_errors
from ccrl.errors import CheckpointError

FP_DTYPES = ("float32", "bfloat16")   # --fp-dtype; float32 keeps the tensors as trained (exact)
MARKER = "ccrl_export.json"            # written into every export: marks a folder export may replace


def export_checkpoint(src, out, merge: bool = False, packed: bool = False, fp_dtype: str | None = None,
                      overwrite: bool = False) -> Path:
    """Write the export of checkpoint ``src`` to ``out`` (see the module docstring).

    ``fp_dtype`` (packed only): ``"bfloat16"`` stores the full-precision tensors of the packed
    model in bfloat16; ``None`` or ``"float32"`` keeps them as they are (exact). ``overwrite``
    replaces a non-empty ``out`` that is not an earlier export.
    """
    import torch

    if fp_dtype not in (None, *FP_DTYPES):
        raise CheckpointError(f"export: fp_dtype must be one of {list(FP_DTYPES)}, got {fp_dtype!r}")
    cast = torch.bfloat16 if fp_dtype == "bfloat16" else None
    if cast is not None and not packed:
        raise CheckpointError("export: --fp-dtype bfloat16 applies to packed exports only (add --packed)")

    src, out = resolve(src), Path(out)
    check_target(src, out, overwrite)
    if packed and (src / ADAPTER_DIR).exists() and not merge:
        raise CheckpointError(f"{src}: has LoRA adapters; packing needs them merged first (add --merge)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}-{time.monotonic_ns()}")
    try:
        _write(src, tmp, merge, packed, cast)
        (tmp / MARKER).write_text(json.dumps({"ccrl_export": 1, "source": str(src), "merge": merge,
                                              "packed": packed, "fp_dtype": fp_dtype}, indent=1) + "\n")
        _replace(tmp, out)
    except write_errors() as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{out}: writing the export failed ({type(e).__name__}: {e}); is the disk full or "
                              f"the folder read-only? Nothing was changed at {out}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_target(src: Path, out: Path, overwrite: bool = False) -> None:
    """Raise CheckpointError when writing the export to ``out`` could destroy something."""
    if out.is_symlink():
        raise CheckpointError(f"{out}: is a symbolic link; give the folder to export to itself")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is an existing file; the export target must be a folder (a new one, or an "
                              f"earlier export). Remove the file or choose another path")
    s, o = src.resolve(), out.resolve()
    if o == s:
        raise CheckpointError(f"{out}: the export target must differ from the source checkpoint")
    if o in s.parents:
        raise CheckpointError(f"{out}: holds the source checkpoint {src}; replacing it would delete the source. "
                              f"Choose another export folder")
    if s in o.parents:
        raise CheckpointError(f"{out}: lies inside the source checkpoint {src}; choose a folder outside it")
    if out.is_dir() and not overwrite and not is_export(out):
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            raise CheckpointError(
                f"{out}: is a non-empty folder that is not an earlier ccrl export (it holds {', '.join(entries[:3])}"
                f"{', ...' if len(entries) > 3 else ''}); exporting would replace it. Choose a new folder, or add "
                f"--overwrite to replace it")


def is_export(folder: Path) -> bool:
    """True when ``folder`` holds an export written by :func:`export_checkpoint`."""
    try:
        return bool(json.loads((Path(folder) / MARKER).read_text()).get("ccrl_export"))
    except (OSError, ValueError, AttributeError):
        return False


def _write(src: Path, tmp: Path, merge: bool, packed: bool, cast) -> None:
    if not merge and not packed:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(STATE_JSON, STATE_TENSORS))
        _name_council_head(tmp)
        return
    from ccrl.models import load_policy

    model, tok = load_policy(src, merge_adapters=True)
    if packed:
        pack = getattr(model, "pack_ternary", None)
        if not callable(pack):
            raise CheckpointError(f"{src}: a {type(model).__name__} has no ternary layers to pack (--packed needs a Quillan policy)")
        model.eval()
        model = pack() or model
    tmp.mkdir()
    state = model.packed_state_dict(cast) if cast is not None else None
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    tok.save_pretrained(tmp)


def _replace(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``: the old target renamed aside, ``new`` renamed in, the old deleted."""
    if not target.exists():
        os.rename(new, target)
        return
    aside = target.with_name(f".{target.name}.export-old-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _name_council_head(folder: Path) -> None:
    """Give a council-head folder written before ``CouncilHead.save_pretrained`` wrote a top-level
    ``config.json`` that file, so ``AutoModelForCausalLM`` loads the export."""
    from policies.council_head import HEAD_CONFIG, write_auto_config

    if (folder / HEAD_CONFIG).exists() and not (folder / "config.json").exists():
        write_auto_config(folder)
