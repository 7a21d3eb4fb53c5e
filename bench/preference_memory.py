"""Peak memory of one DPO step: reference = the policy with its LoRA adapters disabled, against a
separate frozen copy of the model (what a trainer without PEFT, or TRL with ``ref_model=...``, keeps).

Both arms train the same LoRA-wrapped policy on the same pairs with the reference log-probs
computed inside the step (``cache_reference=False``: the per-step cost of a reference, which the
trainer's default cache removes after its first pass). Each arm runs in a fresh subprocess:

- CPU: peak resident memory (VmHWM, reset through /proc/self/clear_refs before the arm) minus the
  resident memory after the policy is built; the separate copy is made inside the measured window,
  since it stays resident for the whole stage;
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation after the policy is built.

    python bench/preference_memory.py                       # Quillan "small" preset, 16 pairs
    python bench/preference_memory.py --model llama --hidden 512 --layers 8
    python bench/preference_memory.py --device cuda

Prints both peaks (MiB), the model's weight size and the ratio separate / adapter-disabled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Python puts this script's folder first on sys.path; a sibling script named like an installed
# package (bench/kernels.py vs Hugging Face's `kernels`, which transformers probes) would shadow it.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _build(args, tok):
    import torch

    torch.manual_seed(0)
    if args.model == "quillan":
        from policies import QuillanConfig, QuillanForCausalLM

        cfg = QuillanConfig.preset(args.preset, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        return QuillanForCausalLM(cfg)
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                               vocab_size=len(tok), max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return AutoModelForCausalLM.from_config(cfg)


def arm(args) -> dict:
    """One measured DPO step in this process (called in a subprocess by ``main``)."""
    import torch
    from accelerate import Accelerator

    from ccrl.config import DataConfig, PeftConfig, PreferenceStage
    from ccrl.data import default_tokenizer, get_task
    from ccrl.pipeline import apply_peft
    from ccrl.trainers.base import RunContext
    from ccrl.trainers.preference import PreferenceTrainer

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    tok = default_tokenizer()
    model = _build(args, tok)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    stage = PreferenceStage(kind="dpo", name="dpo", data=DataConfig(task="arithmetic"), lr=1e-4,
                            batch_size=args.pairs, peft=PeftConfig(r=8, alpha=16))
    model = apply_peft(model, stage.peft)
    task = get_task("arithmetic", digits=2)
    exs = task.examples("train", args.pairs, seed=0)
    rows = [{"prompt": e.prompt, "chosen": e.answer, "rejected": str(int(e.answer) + 1), "split": "train"}
            for e in exs]
    ctx = RunContext(output_dir=Path(args.tmp), seed=0, stage_index=0, stage_name="dpo",
                     accelerator=Accelerator(cpu=not cuda), tokenizer=tok, show_progress=False)
    if cuda:
        model = model.cuda()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        import gc

        gc.collect()
        base = _rss_mib()
        exact = _reset_hwm()
    trainer = PreferenceTrainer(stage, model, ctx, cache_reference=False,
                                separate_reference=args.arm == "separate")
    trainer.use_pairs(rows, at_start=False)
    metrics = trainer.training_step(0)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        how = "torch.cuda.max_memory_allocated"
    else:
        peak = _hwm_mib()
        how = "VmHWM" if exact else "VmHWM (not reset: includes the model build)"
    return {"arm": args.arm, "peak_mib": peak - base, "weights_mib": weights_mib, "loss": metrics["loss"],
            "measure": how, "reference_copy": trainer.ref_model is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["quillan", "llama"], default="quillan")
    p.add_argument("--preset", default="small", help="Quillan preset")
    p.add_argument("--hidden", type=int, default=512, help="llama width")
    p.add_argument("--layers", type=int, default=8, help="llama depth")
    p.add_argument("--pairs", type=int, default=16, help="pairs in the step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arm", choices=["disabled", "separate"], help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(arm(args)))
        return
    import tempfile

    results = {}
    for which in ("disabled", "separate"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--arm", which, "--tmp", tmp] + sys.argv[1:]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                sys.exit(f"arm {which} failed:\n{out.stderr[-3000:]}")
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = results["disabled"], results["separate"]
    what = f"Quillan preset {args.preset!r}" if args.model == "quillan" else f"llama {args.hidden}x{args.layers}"
    print(f"one DPO step, {args.pairs} pairs, LoRA r=8, {what} ({a['weights_mib']:.1f} MiB of weights), "
          f"{args.device}, peak memory above the built policy ({a['measure']}):")
    print(f"  reference = adapters disabled : {a['peak_mib']:8.1f} MiB   loss {a['loss']:.6f}")
    print(f"  reference = separate copy     : {b['peak_mib']:8.1f} MiB   loss {b['loss']:.6f}")
    print(f"  ratio separate / disabled     : {b['peak_mib'] / max(a['peak_mib'], 1e-9):8.2f}x")


if __name__ == "__main__":
    main()
