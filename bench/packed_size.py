#!/usr/bin/env python3
"""Size of a packed Quillan checkpoint against the bf16 safetensors checkpoint of the same model.

Builds a preset (randomly initialised: sizes do not depend on the values), writes

- ``bf16``: ``model.to(torch.bfloat16).save_pretrained(...)``, every tensor in bfloat16;
- ``packed``: ``model.eval().pack_ternary()`` saved as ``ccrl export --packed`` saves it, the
  full-precision tensors as they are (float32: greedy tokens identical to the QAT model);
- ``packed, fp in bf16``: the same with ``packed_state_dict(torch.bfloat16)``, as
  ``ccrl export --packed --fp-dtype bfloat16`` (greedy tokens no longer exact),

and prints the size of each ``model.safetensors``, the ratio bf16 / packed, and what each
packed file holds, component by component: 2-bit codes (uint8), their scales (float32), and
full-precision tensors.

    python bench/packed_size.py                                  # the small preset
    python bench/packed_size.py --preset base
    python bench/packed_size.py --set weight_group_size=128 --set act_block_size=64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

# Run as a script, sys.path[0] is bench/, where bench/kernels.py would shadow the Hugging Face
# ``kernels`` package that transformers probes for.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

MB = 1e6
COMPONENTS = (  # (label, substrings of the tensor name), first match wins
    ("persona experts", (".experts.",)),
    ("micro-agent tables", (".micro.down", ".micro.up")),
    ("micro-agent query nets", (".micro.query",)),
    ("micro-agent sub-keys", (".micro.sub_keys",)),
    ("shared experts", (".shared.",)),
    ("attention", (".attn.",)),
    ("persona heads", ("persona_down", "persona_up")),
    ("overseer", ("overseer",)),
    ("routers", ("router.",)),
    ("embedding", ("embed_tokens",)),
    ("norms", ("norm",)),
)
KINDS = ("2-bit codes", "scales", "full precision")
SHORT = {torch.uint8: "u8", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def file_breakdown(path: Path) -> dict:
    """Bytes of a safetensors file's tensors by component and kind: {component: {kind: bytes}}.

    Kinds: 2-bit codes (uint8), their scales (``*_scale``), and full-precision tensors (the key
    names their dtype). The file's size is these plus its JSON header.
    """
    out: dict = defaultdict(lambda: defaultdict(int))
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            size = t.numel() * t.element_size()
            label = next((lab for lab, keys in COMPONENTS if any(k in name for k in keys)), "other")
            if t.dtype == torch.uint8:
                kind = "2-bit codes"
            elif name.endswith("_scale"):
                kind = "scales"
            else:
                kind = "full precision"
            out[label][kind] += size
            dtypes = out[label].setdefault(f"{kind} dtype", [])
            short = SHORT.get(t.dtype, str(t.dtype).split(".")[1])
            if short not in dtypes:
                dtypes.append(short)
    return {k: dict(v) for k, v in out.items()}


def print_breakdown(title: str, parts: dict, file_size: int) -> None:
    print(f"\n{title}: what the file holds (MB)")
    print(f"  {'component':<24}" + "".join(f"{k:>17}" for k in KINDS) + f"{'total':>9}")
    rows = sorted(parts.items(), key=lambda kv: -sum(kv[1].get(k, 0) for k in KINDS))
    totals = dict.fromkeys(KINDS, 0)
    for label, by_kind in rows:
        cells = []
        for kind in KINDS:
            size = by_kind.get(kind, 0)
            totals[kind] += size
            cells.append(f"{size / MB:8.3f} {'+'.join(by_kind[f'{kind} dtype']):>8}" if size else f"{'':17}")
        print(f"  {label:<24}" + "".join(cells) + f"{sum(by_kind.get(k, 0) for k in KINDS) / MB:9.3f}")
    data = sum(totals.values())
    print(f"  {'all tensors':<24}" + "".join(f"{totals[k] / MB:8.3f}{'':9}" for k in KINDS) + f"{data / MB:9.3f}")
    print(f"  file header (names, shapes, offsets): {(file_size - data) / MB:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (JSON value), e.g. attention_precision=ternary")
    args = ap.parse_args()

    from policies import QuillanConfig, QuillanForCausalLM

    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    config = QuillanConfig.preset(args.preset, **overrides)
    torch.manual_seed(0)
    model = QuillanForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bf16 = type(model)(config).to(torch.bfloat16)
        bf16.load_state_dict(model.state_dict())
        bf16.save_pretrained(root / "bf16")
        del bf16
        model.pack_ternary()
        model.save_pretrained(root / "packed")
        model.save_pretrained(root / "packed_bf16", state_dict=model.packed_state_dict(torch.bfloat16))
        sizes = {name: (root / name / "model.safetensors").stat().st_size for name in ("bf16", "packed", "packed_bf16")}
        parts = {name: file_breakdown(root / name / "model.safetensors") for name in ("packed", "packed_bf16")}

    ref = sizes["bf16"]
    label = args.preset + "".join(f", {k}={v}" for k, v in overrides.items())
    print(f"Quillan {label}: {n_params / 1e6:.2f}M parameters")
    print(f"{'checkpoint':<44} {'MB':>8} {'bf16 / this':>12}")
    for name, title in (("bf16", "bf16 safetensors"), ("packed", "packed (fp parts as trained: float32, exact)"),
                        ("packed_bf16", "packed, fp parts in bf16 (--fp-dtype bfloat16)")):
        print(f"{title:<44} {sizes[name] / MB:8.2f} {ref / sizes[name]:11.2f}x")
    print(f"target 1/7 of bf16: <= {ref / 7 / MB:.2f} MB")
    for name, title in (("packed", "packed"), ("packed_bf16", "packed, fp parts in bf16")):
        print_breakdown(title, parts[name], sizes[name])


if __name__ == "__main__":
    main()
