"""``ccrl export``: a standalone checkpoint for inference or sharing.

- default: the policy and tokenizer without trainer state; LoRA adapters stay separate in
  ``adapter/`` (loadable with ``PeftModel.from_pretrained(base, OUT/adapter)``);
- ``--merge``: adapters merged into the base weights (a plain ``from_pretrained`` checkpoint);
- ``--packed``: ternary layers, micro-agent tables and (where quantised) micro-agent query nets
  and persona heads packed to 2 bits per weight (``model.pack_ternary()``); ``from_pretrained`` of the result builds the packed layers again
  and decodes the QAT model's greedy tokens. The full-precision tensors are kept as they are;
  ``--fp-dtype bfloat16`` stores them in bfloat16 (a smaller file, cast back on load, but
  rounded: greedy tokens then no longer match the QAT model's exactly).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ccrl.checkpoint import ADAPTER_DIR, STATE_JSON, STATE_TENSORS, resolve
from ccrl.errors import CheckpointError

FP_DTYPES = ("float32", "bfloat16")   # --fp-dtype; float32 keeps the tensors as trained (exact)


def export_checkpoint(src, out, merge: bool = False, packed: bool = False, fp_dtype: str | None = None) -> Path:
    """Write the export of checkpoint ``src`` to ``out`` (see the module docstring).

    ``fp_dtype`` (packed only): ``"bfloat16"`` stores the full-precision tensors of the packed
    model in bfloat16; ``None`` or ``"float32"`` keeps them as they are (exact).
    """
    import torch

    from ccrl.models import load_policy

    if fp_dtype not in (None, *FP_DTYPES):
        raise CheckpointError(f"export: fp_dtype must be one of {list(FP_DTYPES)}, got {fp_dtype!r}")
    cast = torch.bfloat16 if fp_dtype == "bfloat16" else None
    if cast is not None and not packed:
        raise CheckpointError("export: --fp-dtype bfloat16 applies to packed exports only (add --packed)")

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
    state = model.packed_state_dict(cast) if cast is not None else None
    model.save_pretrained(out, safe_serialization=True, state_dict=state)
    tok.save_pretrained(out)
    return out
