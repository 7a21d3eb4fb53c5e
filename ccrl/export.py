"""``ccrl export``: a standalone checkpoint for inference or sharing.

- default: the policy and tokenizer without trainer state; LoRA adapters stay separate in
  ``adapter/`` (loadable with ``PeftModel.from_pretrained(base, OUT/adapter)``);
- ``--merge``: adapters merged into the base weights (a plain ``from_pretrained`` checkpoint);
- ``--packed``: ternary layers packed to 2 bits per weight for the C++ kernel
  (``model.pack_ternary()``); ``from_pretrained`` of the result builds the packed layers again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ccrl.checkpoint import ADAPTER_DIR, STATE_JSON, STATE_TENSORS, resolve
from ccrl.errors import CheckpointError


def export_checkpoint(src, out, merge: bool = False, packed: bool = False) -> Path:
    from ccrl.models import load_policy

    src, out = resolve(src), Path(out)
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the export target must differ from the source checkpoint")
    has_adapter = (src / ADAPTER_DIR).exists()
    if not merge and not packed:
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(STATE_JSON, STATE_TENSORS))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out
    if packed and has_adapter and not merge:
        raise CheckpointError(f"{src}: has LoRA adapters; packing needs them merged first (add --merge)")
    model, tok = load_policy(src, merge_adapters=True)
    if packed:
        pack = getattr(model, "pack_ternary", None)
        if not callable(pack):
            raise CheckpointError(f"{src}: a {type(model).__name__} has no ternary layers to pack (--packed needs a Quillan policy)")
        model.eval()
        model = pack() or model
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
