"""Shared pieces of the benchmarks against peers: the tiny Llama, the environment header, medians.

The scripts put the repository root first on ``sys.path`` before importing this module (run as
``python bench/x.py``, ``sys.path[0]`` is ``bench/``, where ``bench/kernels.py`` would shadow the
Hugging Face ``kernels`` package that transformers probes for).
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import torch

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 688,
    "max_position_embeddings": 512,
}
"""the tiny Llama both sides of a benchmark run (hidden 256, 4 layers, 4 heads of 64, MLP 688 ≈ 8/3·d)"""


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    """A randomly initialised ``LlamaForCausalLM`` of :data:`TINY_LLAMA` sized to ``tokenizer``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = {**TINY_LLAMA, **overrides}
    model_type = hf.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **hf)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def quillan(preset: str, tokenizer, seed: int = 0, **overrides):
    """A randomly initialised Quillan council policy of ``preset`` sized to ``tokenizer``."""
    from policies import QuillanConfig, QuillanForCausalLM

    cfg = QuillanConfig.preset(preset, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides)
    torch.manual_seed(seed)
    return QuillanForCausalLM(cfg)


def digit_share(prompts, completions, **kwargs) -> list[float]:
    """Share of digit characters in each completion: a dense reward, so (unlike exact match on an
    untrained model) almost every group of completions has reward variance and a gradient."""
    return [sum(c.isdigit() for c in s) / max(1, len(s)) for s in completions]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_lines(threads: int) -> list[str]:
    """Versions and hardware, one ``key: value`` per line."""
    import importlib.metadata as md

    vers = [f"python {platform.python_version()}"]
    for pkg in ("ccrl", "torch", "transformers", "trl", "accelerate", "peft"):
        try:
            vers.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.2f} at start"
    return [
        "versions: " + ", ".join(vers),
        f"hardware: {cpu_name()}, {os.cpu_count()} logical cores, torch threads {threads}{load}",
    ]


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def table(header: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (right-aligned numbers)."""
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c:.4g}" for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, width)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in width) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
